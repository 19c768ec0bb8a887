"""Poison detectors behind one interface: ``detect(DetectionInput) -> Detection``.

Δ-Influence itself is ``delta_influence.audit.DeltaInfluence``; the baselines and the oracle bounds are here.
"""

from delta_influence.detectors.base import Detection, DetectionInput, Detector, penultimate_activations
from delta_influence.detectors.baselines import (
    ActivationClustering,
    FrequencyAnalysis,
    InfluenceThreshold,
    Oracle,
    RandomSubset,
    SpectralSignatures,
)

__all__ = [
    "ActivationClustering",
    "Detection",
    "DetectionInput",
    "Detector",
    "FrequencyAnalysis",
    "InfluenceThreshold",
    "Oracle",
    "RandomSubset",
    "SpectralSignatures",
    "penultimate_activations",
]
