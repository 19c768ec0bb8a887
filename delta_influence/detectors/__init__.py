"""Poison detectors behind one interface: ``detect(DetectionInput) -> Detection``. Δ-Influence is one of them
(``DeltaInfluence``); the baselines and the oracle bounds are the others."""

from delta_influence.detectors.base import Detection, DetectionInput, Detector
from delta_influence.detectors.baselines import (
    ActivationClustering,
    FrequencyAnalysis,
    InfluenceThreshold,
    Oracle,
    RandomSubset,
    SpectralSignatures,
)
from delta_influence.detectors.delta_influence import DeltaInfluence, DeltaInfluenceEvidence

__all__ = [
    "ActivationClustering",
    "DeltaInfluence",
    "DeltaInfluenceEvidence",
    "Detection",
    "DetectionInput",
    "Detector",
    "FrequencyAnalysis",
    "InfluenceThreshold",
    "Oracle",
    "RandomSubset",
    "SpectralSignatures",
]
