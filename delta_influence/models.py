"""Classifier architectures, chosen by name (the config's model.arch, a surrogate's recipe)."""

from typing import Callable

import torchvision
from torch import nn

from delta_influence.errors import ConfigError


def resnet18_cifar(num_classes: int, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem: a 3x3 stride-1 first convolution and no max-pool."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def resnet18_imagenet(num_classes: int, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 as it is (7x7 stride-2 stem and max-pool), for larger images such as Imagenette's."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def small_cnn(num_classes: int, in_channels: int = 3) -> nn.Module:
    """A fast CNN for CPU runs: three conv-BN-ReLU-maxpool blocks (32, 64, 128 channels), global pooling, a linear
    head; about 10 M multiply-adds per 32x32 image."""
    layers: list[nn.Module] = []
    width_in = in_channels
    for width in (32, 64, 128):
        layers += [nn.Conv2d(width_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        layers.append(nn.MaxPool2d(2))
        width_in = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width_in, num_classes))


ARCHITECTURES: dict[str, Callable[[int, int], nn.Module]] = {
    "resnet18": resnet18_cifar,
    "resnet18_imagenet": resnet18_imagenet,
    "small_cnn": small_cnn,
}


def build_model(arch: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Builds the architecture named ``arch``; raises ``ValueError`` naming the choices when it is unknown."""
    if arch not in ARCHITECTURES:
        raise ConfigError(f"model.arch={arch!r} is not a known architecture; use one of {', '.join(ARCHITECTURES)}.")
    return ARCHITECTURES[arch](num_classes, in_channels)
