"""How a classifier is trained, shared by the Lightning classifier and the plain-torch surrogates that attacks train,
so that a surrogate trained "as the victim" cannot drift from it: the optimiser and the learning-rate milestones; and
the data module's augmentation (a random crop after zero padding, a random horizontal flip) in batch form, for the
surrogates and the brew (the data module draws the same distribution image by image)."""

from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from delta_influence.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")


def check_optimizer(optimizer: str, argument: str = "optimizer") -> None:
    """Refuses an optimiser ``make_optimizer`` does not know, naming the ``argument`` it came from."""
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"{argument}={optimizer!r} is not known; use one of {', '.join(map(repr, OPTIMIZERS))}.")


def make_optimizer(
    parameters: Iterable[Tensor], optimizer: str, lr: float, momentum: float, nesterov: bool, weight_decay: float
) -> torch.optim.Optimizer:
    """SGD (with ``momentum``, ``nesterov``) or AdamW, both with ``weight_decay``."""
    if optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    check_optimizer(optimizer)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)


def scheduled_epochs(milestones: Sequence[float], max_epochs: Optional[int]) -> list[int]:
    """The epochs at which the learning rate drops: fractions of ``max_epochs`` (all milestones in (0, 1), rounded
    to the nearest epoch) or epochs (whole numbers, each below ``max_epochs``).

    Example:
        >>> scheduled_epochs([0.35, 0.625, 0.875], 40), scheduled_epochs([0.35, 0.625, 0.875], 20)
        ([14, 25, 35], [7, 12, 18])
        >>> scheduled_epochs([8, 11], 12)
        [8, 11]
    """
    values = list(milestones)
    fix = (
        "give fractions of max_epochs, all in (0, 1) (e.g. [0.35, 0.625, 0.875]), or whole epochs below "
        "trainer.max_epochs"
    )
    if all(0 < value < 1 for value in values):
        if values and (max_epochs is None or max_epochs < 1):
            raise ConfigError(
                f"model.milestones={values} are fractions of trainer.max_epochs, which is {max_epochs}; set "
                "trainer.max_epochs or give the milestones as epochs."
            )
        return [round(value * max_epochs) for value in values]
    if not all(value >= 1 and float(value).is_integer() for value in values):
        raise ConfigError(f"model.milestones={values} mixes fractions and epochs (or holds values <= 0): {fix}.")
    beyond = [int(value) for value in values if max_epochs is not None and max_epochs > 0 and value >= max_epochs]
    if beyond:
        raise ConfigError(
            f"model.milestones={[int(v) for v in values]} holds {beyond}, at or beyond trainer.max_epochs="
            f"{max_epochs}, so the learning rate would never drop there: {fix}."
        )
    return [int(value) for value in values]


def flip_and_shift(images: Tensor, generator: torch.Generator, flip: bool = True, reach: int = 0) -> Tensor:
    """Each image of ``[N, C, H, W]`` (pixels in [0, 1]) flipped horizontally with probability 1/2 when ``flip``, and
    shifted by whole pixels, up to ``reach`` each way with zeros coming in: the data module's random crop after
    ``reach`` pixels of zero padding and its random flip, on a batch at once, differentiable in the images.

    Example:
        >>> image = torch.arange(4.0).view(1, 1, 1, 4)
        >>> flip_and_shift(image, torch.Generator().manual_seed(0), flip=False, reach=0).tolist()
        [[[[0.0, 1.0, 2.0, 3.0]]]]
    """
    count, _, height, width = images.shape
    if flip:
        flipped = (torch.rand(count, generator=generator) < 0.5).to(images.device)
        images = torch.where(flipped.view(-1, 1, 1, 1), images.flip(-1), images)
    if reach <= 0:
        return images
    shifts = torch.randint(-reach, reach + 1, (count, 2), generator=generator).float().to(images.device)
    theta = torch.zeros(count, 2, 3, device=images.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = 2 * shifts[:, 0] / width
    theta[:, 1, 2] = 2 * shifts[:, 1] / height
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)
