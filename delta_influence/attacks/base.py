from abc import ABC, abstractmethod

import torch
from torch import Tensor


class Attack(ABC):
    """A dirty-label backdoor: poisons are ``num_poisons`` samples of class ``victim``, triggered and relabelled
    ``target``. Subclasses define the trigger."""

    victim: int
    target: int
    num_poisons: int

    @abstractmethod
    def apply_trigger(self, images: Tensor) -> Tensor:
        """Returns triggered copies of float images in [0, 1] pixel space, shape ``[..., C, H, W]``."""

    def check(self, num_classes: int) -> None:
        """Raises ``ValueError`` when the attack's classes do not fit a data set of ``num_classes`` classes."""
        for name in ("victim", "target"):
            value = getattr(self, name)
            if not 0 <= value < num_classes:
                raise ValueError(
                    f"attack.{name}={value} is out of range: the data set has {num_classes} classes, "
                    f"so use a class index in 0..{num_classes - 1}."
                )
        if self.victim == self.target:
            raise ValueError(
                f"attack.victim and attack.target are both {self.victim}: a backdoor relabels one class as "
                "another, so choose two different classes."
            )
        if self.num_poisons < 1:
            raise ValueError(f"attack.num_poisons={self.num_poisons} must be at least 1.")

    def select_poisons(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Draws ``num_poisons`` indices of victim-class samples, sorted, reproducibly from ``generator``."""
        candidates = torch.nonzero(labels == self.victim).flatten()
        if self.num_poisons > len(candidates):
            raise ValueError(
                f"attack.num_poisons={self.num_poisons} is more than the {len(candidates)} training samples of "
                f"victim class {self.victim}; lower attack.num_poisons or raise data.per_class."
            )
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[: self.num_poisons]]
        return chosen.sort().values
