"""Poison detectors behind one interface: ``detect(DetectionInput) -> Detection``. Δ-Influence is one of them
(``DeltaInfluence``); the others are the detectors it is compared with, from 2018 (activation clustering, spectral
signatures) to 2025 (AGPD), and the oracle bounds."""

from delta_influence.detectors.asset import ASSET
from delta_influence.detectors.base import Detection, DetectionInput, Detector, clean_sample
from delta_influence.detectors.baselines import (
    ActivationClustering,
    FrequencyAnalysis,
    InfluenceThreshold,
    Oracle,
    RandomSubset,
    SpectralSignatures,
)
from delta_influence.detectors.delta_influence import DeltaInfluence, DeltaInfluenceEvidence
from delta_influence.detectors.distillation import CognitiveDistillation
from delta_influence.detectors.gradients import AGPD
from delta_influence.detectors.scan import SCAn

__all__ = [
    "AGPD",
    "ASSET",
    "ActivationClustering",
    "CognitiveDistillation",
    "DeltaInfluence",
    "DeltaInfluenceEvidence",
    "Detection",
    "DetectionInput",
    "Detector",
    "FrequencyAnalysis",
    "InfluenceThreshold",
    "Oracle",
    "RandomSubset",
    "SCAn",
    "SpectralSignatures",
    "clean_sample",
]
