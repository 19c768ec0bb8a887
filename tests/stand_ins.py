"""Detectors that find part of the poisons, so that the correction loop has a second round to run. Importable by
class path from a command run in a subprocess (the tests put this folder on its PYTHONPATH)."""

from dataclasses import dataclass
from typing import ClassVar, Optional

from delta_influence.detectors import DeltaInfluence, Detector
from delta_influence.detectors.base import Detection, DetectionInput


@dataclass(frozen=True)
class Tracer(Detector):
    """Traces a query (the attack's first misclassified test sample, as Δ-Influence does) and flags the first ``most``
    true poisons of the training set it is given (all: ``None``): an audit that finds part of them, at no cost."""

    most: Optional[int] = None
    name: ClassVar[str] = "tracer"
    needs_query: ClassVar[bool] = True

    def _detect(self, inputs: DetectionInput) -> Detection:
        return Detection(self.name, inputs.poison_indices[: self.most])


@dataclass(frozen=True)
class PartialDeltaInfluence(DeltaInfluence):
    """Δ-Influence (every pass as it is, under DDP split across the processes) that keeps only the first ``most``
    samples it flags."""

    most: int = 10

    def _detect(self, inputs: DetectionInput) -> Detection:
        detection = super()._detect(inputs)
        detection.flagged = detection.flagged[: self.most]
        return detection


@dataclass(frozen=True)
class Flags(Detector):
    """Traces a query, as Δ-Influence does, and flags the given ``indices`` of the training set it is given."""

    indices: tuple[int, ...] = ()
    name: ClassVar[str] = "flags"
    needs_query: ClassVar[bool] = True

    def _detect(self, inputs: DetectionInput) -> Detection:
        return Detection(self.name, list(self.indices))
