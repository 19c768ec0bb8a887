"""Classifier architectures, chosen by name (the config's model.arch, a surrogate's recipe), and the parts of any
classifier that detectors and the verification stage read: its head and the features feeding it."""

from typing import Callable

import torch
import torchvision
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from delta_influence.errors import ConfigError, UnsupportedModelError
from delta_influence.examples import evaluating


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


def head_of(model: nn.Module, why: str) -> nn.Linear:
    """The model's last ``nn.Linear`` layer, its classifier head; ``why`` says who needs one when there is none."""
    heads = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not heads:
        raise UnsupportedModelError(f"{type(model).__name__} has no nn.Linear layer: {why}")
    return heads[-1]


@torch.no_grad()
def penultimate_activations(
    model: nn.Module, dataset: Dataset, device: torch.device | str = "cpu", batch_size: int = 512
) -> Tensor:
    """The input of the model's last ``nn.Linear`` layer for every sample of ``dataset``, ``[N, D]``, read with a
    forward hook, so any classifier whose head is a linear layer works.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> penultimate_activations(model, TensorDataset(torch.zeros(5, 4), torch.zeros(5))).shape
        torch.Size([5, 3])
    """
    head = head_of(
        model,
        "activation-based detectors read the input of the last linear layer (the classifier head). Use an "
        "influence-based detector for this model.",
    )
    captured: list[Tensor] = []
    hook = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].flatten(1).cpu()))
    try:
        with evaluating(model, torch.device(device)):
            for inputs, _ in DataLoader(dataset, batch_size=batch_size):
                model(inputs.to(device))
    finally:
        hook.remove()
    return torch.cat(captured)
