from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from delta_influence.errors import ConfigError
from delta_influence.lightning_modules import PoisonClassifier, build_model
from delta_influence.training import scheduled_epochs

ROOT = Path(__file__).resolve().parents[1]


def test_resnet18_has_the_cifar_stem():
    model = build_model("resnet18", num_classes=10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_small_cnn_takes_grey_images():
    assert build_model("small_cnn", num_classes=4, in_channels=1)(torch.randn(2, 1, 32, 32)).shape == (2, 4)


def test_unknown_architecture_names_the_choices():
    with pytest.raises(
        ValueError,
        match=r"model.arch='vgg' is not a known architecture; use one of resnet18, resnet18_imagenet, small_cnn",
    ):
        PoisonClassifier(arch="vgg")


def test_optimizer_and_schedule_follow_the_arguments():
    model = PoisonClassifier(arch="small_cnn", lr=0.2, momentum=0.8, weight_decay=1e-3, milestones=[3, 5], lr_gamma=0.5)
    config = model.configure_optimizers()
    group = config["optimizer"].param_groups[0]
    assert isinstance(config["optimizer"], torch.optim.SGD) and group["nesterov"]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.2, 0.8, 1e-3)
    assert config["lr_scheduler"].milestones == {3: 1, 5: 1} and config["lr_scheduler"].gamma == 0.5
    adamw = PoisonClassifier(arch="small_cnn", optimizer="adamw", lr=1e-3, milestones=[2]).configure_optimizers()
    adamw = adamw["optimizer"]
    assert isinstance(adamw, torch.optim.AdamW)


@pytest.mark.parametrize("max_epochs, expected", [(40, [14, 25, 35]), (20, [7, 12, 18]), (25, [9, 16, 22])])
def test_fractional_milestones_follow_max_epochs(tmp_path, max_epochs, expected):
    from conftest import tiny_trainer

    model = PoisonClassifier(arch="small_cnn", in_channels=1)  # default: the paper's 14/25/35 of 40, as fractions
    model.trainer = tiny_trainer(tmp_path, max_epochs=max_epochs)
    assert sorted(model.configure_optimizers()["lr_scheduler"].milestones) == expected


@pytest.mark.parametrize(
    "milestones, max_epochs, message",
    [
        ([8, 11], 4, r"holds \[8, 11\], at or beyond trainer.max_epochs=4"),
        ([0.5, 3], 12, "mixes fractions and epochs"),
        ([0.5], -1, "fractions of trainer.max_epochs, which is -1"),
    ],
)
def test_milestones_that_cannot_take_effect_are_refused(tmp_path, milestones, max_epochs, message):
    from conftest import tiny_trainer

    model = PoisonClassifier(arch="small_cnn", in_channels=1, milestones=milestones)
    model.trainer = tiny_trainer(tmp_path, max_epochs=max_epochs)
    with pytest.raises(ConfigError, match=message):
        model.configure_optimizers()


@pytest.mark.parametrize("config", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda path: path.stem)
def test_shipped_configs_keep_their_schedules(config):
    """Written as fractions so that they follow max_epochs, the shipped schedules are still the epochs they were."""
    settings = yaml.safe_load(config.read_text())
    epochs = scheduled_epochs(settings["model"]["milestones"], settings["trainer"]["max_epochs"])
    expected = (
        {"digits_badnets": [8, 11]}
        | dict.fromkeys(  # the CPU benchmarks: 9 and 12 of 15 epochs
            ["cifar10_badnets_cpu", "cifar10_smooth_cpu", "cifar10_witches_brew_cpu"], [9, 12]
        )
        | dict.fromkeys(["cifar10_badnets_full", "cifar10_smooth_full"], [18, 24])
    )  # and of 30 at full scale
    assert epochs == expected.get(config.stem, [14, 25, 35])


def test_evaluation_sets_are_logged_by_name_not_position(tmp_path):
    """A third evaluation set is logged under its own name; only the set named ``attack`` is ASR."""
    from conftest import tiny_trainer
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = PoisonClassifier(arch="small_cnn", num_classes=3, in_channels=1)
    images = torch.randn(12, 1, 32, 32)
    with torch.no_grad():
        predicted = model.eval()(images).argmax(-1)
    right, wrong = TensorDataset(images, predicted), TensorDataset(images, (predicted + 1) % 3)
    loaders = {"clean": DataLoader(right, batch_size=4), "extra": DataLoader(wrong, batch_size=4),
               "attack": DataLoader(wrong, batch_size=4)}  # fmt: skip
    (clean, extra, attack) = tiny_trainer(tmp_path).validate(model, dataloaders=loaders, verbose=False)
    assert clean == {"val/acc": 1.0} and extra == {"val/extra_acc": 0.0} and attack == {"val/asr": 0.0}
    loaders["extra"] = DataLoader(right, batch_size=4)  # the extra set's accuracy never leaks into ASR
    results = tiny_trainer(tmp_path).validate(model, dataloaders=loaders, verbose=False)
    assert results[1] == {"val/extra_acc": 1.0} and results[2] == {"val/asr": 0.0}
    # a plain list has no names: the first loader is clean, the others are named by position, never ASR
    listed = tiny_trainer(tmp_path).validate(model, dataloaders=[loaders["clean"], loaders["attack"]], verbose=False)
    assert listed == [{"val/acc": 1.0}, {"val/set1_acc": 0.0}]
