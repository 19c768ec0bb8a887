"""Splitting a training set into the samples to forget and the samples to keep."""

from typing import Sequence

import torch
from torch import Tensor


def retained_indices(num_samples: int, drop: Sequence[int] | Tensor) -> list[int]:
    """The indices ``0..num_samples-1`` without ``drop``, refusing indices outside that range.

    Example:
        >>> retained_indices(5, [1, 3])
        [0, 2, 4]
    """
    drop = torch.as_tensor(drop, dtype=torch.long)
    if len(drop) and (drop.min() < 0 or drop.max() >= num_samples):
        bad = drop[(drop < 0) | (drop >= num_samples)][:5].tolist()
        raise IndexError(
            f"indices {bad} lie outside 0..{num_samples - 1}, the training set's index range: were they made for "
            "another data set or subset?"
        )
    keep = torch.ones(num_samples, dtype=torch.bool)
    keep[drop] = False
    return torch.nonzero(keep).flatten().tolist()
