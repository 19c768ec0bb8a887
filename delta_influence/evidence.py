"""What a detector leaves in its audit folder beyond the flagged set, and what it may read to write it."""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import Tensor
from torch.utils.data import Dataset


@dataclass
class AuditView:
    """What an audit's files and pictures may name: the training set, the ground truth when known, and how to show
    an input (the normalisation and class names)."""

    train_set: Dataset
    poison_indices: Optional[Tensor] = None
    mean: Optional[Tensor] = None
    std: Optional[Tensor] = None
    classes: Optional[Sequence[str]] = None


class Evidence(ABC):
    """What a detector computed beyond its flagged set, for the audit folder: its own files and pictures, summary
    entries, metrics, and per-sample details for the table of top flagged samples."""

    @abstractmethod
    def write(self, folder: Path, view: AuditView) -> None:
        """Writes the evidence's files (and PNG pictures) into ``folder``."""

    def summary(self) -> dict[str, Any]:
        return {}

    def metrics(self, poisons: Optional[Tensor]) -> dict[str, float]:
        return {}

    def details(self, index: int) -> dict[str, Any]:
        """Columns of the top-flagged table for training sample ``index``."""
        return {}
