"""The detector contract: what a poison detector gets and what it returns."""

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from delta_influence.datasets import labels_of
from delta_influence.errors import ConfigError
from delta_influence.evidence import Evidence
from delta_influence.influence import DataPartitions


@dataclass
class DetectionInput:
    """Everything a detector may use. Each detector takes what it needs and refuses to run without it.

    ``train_set`` is the training set in evaluation form (``(input, label)`` pairs, fixed order, no augmentation):
    flagged indices point into it. ``query`` is the misbehaving example (input, attacker's label) and ``contrast``
    clean inputs of that label, for the influence detectors. ``clean_set`` is clean held-out data (the test set),
    from which detectors that need clean images draw them (``clean_sample``). ``poison_indices`` is the ground
    truth: only the oracle bounds read it. ``partitions``: the processes of a distributed run that share the
    influence passes (this one is process 0).
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


def clean_sample(inputs: DetectionInput, count: int, seed: int, detector: str) -> Subset:
    """``count`` clean held-out images for ``detector``, drawn the same way for every detector that needs some: an
    equal, seeded share of each label of ``inputs.clean_set`` (the test set). Refuses a run without enough of them.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> held_out = TensorDataset(torch.zeros(8, 1), torch.tensor([0, 1] * 4))
        >>> sample = clean_sample(DetectionInput(nn.Identity(), held_out, 2, clean_set=held_out), 4, 0, "scan")
        >>> labels_of(sample).bincount().tolist()
        [2, 2]
    """
    what = f"{count} clean held-out images (clean_set: the test set)"
    labels = labels_of(require(inputs.clean_set, what, detector))
    classes = labels.unique()
    per_class = max(1, count // len(classes))
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in classes.tolist():
        members = torch.nonzero(labels == label).flatten()
        if len(members) < per_class:
            raise ConfigError(
                f"the {detector} detector draws {per_class} clean images of each label from the clean set, which has "
                f"{len(members)} of label {label}; give it fewer (clean_images={count} now) or a larger clean set."
            )
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return Subset(inputs.clean_set, torch.cat(chosen).sort().values.tolist())
