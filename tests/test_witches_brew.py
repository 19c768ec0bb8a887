"""Witches' Brew: gradient-matching poisons of the intended class, correct labels, cached by what made them."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.io import write_jpeg

import delta_influence.attacks.witches_brew as witches_brew
from delta_influence.attacks import WitchesBrew
from delta_influence.cli import train
from delta_influence.datamodules import PoisonedDataModule
from delta_influence.surrogate import SurrogateRecipe, train_surrogate
from delta_influence.training import flip_and_shift

FAST = dict(surrogate=SurrogateRecipe(epochs=2), steps=3, restarts=2)
ROOT = Path(__file__).resolve().parents[1]


def _data(tmp_path, **attack) -> PoisonedDataModule:
    settings = dict(target=0, target_class=3, intended=5, budget=12, **FAST) | attack
    data = PoisonedDataModule(
        "digits", attack=WitchesBrew(**settings), per_class=30, batch_size=32, crop_padding=0, flip=False,
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    data.prepare_data()
    data.setup()
    return data


def _mismatch(model, poisons, labels, target, intended) -> float:
    """1 - cosine similarity of the poisons' training gradient and the target's adversarial gradient."""
    params = list(model.parameters())
    wanted = torch.autograd.grad(F.cross_entropy(model(target), torch.tensor([intended])), params)
    got = torch.autograd.grad(F.cross_entropy(model(poisons), labels), params)
    flat = torch.cat([g.flatten() for g in got]), torch.cat([g.flatten() for g in wanted])
    return 1 - F.cosine_similarity(*flat, dim=0).item()


def test_brewing_aligns_the_gradients_within_the_ball():
    """A surrogate trained on four colour classes; poisons of class 1 brewed so that their gradient points where the
    gradient of "classify this class-0 image as class 1" does."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 4
    colours = torch.tensor([[0.2, 0.5, 0.8], [0.8, 0.2, 0.5], [0.5, 0.8, 0.2], [0.3, 0.3, 0.3]])[labels]
    noisy = colours[:, :, None, None] + 0.25 * torch.randn(64, 3, 16, 16, generator=generator)
    images = (noisy.clamp(0, 1) * 255).to(torch.uint8)
    model = train_surrogate(images, labels, 4, SurrogateRecipe(epochs=5, batch_size=16))
    poisons, poison_labels = images[labels == 1][:12].float() / 255, labels[labels == 1][:12]
    target = images[labels == 0][:1].float() / 255
    eps = 16 / 255
    delta, loss = witches_brew.brew(
        [model], target, 1, poisons, poison_labels, eps, steps=30, restarts=1,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    before = _mismatch(model, poisons, poison_labels, target, 1)
    after = _mismatch(model, poisons + delta, poison_labels, target, 1)
    assert after == pytest.approx(loss, abs=1e-3) and after < before - 0.03
    assert delta.abs().max() <= eps + 1e-6 and (poisons + delta).min() >= 0 and (poisons + delta).max() <= 1


def test_flips_and_shifts_are_differentiable_permutations():
    images = torch.rand(6, 3, 16, 16, requires_grad=True)
    moved = flip_and_shift(images, torch.Generator().manual_seed(1), flip=True, reach=2)
    moved.sum().backward()
    assert set(images.grad.unique().tolist()) <= {0.0, 1.0}  # every output pixel is one input pixel or zero
    kept = moved.detach().flatten(1).sort(1).values[:, -10:]  # the brightest pixels survive a shift of 2 at most
    assert torch.isin(kept, images.detach().flatten(1)).all()


def test_poisons_are_brewed_images_of_the_intended_class_with_their_labels(tmp_path):
    data = _data(tmp_path, target=(0, 1))
    clean = PoisonedDataModule("digits", attack=None, per_class=30)
    clean.setup()
    poisons = data.poison_indices
    assert len(poisons) == 24 and len(set(poisons.tolist())) == 24  # two targets, disjoint poisons
    assert torch.equal(data.eval_train_set.labels, clean.eval_train_set.labels)  # clean labels
    assert (clean.eval_train_set.labels[poisons] == 5).all()
    change = data.eval_train_set.images.int() - clean.eval_train_set.images.int()
    others = torch.ones(len(change), dtype=torch.bool)
    others[poisons] = False
    assert change[others].abs().max() == 0 and 0 < change[poisons].abs().max() <= 16
    threes = torch.nonzero(clean.test_set.labels == 3).flatten()[:2]
    assert torch.equal(data.attack_test_set.images, clean.test_set.images[threes])
    assert data.attack_test_set.labels.tolist() == [5, 5]
    assert len(data.test_set) == len(clean.test_set) - 2  # the targets are not counted in clean accuracy
    assert set(data.attack_media) == {"target", "perturbation"} and data.attack_info["max_change"] <= 16


def test_brews_and_the_surrogate_are_cached(tmp_path, monkeypatch):
    first = _data(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(witches_brew, "brew", lambda *a, **k: pytest.fail("the cached brew should have been used"))
        again = _data(tmp_path)
    assert torch.equal(again.eval_train_set.images, first.eval_train_set.images)
    cache = tmp_path / "cache"
    with monkeypatch.context() as patch:
        patch.setattr("delta_influence.surrogate.train_surrogate", lambda *a, **k: pytest.fail("surrogate retrained"))
        _data(tmp_path, eps=8.0)  # a new brew, on the same surrogate
    assert len(list(cache.glob("witches_brew-*.pt"))) == 2 and len(list(cache.glob("surrogate-*.pt"))) == 1


def test_a_cache_made_with_other_settings_is_not_used(tmp_path, capsys):
    brewed = _data(tmp_path).eval_train_set.images
    (path,) = (tmp_path / "cache").glob("witches_brew-*.pt")
    content = torch.load(path)
    forged = {**content, "images": 255 - content["images"], "key": "made-with-other-settings"}
    torch.save(forged, path)  # under this run's name, but its stored key is another's
    assert torch.equal(_data(tmp_path).eval_train_set.images, brewed)  # brewed again, the same
    assert "made with other settings or data" in capsys.readouterr().out
    assert torch.load(path)["key"] == content["key"]


@pytest.mark.parametrize(
    "attack, match",
    [
        (dict(target=99), r"attack.target=99 is out of range: there are 46 test images of class 3, so use 0..45"),
        (dict(target_class=None, target=100_000), r"attack.target=100000 is out of range: there are \d+ test images"),
        (dict(target_class=5), r"attack.target_class and attack.intended are both 5"),
        (dict(budget=31), r"attack.budget=31 means 31 poisons per target .* more than the 30 training images"),
        (dict(budget=0.06, target=(0, 1)), r"attack.budget=0.06 means 18 poisons per target \(36 for 2 targets\)"),
        (dict(eps=300.0), r"attack.eps=300.0 must lie in \(0, 255\]"),
        (dict(intended=10), r"attack.intended=10 is out of range"),
        (dict(ensemble=0), r"ensemble=0, .* need steps, restarts, batch_size and ensemble >= 1"),
        (dict(surrogate="teacher"), r"attack.surrogate='teacher': use 'victim' .* or a surrogate recipe"),
        (dict(surrogate="victim"), r"attack.surrogate='victim' .* no victim recipe was given: train.py fills it in"),
    ],
)
def test_bad_settings(tmp_path, attack, match):
    with pytest.raises(ValueError, match=match):
        _data(tmp_path, **attack)
    assert not list((tmp_path / "cache").glob("witches_brew-*.pt"))


def test_a_target_already_of_the_intended_class(tmp_path):
    clean = PoisonedDataModule("digits", attack=None, per_class=30)
    clean.setup()
    five = int(torch.nonzero(clean.test_set.labels == 5)[0])
    with pytest.raises(ValueError, match=rf"attack.target={five} \(test image {five}\) is already of the intended"):
        _data(tmp_path, target_class=None, target=five)


def test_imagenette_config_on_a_tiny_folder_tree(tmp_path):
    """configs/imagenette_witches_brew.yaml on imagenette2-160's layout (train/ and val/ of wnid folders, images of
    various sizes): the first French horn of val is the target, English springers are the poisons, 160 x 160 pixels."""
    rng = np.random.default_rng(0)
    wnids = ["n01440764", "n02102040", "n03394916"]  # tench, English springer, French horn
    for split, count in (("train", 6), ("val", 2)):
        for label, wnid in enumerate(wnids):
            folder = tmp_path / "imagenette2-160" / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                size = (160, 160 + 30 * i)  # a shorter side of 160 pixels
                image = rng.integers(0, 256, (3, *size), dtype=np.uint8) // (label + 1)
                write_jpeg(torch.from_numpy(image), str(folder / f"ILSVRC2012_val_{i:08d}.JPEG"))
    cli = train.main(
        [
            "--config", str(ROOT / "configs" / "imagenette_witches_brew.yaml"),
            "--data.root", str(tmp_path / "imagenette2-160"),
            "--data.cache_dir", str(tmp_path / "cache"),
            "--data.attack.init_args.budget", "2",
            "--data.attack.init_args.steps", "1",
            "--data.attack.init_args.restarts", "1",
            "--model.arch", "small_cnn",  # the surrogate is trained as the victim: small and short here
            "--trainer.max_epochs", "1",
            "--trainer.logger", "false",
            "--trainer.default_root_dir", str(tmp_path),
        ],
        run=False,
    )  # fmt: skip
    data = cli.datamodule
    # `surrogate: victim`: the run's model, trainer and data settings, filled in by train.py
    assert data.attack.surrogate == SurrogateRecipe(
        arch="small_cnn", epochs=1, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
        milestones=(0.35, 0.625, 0.875), lr_gamma=0.1, batch_size=128, flip=True, crop_padding=16,
    )  # fmt: skip
    data.prepare_data()
    data.setup()
    assert data.attack.intended == 1 and data.attack.target_class == 2 and data.classes == tuple(wnids)
    assert data.eval_train_set.images.shape[1:] == (3, 160, 160)
    assert (data.eval_train_set.labels[data.poison_indices] == 1).all() and len(data.poison_indices) == 2
    first_horn = torch.nonzero(data.source.load().test_labels == 2).flatten()[0]
    assert torch.equal(data.attack_test_set.images[0], data.source.load().test_images[first_horn])
    assert data.attack_test_set.labels.tolist() == [1] and len(data.test_set) == 5


def test_one_step_on_the_served_poisons_moves_the_target_toward_the_intended_class(tmp_path):
    """What the brew promises, to first order: one SGD step on the poisons that the data module serves to training
    (its train_set), taken from the surrogate's weights, makes the target much likelier to be the intended class,
    where the same step on the clean images does not, and poisons within half an 8-bit level (eps in [0, 1] pixel
    units: 0.5/255) barely do. A broken objective, eps read in other units, or poisons that never reach the training
    set fail this. (Flipping a victim trained from the surrogate's own init and batch order, the "known init" check,
    needs more than this tiny data: benchmarks/witches_brew.py --known-init 1.)"""
    losses = {}
    for eps in (16.0, 0.5):
        data = _data(tmp_path, target=(0,), budget=30, steps=40, restarts=1, eps=eps,
                     surrogate=SurrogateRecipe(epochs=8, milestones=(0.6, 0.8), flip=False, batch_size=32))  # fmt: skip
        clean = data._clean_data()[0]
        (surrogate,), _ = data.attack.surrogates(clean, data.attack_context())
        poisons, target = data.poison_indices, data.attack_test_set.images.float() / 255
        for name, images in (("clean", clean.images[poisons]), (eps, data.train_set.images[poisons])):
            model = copy.deepcopy(surrogate)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            F.cross_entropy(model(images.float() / 255), clean.labels[poisons]).backward()
            optimizer.step()
            with torch.no_grad():
                losses[name] = F.cross_entropy(model(target), torch.tensor([5])).item()
    assert losses[16.0] < 0.1 * losses["clean"] and losses[0.5] > 0.5 * losses["clean"], losses


def test_an_ensemble_of_surrogates_is_trained_once_and_brewed_against_together(tmp_path, monkeypatch):
    """``ensemble: 2`` trains two surrogates of two seeds (cached: a second brew trains none); ``stagger`` stops the
    first halfway along the same schedule; the brew lowers the loss of both."""
    recipe = SurrogateRecipe(epochs=2, milestones=(1,), flip=False)
    settings = dict(target=(0,), ensemble=2, steps=20, surrogate=recipe)
    data = _data(tmp_path, **settings)
    context, clean = data.attack_context(), data._clean_data()[0]
    first, second = data.attack.surrogates(clean, context)[0]
    assert not torch.equal(first.model[0].weight, second.model[0].weight)
    alone = train_surrogate(clean.images, clean.labels, 10, recipe, seed=1)
    assert torch.equal(second.model[0].weight, alone.model[0].weight)  # the second is seed + 1's
    with monkeypatch.context() as patch:
        patch.setattr("delta_influence.surrogate.train_surrogate", lambda *a, **k: pytest.fail("surrogate retrained"))
        _data(tmp_path, **settings, eps=8.0)
    staggered, full = data.attack.__class__(**settings, stagger=True).surrogates(clean, context)[0]
    assert torch.equal(full.model[0].weight, second.model[0].weight)  # the last one trains to the end
    halfway = train_surrogate(clean.images, clean.labels, 10, recipe, seed=0, stop_after=1)
    assert torch.equal(staggered.model[0].weight, halfway.model[0].weight)
    poisons = clean.images[data.poison_indices].float() / 255
    labels, target = clean.labels[data.poison_indices], data.attack_test_set.images.float() / 255
    delta = data.train_set.images[data.poison_indices].float() / 255 - poisons
    for model in (first, second):
        assert _mismatch(model, poisons + delta, labels, target, 5) < _mismatch(model, poisons, labels, target, 5)
