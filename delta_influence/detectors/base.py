"""The detector contract: what a poison detector gets, what it returns, and the penultimate-layer activations that
several of them read."""

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from delta_influence.errors import ConfigError, UnsupportedModelError
from delta_influence.evidence import Evidence
from delta_influence.examples import evaluating
from delta_influence.influence import DataPartitions


@dataclass
class DetectionInput:
    """Everything a detector may use. Each detector takes what it needs and refuses to run without it.

    ``train_set`` is the training set in evaluation form (``(input, label)`` pairs, fixed order, no augmentation):
    flagged indices point into it. ``query`` is the misbehaving example (input, attacker's label) and ``contrast``
    clean inputs of that label, for the influence detectors. ``clean_set`` is clean held-out data (the test set),
    for detectors that train on clean images. ``poison_indices`` is the ground truth: only the oracle bounds read it.
    ``partitions``: the processes of a distributed run that share the influence passes (this one is process 0).
    """

    model: nn.Module
    train_set: Dataset
    num_classes: int
    factors_dir: Path = Path("influence_cache")
    query: Optional[tuple[Tensor, int]] = None
    contrast: Optional[Tensor] = None
    clean_set: Optional[Dataset] = None
    poison_indices: Optional[Tensor] = None
    device: torch.device | str = "cpu"
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None
    partitions: Optional[DataPartitions] = None


@dataclass
class Detection:
    """A detector's answer: sorted flagged training indices, a per-sample suspicion score where the detector has one
    (higher is more suspicious), its evidence when it has files of its own, and how long it took."""

    detector: str
    flagged: Tensor
    scores: Optional[Tensor] = None
    evidence: Optional[Evidence] = None
    seconds: float = 0.0
    info: dict[str, float] = field(default_factory=dict)


class Detector(ABC):
    """A poison detector. Subclasses set ``name`` and write ``_detect``; ``detect`` times it and sorts the answer.

    A detector says what the audit pipeline must find for it: ``needs_query`` (the misbehaving test example, chosen
    and checked against the model) and ``num_contrast`` (that many clean test images of the query's label). The
    clean test set and the ground truth are passed whenever the data has them."""

    name: str = "detector"
    title: ClassVar[str] = ""  # how the console names it; default: ``name``
    needs_query: ClassVar[bool] = False
    num_contrast: int = 0

    def check_model(self, model: nn.Module) -> None:
        """Refuses a model the detector cannot work with, before anything is computed."""

    def detect(self, inputs: DetectionInput) -> Detection:
        start = time.perf_counter()
        detection = self._detect(inputs)
        detection.flagged = torch.as_tensor(detection.flagged, dtype=torch.long).unique().sort().values
        detection.seconds = time.perf_counter() - start
        return detection

    @abstractmethod
    def _detect(self, inputs: DetectionInput) -> Detection:
        """Flags training samples of ``inputs.train_set``."""


def require(value: Any, what: str, detector: str) -> Any:
    """``value``, or a clear error saying that ``detector`` needs ``what``."""
    if value is None:
        raise ConfigError(f"the {detector} detector needs {what}, and none was given.")
    return value


def head_of(model: nn.Module, why: str) -> nn.Linear:
    """The model's last ``nn.Linear`` layer, its classifier head; ``why`` says who needs one when there is none."""
    heads = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not heads:
        raise UnsupportedModelError(f"{type(model).__name__} has no nn.Linear layer: {why}")
    return heads[-1]


@torch.no_grad()
def penultimate_activations(
    model: nn.Module, dataset: Dataset, device: torch.device | str = "cpu", batch_size: int = 512
) -> Tensor:
    """The input of the model's last ``nn.Linear`` layer for every sample of ``dataset``, ``[N, D]``, read with a
    forward hook, so any classifier whose head is a linear layer works.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> penultimate_activations(model, TensorDataset(torch.zeros(5, 4), torch.zeros(5))).shape
        torch.Size([5, 3])
    """
    head = head_of(
        model,
        "activation-based detectors read the input of the last linear layer (the classifier head). Use an "
        "influence-based detector for this model.",
    )
    captured: list[Tensor] = []
    hook = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].flatten(1).cpu()))
    try:
        with evaluating(model, torch.device(device)):
            for inputs, _ in DataLoader(dataset, batch_size=batch_size):
                model(inputs.to(device))
    finally:
        hook.remove()
    return torch.cat(captured)


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
