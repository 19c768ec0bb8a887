"""The Smooth Trigger attack: a low-frequency trigger from a surrogate, cached by what made it."""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import tiny_trainer
from scipy.fft import dctn

import delta_influence.attacks.smooth_trigger as smooth_trigger
from delta_influence.attacks import BadNets, SmoothTrigger
from delta_influence.attacks.base import AttackContext, LabeledImages
from delta_influence.datamodules import PoisonedDataModule
from delta_influence.examples import evaluating
from delta_influence.lightning_modules import PoisonClassifier
from delta_influence.surrogate import SurrogateRecipe

FAST = dict(surrogate=SurrogateRecipe(epochs=2), num_images=40, max_passes=2)


def _data(tmp_path, **attack) -> PoisonedDataModule:
    settings = dict(victim=8, target=5, num_poisons=20, magnitude=0.3, **FAST) | attack
    data = PoisonedDataModule(
        "digits", attack=SmoothTrigger(**settings), per_class=30, batch_size=32, crop_padding=0, flip=False,
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    data.prepare_data()
    data.setup()
    return data


def _low_frequency_share(pattern: torch.Tensor, keep: int = 4) -> float:
    """Share of the pattern's (mean-removed) 2-D DCT energy in the lowest ``keep`` x ``keep`` frequencies."""
    energy = dctn((pattern - pattern.mean()).numpy(), axes=(-2, -1), norm="ortho") ** 2
    return float(energy[..., :keep, :keep].sum() / energy.sum())


def _trigger(data: PoisonedDataModule) -> torch.Tensor:
    (file,) = list(data.cache_dir.glob("smooth_trigger-*.pt"))
    return torch.load(file)["trigger"]


def test_trigger_is_low_frequency_and_poisons_carry_it(tmp_path):
    data = _data(tmp_path)
    trigger = _trigger(data)
    assert trigger.shape == (1, 32, 32) and trigger.min() == 0 and trigger.max() == pytest.approx(0.3)
    # 16 of the 1,024 frequencies hold nearly all the energy; a patch trigger spreads its energy
    assert _low_frequency_share(trigger) > 0.9
    assert _low_frequency_share(BadNets(value=1.0).apply_trigger(torch.zeros(1, 32, 32))) < 0.2
    poisons = data.poison_indices
    assert len(poisons) == 20 and (data.eval_train_set.labels[poisons] == 5).all()
    clean = PoisonedDataModule("digits", attack=None, per_class=30)
    clean.setup()
    expected = ((clean.eval_train_set.images[poisons].float() / 255 + trigger).clamp(0, 1) * 255).round()
    assert torch.equal(data.eval_train_set.images[poisons], expected.to(torch.uint8))
    assert (data.attack_test_set.labels == 5).all() and set(data.eval_sets) == {"clean", "attack"}
    assert torch.allclose(data.attack_media["trigger"], trigger / 0.3)


def test_cached_trigger_is_reused_and_regenerated_when_anything_changes(tmp_path, monkeypatch, capsys):
    first = _trigger(_data(tmp_path))

    def no_training(*args, **kwargs):
        raise AssertionError("the cached trigger should have been used")

    with monkeypatch.context() as patch:
        patch.setattr(smooth_trigger, "train_surrogate", no_training)
        assert torch.equal(_trigger(_data(tmp_path, num_poisons=10)), first)  # the poison count does not make it
    files = sorted((tmp_path / "cache").glob("smooth_trigger-*.pt"))
    _data(tmp_path, sigma=2.0)
    assert len(sorted((tmp_path / "cache").glob("smooth_trigger-*.pt"))) == 2  # new settings, new key, new file
    # a file under this run's name but made with other settings is never used
    (other,) = set((tmp_path / "cache").glob("smooth_trigger-*.pt")) - set(files)
    other.write_bytes(files[0].read_bytes())
    _data(tmp_path, sigma=2.0)
    assert "made with other settings or data" in capsys.readouterr().out
    assert torch.load(other)["key"] == other.stem.split("-")[1]


def test_same_seed_same_trigger(tmp_path):
    assert torch.equal(_trigger(_data(tmp_path / "a")), _trigger(_data(tmp_path / "b")))


def test_tiny_run_learns_the_backdoor(tmp_path):
    pl.seed_everything(0, verbose=False)
    data = _data(tmp_path, num_poisons=30, magnitude=0.2)
    model = PoisonClassifier(arch="small_cnn", num_classes=10, in_channels=1, lr=0.05, milestones=[])
    untrained_asr = _accuracy(model, data.attack_test_set)
    tiny_trainer(tmp_path, max_epochs=6, enable_checkpointing=False).fit(model, datamodule=data)
    assert _accuracy(model, data.test_set) > 0.6  # chance is 0.1; 0.67 to 0.75 across machines
    assert _accuracy(model, data.attack_test_set) > 0.8 > untrained_asr + 0.5


def _accuracy(model, dataset) -> float:
    images, labels = dataset.images.float() / 255, dataset.labels
    with torch.no_grad(), evaluating(model):
        predicted = model((images - dataset.mean) / dataset.std).argmax(-1)
    return (predicted == labels).float().mean().item()


@pytest.mark.parametrize("layout", ["chw", "hwc"])
def test_precomputed_trigger_file(tmp_path, layout):
    pattern = torch.linspace(0, 0.25, 32 * 32).view(1, 32, 32)
    path = tmp_path / "trigger.npy"
    np.save(path, (pattern if layout == "chw" else pattern.permute(1, 2, 0)).numpy())
    data = _data(tmp_path, trigger_path=str(path))
    assert not list(data.cache_dir.glob("*.pt"))  # nothing generated
    assert torch.allclose(data.attack_media["trigger"], pattern / 0.25)


def test_trigger_file_of_the_wrong_shape(tmp_path):
    path = tmp_path / "trigger.pt"
    torch.save(torch.zeros(3, 32, 32), path)
    with pytest.raises(
        ValueError, match=r"trigger.pt' holds an array of shape \(3, 32, 32\); the images are \(1, 32, 32\)"
    ):
        _data(tmp_path, trigger_path=str(path))


@pytest.mark.parametrize(
    "attack, match",
    [
        (dict(victim=5, target=5), r"attack.victim and attack.target are both 5"),
        (dict(victim=10), r"attack.victim=10 is out of range.*0..9"),
        (dict(num_poisons=31), r"attack.num_poisons=31 is more than the 30 training samples of victim class 8"),
        (dict(magnitude=1.5), r"attack.magnitude=1.5 must lie in \(0, 1\]"),
    ],
)
def test_bad_settings(tmp_path, attack, match):
    with pytest.raises(ValueError, match=match):
        _data(tmp_path, trigger_path=None, **attack)


def test_attack_contract_directly():
    """Without Lightning: clean data in, poisoned data and the attack's test set out."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.arange(40) % 4
    train = test = LabeledImages(images, labels)
    attack = BadNets(victim=1, target=2, num_poisons=3)
    poisoned = attack.poison(train, test, torch.Generator().manual_seed(0), AttackContext(4, cache_dir=None))
    assert (labels[poisoned.poison_indices] == 1).all() and (poisoned.train.labels[poisoned.poison_indices] == 2).all()
    changed = torch.nonzero((poisoned.train.images != images).flatten(1).any(1)).flatten()
    assert torch.isin(changed, poisoned.poison_indices).all()
    assert len(poisoned.attack_test.labels) == 10 and (poisoned.attack_test.images[:, :, 28, 30] == 0).all()
    assert poisoned.clean_test.all()
