"""Base data sets, loaded whole into uint8 tensors.

A new source subclasses ``ImageSource`` (``__init__(root, download, image_size)``, ``num_classes``, ``in_channels``,
``prepare_data`` that only downloads, ``load``) and adds itself to ``SOURCES``.
"""

import pickle
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional
from urllib.error import URLError

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image

from delta_influence.errors import ConfigError, DeltaInfluenceError

OFFLINE_CONFIG = "configs/digits_badnets.yaml"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class DataNotFoundError(DeltaInfluenceError, FileNotFoundError):
    """The data set is not on disk and could not be downloaded."""


@dataclass(frozen=True)
class ImageData:
    """A data set as tensors: images uint8 ``[N, C, H, W]``, labels int64 ``[N]``."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    classes: tuple[str, ...]


class ImageSource(ABC):
    """Where the clean images come from.

    Args:
        root: Folder of the data on disk.
        download: Download the data into ``root`` when it is absent (sources that can).
        image_size: Resize every image to this square size; ``None`` keeps the source's size.
    """

    num_classes: int
    in_channels: int

    def __init__(self, root: str = "data", download: bool = True, image_size: int | None = None) -> None:
        self.root = root
        self.download = download
        self.image_size = image_size

    def prepare_data(self) -> None:
        """Downloads the data if needed; loads nothing."""

    def class_names(self) -> Optional[tuple[str, ...]]:
        """The class names in label order, when known without loading the images (else ``None``)."""
        return None

    @abstractmethod
    def load(self) -> ImageData:
        """Reads the whole data set from disk."""

    def _sized(self, images: Tensor) -> Tensor:
        """The images resized to ``image_size`` when one is set."""
        if self.image_size is None or images.shape[-2:] == (self.image_size, self.image_size):
            return images
        return _resize(images, self.image_size)


class CIFAR10(ImageSource):
    """CIFAR-10 through torchvision (the python pickle batches), downloaded into ``root`` when absent."""

    num_classes = 10
    in_channels = 3
    dataset_class = torchvision.datasets.CIFAR10

    def prepare_data(self) -> None:
        if self._present():
            return
        where = f"{self.dataset_class.__name__} was not found under --data.root={self.root!r}"
        if not self.download:
            raise DataNotFoundError(f"{where} and download is off. {_DATA_FIX}")
        try:
            self.dataset_class(self.root, train=True, download=True)
            self.dataset_class(self.root, train=False, download=True)
        except (URLError, OSError, RuntimeError) as error:
            raise DataNotFoundError(f"{where} and could not be downloaded ({error}). {_DATA_FIX}") from error

    def load(self) -> ImageData:
        if not self._present():
            raise DataNotFoundError(
                f"{self.dataset_class.__name__} was not found under --data.root={self.root!r}. {_DATA_FIX}"
            )
        train = self.dataset_class(self.root, train=True, download=False)
        test = self.dataset_class(self.root, train=False, download=False)
        return ImageData(
            train_images=self._sized(torch.from_numpy(train.data).permute(0, 3, 1, 2).contiguous()),
            train_labels=torch.tensor(train.targets),
            test_images=self._sized(torch.from_numpy(test.data).permute(0, 3, 1, 2).contiguous()),
            test_labels=torch.tensor(test.targets),
            classes=tuple(train.classes),
        )

    def class_names(self) -> Optional[tuple[str, ...]]:
        meta = Path(self.root) / self.dataset_class.base_folder / self.dataset_class.meta["filename"]
        if not meta.is_file():
            return None
        with open(meta, "rb") as file:
            return tuple(pickle.load(file, encoding="latin1")[self.dataset_class.meta["key"]])

    def _present(self) -> bool:
        folder = Path(self.root) / self.dataset_class.base_folder
        return all((folder / name).exists() for name, _ in self.dataset_class.train_list + self.dataset_class.test_list)


class CIFAR100(CIFAR10):
    """CIFAR-100 (fine labels) through torchvision."""

    num_classes = 100
    dataset_class = torchvision.datasets.CIFAR100


class ImageFolder(ImageSource):
    """An image-folder tree ``root/{train,test}/<class>/<image>`` (``val`` in place of ``test`` is read as the test
    split, as in Imagenette's ``imagenette2-160/{train,val}/<wnid>/``). Classes are the folder names in sorted order,
    numerically when every name is a number (``2`` before ``10``), else alphabetically. Files without an image
    suffix (``IMAGE_SUFFIXES``) are skipped; an image file that cannot be read is refused by name.

    The extracted CIFAR-10 JPEG tree is one such tree.

    Images are read as RGB, or as grey when the first training image is grey. Nothing is downloaded.
    """

    def __init__(self, root: str = "data", download: bool = True, image_size: int | None = None) -> None:
        super().__init__(root, download, image_size)
        self.classes = self._classes()
        self.num_classes = len(self.classes)
        folder = Path(root) / "train" / self.classes[0]
        first = next((p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES), None)
        if first is None:
            raise DataNotFoundError(f"{folder} holds no images with suffix {IMAGE_SUFFIXES}.")
        self.in_channels = 1 if _decoded(first, ImageReadMode.UNCHANGED).shape[0] == 1 else 3

    def load(self) -> ImageData:
        train_images, train_labels = self._read("train")
        test_images, test_labels = self._read(self.test_split)
        return ImageData(train_images, train_labels, test_images, test_labels, self.classes)

    def _classes(self) -> tuple[str, ...]:
        train = Path(self.root) / "train"
        self.test_split = next((name for name in ("test", "val") if (Path(self.root) / name).is_dir()), None)
        if not train.is_dir() or self.test_split is None:
            raise DataNotFoundError(
                f"--data.root={self.root!r} has no 'train' and 'test' (or 'val') folders; an image folder needs "
                f"root/train/<class>/<image> and root/test/<class>/<image>. {_DATA_FIX}"
            )
        classes = sort_class_names(entry.name for entry in train.iterdir() if entry.is_dir())
        if len(classes) < 2:
            raise DataNotFoundError(f"{train} holds {len(classes)} class folders; a classifier needs at least 2.")
        return classes

    def class_names(self) -> tuple[str, ...]:
        return self.classes

    def _read(self, split: str) -> tuple[Tensor, Tensor]:
        mode = ImageReadMode.RGB if self.in_channels == 3 else ImageReadMode.GRAY
        images, labels = [], []
        for label, name in enumerate(self.classes):
            files = sorted(p for p in (Path(self.root) / split / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            for path in files:
                images.append(self._sized(_decoded(path, mode)))
                labels.append(label)
        if not images:
            raise DataNotFoundError(f"{Path(self.root) / split} holds no images with suffix {IMAGE_SUFFIXES}.")
        sizes = {tuple(image.shape) for image in images}
        if len(sizes) > 1:
            raise ConfigError(f"images under {self.root} differ in size {sorted(sizes)[:3]}; set --data.image_size.")
        return torch.stack(images), torch.tensor(labels)


class Digits(ImageSource):
    """scikit-learn's 1,797 real 8x8 handwritten digits, upscaled to ``image_size``, split once, seeded.

    Shipped inside the scikit-learn wheel, so it works offline: the project's small default data set.

    The 8x8 digits are upscaled to ``image_size`` (32 by default: Δ-Influence's elastic transformation needs more
    than 20 pixels). A fixed, seeded quarter of each class is the test set. ``root`` and ``download`` are unused.
    """

    num_classes = 10
    in_channels = 1
    test_fraction = 0.25
    split_seed = 0

    def class_names(self) -> tuple[str, ...]:
        return tuple(map(str, range(10)))

    def load(self) -> ImageData:
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = torch.from_numpy(digits.images).float()[:, None] / 16.0  # sklearn's digits range over 0..16
        images = _resize((pixels * 255).round().to(torch.uint8), self.image_size or 32)
        labels = torch.from_numpy(digits.target).long()
        generator = torch.Generator().manual_seed(self.split_seed)
        test = torch.zeros(len(labels), dtype=torch.bool)
        for label in range(self.num_classes):
            members = torch.nonzero(labels == label).flatten()
            members = members[torch.randperm(len(members), generator=generator)]
            test[members[: round(len(members) * self.test_fraction)]] = True
        return ImageData(images[~test], labels[~test], images[test], labels[test], self.class_names())


SOURCES: dict[str, type[ImageSource]] = {
    "cifar10": CIFAR10,
    "cifar100": CIFAR100,
    "folder": ImageFolder,
    "digits": Digits,
}


def _decoded(path: Path, mode: ImageReadMode) -> Tensor:
    """An image file as a uint8 tensor; a file that is not a readable image is refused by name."""
    try:
        return decode_image(str(path), mode=mode)
    except RuntimeError as error:
        raise ConfigError(
            f"{path} is not a readable image ({error}); remove it or replace it with a valid image. Files whose "
            f"suffix is not one of {', '.join(IMAGE_SUFFIXES)} are skipped."
        ) from error


def sort_class_names(names: Iterable[str]) -> tuple[str, ...]:
    """Class folder names in label order: numerically when every name is a number, else alphabetically.

    Example:
        >>> sort_class_names(["10", "2", "1"]), sort_class_names(["dog", "cat"])
        (('1', '2', '10'), ('cat', 'dog'))
    """
    names = list(names)
    if names and all(name.isdigit() for name in names):
        return tuple(sorted(names, key=lambda name: (int(name), name)))
    return tuple(sorted(names))


def _resize(images: Tensor, size: int) -> Tensor:
    """Bilinear resize of uint8 images ``[..., C, H, W]`` to ``size`` x ``size``."""
    batched = images if images.dim() == 4 else images[None]
    out = F.interpolate(batched.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    out = out.round().clamp(0, 255).to(torch.uint8)
    return out if images.dim() == 4 else out[0]


_DATA_FIX = (
    "Point --data.root at the data, or run offline on the bundled digits with "
    f"`python train.py fit --config {OFFLINE_CONFIG}`."
)
