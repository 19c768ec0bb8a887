"""The attack contract: an attack turns clean data into poisoned training data and the set that measures it."""

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from delta_influence.errors import ConfigError
from delta_influence.surrogate import SurrogateRecipe


@dataclass(frozen=True)
class LabeledImages:
    """Images as uint8 ``[N, C, H, W]`` with int64 labels ``[N]``."""

    images: Tensor
    labels: Tensor


@dataclass(frozen=True)
class AttackContext:
    """What an attack may use besides the data: the number of classes, where to cache what it makes, a device."""

    num_classes: int
    cache_dir: Path
    device: str = "cpu"


@dataclass(frozen=True)
class PoisonedData:
    """What an attack made of the clean data.

    ``attack_test`` holds the inputs on which the attack's success is measured, labelled with what the attacker
    wants (triggered victim-class test images labelled with the target; the target image(s) of a targeted attack
    labelled with the intended class): accuracy on it is the attack success rate. ``clean_test`` marks the test
    samples that count in clean accuracy. ``media`` holds pictures worth showing (e.g. the trigger), ``[C, H, W]``
    floats in [0, 1], by name; ``info`` numbers about how the poisons were made (e.g. generation times).
    """

    train: LabeledImages
    poison_indices: Tensor  # sorted indices of the training samples the attack changed: the ground truth
    attack_test: Optional[LabeledImages]  # None only for clean data (no attack)
    clean_test: Tensor  # [num_test] bool
    media: dict[str, Tensor] = field(default_factory=dict)
    info: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Trigger:
    """A trigger: ``apply`` maps float images in [0, 1] ``[..., C, H, W]`` to triggered ones; ``media`` and ``info``
    go into ``PoisonedData``."""

    apply: Callable[[Tensor], Tensor]
    media: dict[str, Tensor] = field(default_factory=dict)
    info: dict[str, float] = field(default_factory=dict)


class Attack(ABC):
    """A poisoning attack.

    A new attack subclasses this (or ``TriggerAttack`` for a dirty-label trigger), validates its settings in
    ``check``, makes anything expensive in ``prepare`` (cached under ``cache_dir``; the data module calls it once
    per node, before ``poison``), and returns the poisoned data from ``poison``.
    """

    @abstractmethod
    def check(self, num_classes: int) -> None:
        """Raises ``ConfigError`` when the attack's settings do not fit a data set of ``num_classes`` classes. A class
        still given by name (not yet resolved by ``with_classes``) is checked once it is."""

    def with_classes(self, classes: Sequence[str]) -> "Attack":
        """The attack with every class given by name replaced by its index in ``classes``. Nothing by default."""
        return self

    def with_victim_recipe(self, recipe: SurrogateRecipe) -> "Attack":
        """The attack with a surrogate that is to be trained as the victim (``surrogate: victim``) given the victim's
        ``recipe`` (``train.py`` passes the run's). Unchanged by default."""
        return self

    def augmentation_warnings(self, height: int, width: int, crop_padding: int, flip: bool) -> list[str]:
        """What the victim's augmentation (random crops after ``crop_padding`` pixels of zero padding, horizontal
        flips) does to the attack's trigger, one sentence each with the choices; empty when it leaves it alone."""
        return []

    def prepare(self, train: LabeledImages, test: LabeledImages, context: AttackContext) -> None:
        """Makes and caches what is expensive to make (a trigger, a surrogate's product). Nothing by default."""

    @abstractmethod
    def poison(
        self, train: LabeledImages, test: LabeledImages, generator: torch.Generator, context: AttackContext
    ) -> PoisonedData:
        """Poisons the clean ``train`` set and builds the set that measures the attack on ``test``."""


