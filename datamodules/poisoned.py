"""A base data set plus an attack: poisoned train, eval-form train, clean test and attack test sets."""

from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from delta_influence.attacks import Attack, BadNets
from delta_influence.attacks.base import AttackContext, LabeledImages, PoisonedData
from delta_influence.datamodules.sources import SOURCES, ImageSource
from delta_influence.errors import ConfigError, DeltaInfluenceWarning


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
    - ``test_set``: the clean test set (without the samples a targeted attack aims at);
    - ``attack_test_set``: the inputs on which the attack is measured, labelled with what the attacker wants
      (accuracy on it is the attack success rate);
    - ``eval_sets``: the evaluation sets by name, ``{"clean": test_set, "attack": attack_test_set}``, which the
      validation and test loaders follow;
    - ``attack_media``: pictures of the attack (e.g. its trigger) by name, and ``attack_info``, numbers about how
      the poisons were made (e.g. generation times);
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
        cache_dir: Where attacks cache what they generate (triggers, brewed poisons); default ``<root>/attack_cache``.
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
        cache_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        if dataset not in SOURCES:
            raise ConfigError(f"data.dataset={dataset!r} is not known; use one of {', '.join(SOURCES)}.")
        if per_class is not None and per_class < 1:
            raise ConfigError(f"data.per_class={per_class} must be at least 1, or null to keep every image.")
        self.source: ImageSource = SOURCES[dataset](root, download, image_size)
        if attack is not None:
            classes = self.source.class_names()
            attack = attack.with_classes(classes) if classes else attack  # names resolve now, or once loaded
            attack.check(self.source.num_classes)
        self.attack = attack
        self.per_class = per_class
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.crop_padding = crop_padding
        self.flip = flip
        self.seed = seed
        self.cache_dir = Path(cache_dir) if cache_dir else Path(root) / "attack_cache"
        self._clean: Optional[tuple] = None
        self._ready = False

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def in_channels(self) -> int:
        return self.source.in_channels

    def prepare_data(self) -> None:
        """Downloads the data and lets the attack make what it caches; runs once per node."""
        self.source.prepare_data()
        if self.attack is not None:
            train, test, _, _ = self._clean_data()
            self.attack.prepare(train, test, self.attack_context())

    def setup(self, stage: Optional[str] = None) -> None:
        if self._ready:
            return
        train, test, self.classes, state = self._clean_data()
        self.mean, self.std = _channel_stats(train.images)
        if self.attack is None:
            nothing, everything = torch.zeros(0, dtype=torch.long), torch.ones(len(test.labels), dtype=torch.bool)
            poisoned = PoisonedData(train, nothing, None, everything)
        else:
            height, width = train.images.shape[-2:]
            for warning in self.attack.augmentation_warnings(height, width, self.crop_padding, self.flip):
                rank_zero_warn(warning, category=DeltaInfluenceWarning)
            generator = torch.Generator()
            generator.set_state(state)  # the seeded stream goes on from the subset's draws to the attack's
            poisoned = self.attack.poison(train, test, generator, self.attack_context())
        self.poison_indices = poisoned.poison_indices
        self.attack_media = poisoned.media
        self.attack_info = poisoned.info
        self.train_set = self._dataset(poisoned.train, augment=True)
        self.eval_train_set = self._dataset(poisoned.train)
        keep = poisoned.clean_test
        self.test_set = self._dataset(LabeledImages(test.images[keep], test.labels[keep]))
        self.attack_test_set = self._dataset(poisoned.attack_test) if poisoned.attack_test is not None else None
        self._clean = None  # the datasets hold what they need
        self._ready = True

    @property
    def eval_sets(self) -> dict[str, Dataset]:
        """The evaluation sets by name: ``clean`` (clean accuracy) and, with an attack, ``attack`` (its success)."""
        sets = {"clean": self.test_set}
        if self.attack_test_set is not None:
            sets["attack"] = self.attack_test_set
        return sets

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> dict[str, DataLoader]:
        return {name: self._loader(dataset, self.eval_batch_size) for name, dataset in self.eval_sets.items()}

    def test_dataloader(self) -> dict[str, DataLoader]:
        return self.val_dataloader()

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _dataset(self, data: LabeledImages, augment: bool = False) -> ImageDataset:
        return ImageDataset(data.images, data.labels, self.mean, self.std, augment, self.crop_padding, self.flip)

    def _clean_data(self) -> tuple[LabeledImages, LabeledImages, tuple[str, ...], Tensor]:
        """The clean training subset, the test set, the class names and the seeded generator's state after the
        subset's draws; loaded once per process."""
        if self._clean is None:
            data = self.source.load()
            if self.attack is not None:
                self.attack = self.attack.with_classes(data.classes)
                self.attack.check(self.num_classes)
            generator = torch.Generator().manual_seed(self.seed)
            images, labels = _take_per_class(data.train_images, data.train_labels, self.per_class, generator)
            train, test = LabeledImages(images, labels), LabeledImages(data.test_images, data.test_labels)
            self._clean = (train, test, data.classes, generator.get_state())
        return self._clean

    def attack_context(self) -> AttackContext:
        return AttackContext(self.num_classes, self.cache_dir, "cuda" if torch.cuda.is_available() else "cpu")


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
