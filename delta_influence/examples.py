"""Test examples judged by the model's predictions: accuracy, the misbehaving query, and the clean contrast of its
label."""

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy

from delta_influence.errors import ConfigError


class ContrastError(ConfigError):
    """The clean contrast examples cannot be found."""


@contextmanager
def evaluating(module: nn.Module, device: Optional[torch.device] = None) -> Iterator[nn.Module]:
    """The module in eval mode (and on ``device``) for a block; its mode and device are restored after."""
    was_training = module.training
    home = next(module.parameters()).device
    module.eval()
    if device is not None:
        module.to(device)
    try:
        yield module
    finally:
        module.train(was_training)
        module.to(home)


@torch.no_grad()
def accuracy(
    model: nn.Module, dataset: Optional[Dataset], device: torch.device | str = "cpu", batch_size: int = 512
) -> Optional[float]:
    """Share of ``dataset`` that ``model`` classifies as labelled (``None`` for no data); on the attack's test set,
    labelled with what the attacker wants, it is the attack success rate. Every process evaluates the whole set
    itself: nothing is gathered from others.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> accuracy(nn.Linear(2, 2), TensorDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))) in (0.0, 1.0)
        True
    """
    if dataset is None or len(dataset) == 0:
        return None
    device = torch.device(device)
    metric = None
    with evaluating(model, device):
        for inputs, labels in DataLoader(dataset, batch_size=batch_size):
            logits = model(inputs.to(device))
            metric = metric or MulticlassAccuracy(logits.shape[-1], average="micro", sync_on_compute=False).to(device)
            metric.update(logits, torch.as_tensor(labels).to(device))
    return metric.compute().item()


@torch.no_grad()
def predictions(
    model: nn.Module, dataset: Dataset, device: torch.device | str = "cpu", batch_size: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's predicted classes on ``dataset`` and the dataset's labels, in order (on the CPU).

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> predicted, labels = predictions(nn.Linear(2, 3), TensorDataset(torch.zeros(4, 2), torch.ones(4).long()))
        >>> predicted.shape, labels.tolist()
        (torch.Size([4]), [1, 1, 1, 1])
    """
    predicted, labels = [], []
    with evaluating(model, torch.device(device)):
        for inputs, targets in DataLoader(dataset, batch_size=batch_size):
            predicted.append(model(inputs.to(device)).argmax(-1).cpu())
            labels.append(torch.as_tensor(targets))
    if not predicted:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(predicted), torch.cat(labels)


def _hits(model: nn.Module, dataset: Dataset, wanted: Optional[int], batch_size: int) -> Iterator[int]:
    """Indices, in order, of the samples the model classifies as their label (and whose label is ``wanted``)."""
    device = next(model.parameters()).device
    seen = 0
    with torch.no_grad(), evaluating(model):
        for inputs, labels in DataLoader(dataset, batch_size=batch_size):
            labels = torch.as_tensor(labels)
            keep = labels == wanted if wanted is not None else torch.ones_like(labels, dtype=torch.bool)
            if keep.any():
                predicted = model(inputs[keep].to(device)).argmax(-1).cpu()
                hits = torch.nonzero(keep).flatten()[predicted == labels[keep]]
                yield from (seen + int(index) for index in hits)
            seen += len(labels)


def first_attacked(model: nn.Module, triggered: Dataset, batch_size: int = 256) -> Optional[int]:
    """Index of the first attacked sample the model classifies as its label (the attacker's), or ``None``."""
    return next(_hits(model, triggered, None, batch_size), None)


def select_contrast(model: nn.Module, test_set: Dataset, label: int, count: int, batch_size: int = 256) -> list[int]:
    """The first ``count`` clean test samples of class ``label`` that the model classifies correctly.

    Raises:
        ContrastError: When fewer than ``count`` exist; the message says how many there are and what to do.
    """
    chosen = []
    for index in _hits(model, test_set, label, batch_size):
        chosen.append(index)
        if len(chosen) == count:
            return chosen
    fix = (
        "Lower num_contrast, give clean images of that class as contrast_images, or set num_contrast=0 and "
        "verification=None for the paper's rule without contrast (--detector.num_contrast 0 --detector.verification "
        "null)."
    )
    if not chosen:
        raise ContrastError(
            f"the clean test set has no sample of the query's label {label} that the model classifies correctly, so "
            f"the clean-class contrast has nothing to compare with. {fix}"
        )
    raise ContrastError(
        f"num_contrast={count}, but the model classifies only {len(chosen)} clean test samples of the query's label "
        f"{label} correctly. {fix}"
    )
