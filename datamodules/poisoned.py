"""A base data set plus an attack: poisoned train, eval-form train, clean test and triggered test sets."""

from typing import Optional, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from datamodules.sources import SOURCES, ImageData, ImageSource
from delta_influence.attacks import Attack, BadNets
from delta_influence.unlearning import retained_indices


class ImageDataset(Dataset):
    """uint8 images held in memory, returned normalised as ``(image, label)``, optionally augmented.

    Augmentation is a random crop with zero padding and a random horizontal flip, the CIFAR recipe.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: Tensor,
        std: Tensor,
        augment: bool = False,
        crop_padding: int = 4,
        flip: bool = True,
    ) -> None:
        self.images = images
        self.labels = labels
        self.mean = mean.view(-1, 1, 1)
        self.std = std.view(-1, 1, 1)
        self.augment = augment
        self.crop_padding = crop_padding
        self.flip = flip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index].float() / 255
        if self.augment:
            image = self._augment(image)
        return (image - self.mean) / self.std, self.labels[index]

    def _augment(self, image: Tensor) -> Tensor:
        """Random crop after zero padding, then a random horizontal flip."""
        pad = self.crop_padding
        if pad > 0:
            height, width = image.shape[-2:]
            padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
            top, left = torch.randint(2 * pad + 1, (2,)).tolist()
            image = padded[:, top : top + height, left : left + width]
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image


class PoisonedDataModule(pl.LightningDataModule):
    """A base data set poisoned by an attack.

    After ``setup`` it holds:

    - ``train_set``: the poisoned training set, augmented (for training);
    - ``eval_train_set``: the same samples without augmentation, fixed order, so index i is always sample i;
    - ``poison_indices``: the ground-truth poison indices into both;
    - ``test_set``: the clean test set; ``triggered_test_set``: test samples of the victim class with the
      trigger, labelled with the target class (accuracy on it is the attack success rate);
    - ``mean`` and ``std`` of the normalisation, and ``classes``.

    Args:
        dataset: Base data set: ``cifar10``, ``cifar100``, ``folder`` (``root/{train,test}/<class>/<image>``) or
            ``digits`` (scikit-learn's handwritten digits, offline).
        root: Folder of the data on disk.
        download: Download the data into ``root`` when it is absent (torchvision data sets).
        image_size: Resize every image to this square size; ``None`` keeps the data set's size.
        attack: The poisoning attack; ``None`` trains on clean data.
        per_class: Keep a seeded subset of this many training images per class (before poisoning); ``None``
            keeps all.
        batch_size: Training batch size.
        eval_batch_size: Batch size of the evaluation loaders.
        num_workers: Data loader workers.
        crop_padding: Padding (pixels) of the random-crop augmentation; 0 turns cropping off.
        flip: Random horizontal flips in training.
        seed: Seed of the subset and of the choice of poisons.
    """

    def __init__(
        self,
        dataset: str = "cifar10",
        root: str = "data",
        download: bool = True,
        image_size: Optional[int] = None,
        attack: Optional[Attack] = BadNets(),
        per_class: Optional[int] = None,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        crop_padding: int = 4,
        flip: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if dataset not in SOURCES:
            raise ValueError(f"data.dataset={dataset!r} is not known; use one of {', '.join(SOURCES)}.")
        if per_class is not None and per_class < 1:
            raise ValueError(f"data.per_class={per_class} must be at least 1, or null to keep every image.")
        self.source: ImageSource = SOURCES[dataset](root, download, image_size)
        if attack is not None:
            attack.check(self.source.num_classes)
        self.attack = attack
        self.per_class = per_class
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.crop_padding = crop_padding
        self.flip = flip
        self.seed = seed
        self._ready = False

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def in_channels(self) -> int:
        return self.source.in_channels

    def prepare_data(self) -> None:
        self.source.prepare_data()

    def setup(self, stage: Optional[str] = None) -> None:
        if self._ready:
            return
        data = self.source.load()
        generator = torch.Generator().manual_seed(self.seed)
        images, labels = _take_per_class(data.train_images, data.train_labels, self.per_class, generator)
        self.classes = data.classes
        self.mean, self.std = _channel_stats(images)
        images, labels = images.clone(), labels.clone()
        self.poison_indices = torch.zeros(0, dtype=torch.long)
        if self.attack is not None:
            self.poison_indices = self.attack.select_poisons(labels, generator)
            images[self.poison_indices] = self._triggered(images[self.poison_indices])
            labels[self.poison_indices] = self.attack.target
        self.train_set = self._dataset(images, labels, augment=True)
        self.eval_train_set = self._dataset(images, labels)
        self.test_set = self._dataset(data.test_images, data.test_labels)
        self.triggered_test_set = self._triggered_test_set(data)
        self._ready = True

    def train_dataset_without(self, indices: Sequence[int] | Tensor) -> Dataset:
        """The augmented training set without ``indices`` (e.g. flagged samples), for retraining."""
        return Subset(self.train_set, retained_indices(len(self.train_set), indices))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()

    def _eval_loaders(self) -> list[DataLoader]:
        """Clean test set first, then the triggered test set when there is an attack."""
        sets = [self.test_set] + ([self.triggered_test_set] if self.triggered_test_set is not None else [])
        return [self._loader(dataset, self.eval_batch_size) for dataset in sets]

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _dataset(self, images: Tensor, labels: Tensor, augment: bool = False) -> ImageDataset:
        return ImageDataset(images, labels, self.mean, self.std, augment, self.crop_padding, self.flip)

    def _triggered(self, images: Tensor) -> Tensor:
        """Applies the trigger in [0, 1] pixel space and stores the result as 8-bit images again."""
        return (self.attack.apply_trigger(images.float() / 255) * 255).round().clamp(0, 255).to(torch.uint8)

    def _triggered_test_set(self, data: ImageData) -> Optional[ImageDataset]:
        if self.attack is None:
            return None
        victims = data.test_labels == self.attack.victim
        if not victims.any():
            raise ValueError(f"the test set holds no sample of attack.victim={self.attack.victim}; ASR is undefined.")
        images = self._triggered(data.test_images[victims])
        return self._dataset(images, torch.full((len(images),), self.attack.target, dtype=torch.long))


def _take_per_class(
    images: Tensor, labels: Tensor, per_class: Optional[int], generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """A seeded subset of ``per_class`` images of each class, in the original order."""
    if per_class is None:
        return images, labels
    keep = []
    for label in labels.unique():
        members = torch.nonzero(labels == label).flatten()
        keep.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    order = torch.cat(keep).sort().values
    return images[order], labels[order]


def _channel_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation of uint8 images in [0, 1] units."""
    pixels = images.float().div(255).transpose(0, 1).reshape(images.shape[1], -1)
    return pixels.mean(dim=1), pixels.std(dim=1)