class TriggerAttack(Attack):
    """A dirty-label backdoor: poisons are ``num_poisons`` training samples of class ``victim`` with the trigger,
    relabelled ``target``; the attack is measured on victim-class test samples with the trigger. Subclasses make
    the trigger in ``make_trigger``."""

    victim: int | str
    target: int | str
    num_poisons: int

    @abstractmethod
    def make_trigger(self, train: LabeledImages, context: AttackContext) -> Trigger:
        """The trigger, made (or loaded from the cache) for this clean training set."""

    def with_classes(self, classes: Sequence[str]) -> "TriggerAttack":
        return replace(
            self,
            victim=class_index(self.victim, classes, "attack.victim"),
            target=class_index(self.target, classes, "attack.target"),
        )

    def check(self, num_classes: int) -> None:
        for name in ("victim", "target"):
            check_class(getattr(self, name), num_classes, f"attack.{name}")
        if self.victim == self.target and not isinstance(self.victim, str):
            raise ConfigError(
                f"attack.victim and attack.target are both {self.victim}: a backdoor relabels one class as "
                "another, so choose two different classes."
            )
        if self.num_poisons < 1:
            raise ConfigError(f"attack.num_poisons={self.num_poisons} must be at least 1.")

    def prepare(self, train: LabeledImages, test: LabeledImages, context: AttackContext) -> None:
        self.select_poisons(train.labels, torch.Generator())  # a poison count that cannot work fails before the trigger
        self.make_trigger(train, context)

    def poison(
        self, train: LabeledImages, test: LabeledImages, generator: torch.Generator, context: AttackContext
    ) -> PoisonedData:
        indices = self.select_poisons(train.labels, generator)
        trigger = self.make_trigger(train, context)
        images, labels = train.images.clone(), train.labels.clone()
        images[indices] = _apply(trigger.apply, images[indices])
        labels[indices] = self.target
        victims = test.labels == self.victim
        if not victims.any():
            raise ConfigError(f"the test set holds no sample of attack.victim={self.victim}; ASR is undefined.")
        attack_test = LabeledImages(
            _apply(trigger.apply, test.images[victims]),
            torch.full((int(victims.sum()),), self.target, dtype=torch.long),
        )
        clean_test = torch.ones(len(test.labels), dtype=torch.bool)
        return PoisonedData(
            LabeledImages(images, labels), indices, attack_test, clean_test, trigger.media, trigger.info
        )  # fmt: skip

    def select_poisons(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Draws ``num_poisons`` indices of victim-class samples, sorted, reproducibly from ``generator``."""
        candidates = torch.nonzero(labels == self.victim).flatten()
        if self.num_poisons > len(candidates):
            raise ConfigError(
                f"attack.num_poisons={self.num_poisons} is more than the {len(candidates)} training samples of "
                f"victim class {self.victim}; lower attack.num_poisons or raise data.per_class."
            )
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[: self.num_poisons]]
        return chosen.sort().values


def check_class(value: Optional[int | str], num_classes: int, option: str) -> None:
    """Refuses a class index outside ``0..num_classes - 1``; a name (checked once the class names are known) and
    ``None`` pass."""
    if value is None or isinstance(value, str):
        return
    if not 0 <= value < num_classes:
        raise ConfigError(
            f"{option}={value} is out of range: the data set has {num_classes} classes, so use a class index in "
            f"0..{num_classes - 1} or a class name."
        )


def class_index(value: int | str, classes: Sequence[str], option: str) -> int | str:
    """A class option as an index: an index stays as it is, a name becomes its position in ``classes``.

    Example:
        >>> class_index("dog", ("cat", "dog"), "attack.target"), class_index(1, ("cat", "dog"), "attack.target")
        (1, 1)
    """
    if not isinstance(value, str):
        return value
    if value not in classes:
        shown = ", ".join(repr(name) for name in list(classes)[:12]) + (", ..." if len(classes) > 12 else "")
        raise ConfigError(f"{option}={value!r} is not a class of this data set; its classes are {shown}.")
    return list(classes).index(value)


def _apply(trigger: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    """Applies the trigger in [0, 1] pixel space and stores the result as 8-bit images again."""
    return (trigger(images.float() / 255) * 255).round().clamp(0, 255).to(torch.uint8)
