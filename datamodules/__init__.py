"""Lightning data modules: a base data set plus an attack."""

from delta_influence.datamodules.poisoned import ImageDataset, PoisonedDataModule
from delta_influence.datamodules.sources import (
    CIFAR10,
    CIFAR100,
    SOURCES,
    DataNotFoundError,
    Digits,
    ImageData,
    ImageFolder,
)

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "SOURCES",
    "DataNotFoundError",
    "Digits",
    "ImageData",
    "ImageDataset",
    "ImageFolder",
    "PoisonedDataModule",
]
