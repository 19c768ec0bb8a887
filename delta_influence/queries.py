"""The misbehaving test example and its transformed copies: the queries of Δ-Influence."""

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torch.utils.data import TensorDataset

from delta_influence.errors import ConfigError

# The reference's transformations (Li et al., 2024). Each query copy draws one of them uniformly.
TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {
    "hflip": TF.horizontal_flip,
    "color_jitter": T.ColorJitter(brightness=(0.9, 1.1), contrast=(0.9, 1.1), saturation=(0.6, 1.4), hue=(-0.1, 0.1)),
    "affine": T.RandomAffine(degrees=(-180, 180), scale=(1, 2), shear=10),
    "elastic": T.ElasticTransform(alpha=150.0),
    "blur": T.GaussianBlur(kernel_size=(5, 9), sigma=(8, 10)),
    "invert": TF.invert,  # 1 - x on float tensors, in whatever space they are
    "channel_swap": lambda image: image[[1, 0, *range(2, image.shape[0])]] if image.shape[0] > 1 else image,
}
MIN_SIZE = 20  # ElasticTransform blurs its displacement field with a 41-pixel kernel, reflect-padded by 20


@dataclass(frozen=True)
class QuerySet:
    """Query 0 is the original example with the attacker's label; queries 1..n are transformed copies."""

    images: Tensor  # [1 + n, C, H, W], in the same space as the model's inputs
    labels: Tensor  # [1 + n], int64; labels[0] is the attacker's label, the others differ from it
    transforms: tuple[str, ...]  # "original" then the name of each copy's transformation


def make_queries(
    image: Tensor,
    label: int,
    num_classes: int,
    num_transforms: int = 50,
    seed: int = 0,
    space: Literal["normalized", "pixel"] = "normalized",
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> QuerySet:
    """Builds the original query and ``num_transforms`` transformed copies with random labels other than ``label``.

    Args:
        image: The misbehaving test example as the model sees it (normalised), shape ``[C, H, W]``.
        label: The attacker's label, which the model predicts for ``image``.
        num_classes: Number of classes; the copies' labels are drawn from the other ``num_classes - 1``.
        num_transforms: Number of transformed copies.
        seed: Same seed, same queries; the global random state is left untouched.
        space: ``"normalized"`` transforms the normalised tensor, as the reference does; ``"pixel"`` undoes the
            normalisation with ``mean`` and ``std``, transforms in [0, 1] pixel space, and normalises again.
        mean: Per-channel mean of the normalisation, needed for ``space="pixel"``.
        std: Per-channel standard deviation of the normalisation, needed for ``space="pixel"``.

    Returns:
        The ``1 + num_transforms`` queries.

    Example:
        >>> queries = make_queries(torch.zeros(3, 32, 32), label=5, num_classes=10, num_transforms=4)
        >>> queries.images.shape, queries.labels[0].item(), bool((queries.labels[1:] != 5).all())
        (torch.Size([5, 3, 32, 32]), 5, True)
    """
    if image.dim() != 3:
        raise ConfigError(f"image has shape {tuple(image.shape)}; expected one image of shape [C, H, W].")
    if min(image.shape[-2:]) <= MIN_SIZE:
        raise ConfigError(
            f"image is {image.shape[-2]}x{image.shape[-1]}; the elastic transformation (sigma 5) needs images larger "
            f"than {MIN_SIZE}x{MIN_SIZE}. Upscale the data set's images."
        )
    if not 0 <= label < num_classes:
        raise ConfigError(f"label={label} is out of range for num_classes={num_classes}.")
    if num_classes < 2 or num_transforms < 1:
        raise ConfigError(
            f"num_classes={num_classes} and num_transforms={num_transforms}: need at least 2 classes and 1 copy."
        )
    to_pixels, to_inputs = _space_maps(space, mean, std, image)

    generator = torch.Generator().manual_seed(seed)
    names = list(TRANSFORMS)
    picks = torch.randint(len(names), (num_transforms,), generator=generator)
    # a uniform label among the other classes: draw from num_classes - 1 and skip over the attacker's label
    labels = torch.randint(num_classes - 1, (num_transforms,), generator=generator)
    labels = labels + (labels >= label).long()

    copies = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # torchvision's random transforms draw from the global generator
        for pick in picks.tolist():
            copies.append(to_inputs(TRANSFORMS[names[pick]](to_pixels(image))))
    return QuerySet(
        images=torch.stack([image, *copies]),
        labels=torch.cat([torch.tensor([label]), labels]),
        transforms=("original", *(names[pick] for pick in picks.tolist())),
    )


def scoring_set(queries: QuerySet, contrast: Tensor) -> TensorDataset:
    """What one scoring pass of Δ-Influence scores, in the rows of its scores: the query and its transformed copies,
    then the clean contrast images, labelled with the query's label.

    Example:
        >>> queries = QuerySet(torch.zeros(3, 1, 2, 2), torch.tensor([5, 1, 7]), ("original", "flip", "invert"))
        >>> scoring_set(queries, torch.ones(2, 1, 2, 2)).tensors[1]
        tensor([5, 1, 7, 5, 5])
    """
    images = torch.cat([queries.images, contrast.to(queries.images.dtype)])
    labels = torch.cat([queries.labels, queries.labels[:1].expand(len(contrast))])
    return TensorDataset(images, labels)


def _space_maps(
    space: str, mean: Optional[Sequence[float]], std: Optional[Sequence[float]], image: Tensor
) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """Maps from model inputs to the space the transformations work in, and back."""
    if space == "normalized":
        return (lambda x: x), (lambda x: x)
    if space != "pixel":
        raise ConfigError(f"space={space!r} is not known; use 'normalized' or 'pixel'.")
    if mean is None or std is None:
        raise ConfigError("space='pixel' needs the normalisation's mean and std to undo it; pass both.")
    m = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return (lambda x: (x * s + m).clamp(0, 1)), (lambda x: (x - m) / s)
