import pytest
import torch
from torch import nn

from lightning_modules import PoisonClassifier, build_model


def test_resnet18_has_the_cifar_stem():
    model = build_model("resnet18", num_classes=10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_small_cnn_takes_grey_images():
    assert build_model("small_cnn", num_classes=4, in_channels=1)(torch.randn(2, 1, 32, 32)).shape == (2, 4)


def test_unknown_architecture_names_the_choices():
    with pytest.raises(
        ValueError, match=r"model.arch='vgg' is not a known architecture; use one of resnet18, small_cnn"
    ):
        PoisonClassifier(arch="vgg")


def test_optimizer_and_schedule_follow_the_arguments():
    model = PoisonClassifier(arch="small_cnn", lr=0.2, momentum=0.8, weight_decay=1e-3, milestones=[3, 5], lr_gamma=0.5)
    config = model.configure_optimizers()
    group = config["optimizer"].param_groups[0]
    assert isinstance(config["optimizer"], torch.optim.SGD) and group["nesterov"]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.2, 0.8, 1e-3)
    assert config["lr_scheduler"].milestones == {3: 1, 5: 1} and config["lr_scheduler"].gamma == 0.5
    adamw = PoisonClassifier(arch="small_cnn", optimizer="adamw", lr=1e-3).configure_optimizers()["optimizer"]
    assert isinstance(adamw, torch.optim.AdamW)
