"""Reading a training set as the core needs it: each sample's label, all its inputs at once, and the samples a
corrective fit keeps."""

from typing import Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset


def labels_of(dataset: Dataset) -> Tensor:
    """The labels of every sample, in order: the dataset's ``labels`` tensor when it has one (a ``Subset``'s from its
    base's), else read off a pass.

    Example:
        >>> labels_of(torch.utils.data.TensorDataset(torch.zeros(3, 2), torch.tensor([2, 0, 2])))
        tensor([2, 0, 2])
        >>> class Labelled(torch.utils.data.TensorDataset):
        ...     labels = torch.tensor([2, 0, 1])
        >>> labels_of(Subset(Labelled(torch.zeros(3, 2)), [2, 0]))
        tensor([1, 2])
    """
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, Tensor) and labels.shape == (len(dataset),):
        return labels.long()
    if isinstance(dataset, Subset):  # the base's labels at the subset's indices, without a pass over the images
        base = getattr(dataset.dataset, "labels", None)
        if isinstance(base, Tensor) and base.shape == (len(dataset.dataset),):
            return base[torch.as_tensor(dataset.indices, dtype=torch.long)].long()
    return torch.cat([torch.as_tensor(labels).long() for _, labels in DataLoader(dataset, batch_size=1024)])


def inputs_of(dataset: Dataset) -> Tensor:
    """Every sample's input, in order, as one tensor (one pass: for the detectors that look at the whole set at once).

    Example:
        >>> inputs_of(torch.utils.data.TensorDataset(torch.arange(6.0).view(3, 2), torch.tensor([2, 0, 2]))).shape
        torch.Size([3, 2])
    """
    return torch.cat([torch.as_tensor(inputs) for inputs, _ in DataLoader(dataset, batch_size=1024)])


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
