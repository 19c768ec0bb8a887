"""Corrective fits after an audit: the methods (retrain from scratch, fine-tune, SSD, Potion, SCRUB, Bad
Teacher), the distillation modules some of them train, and ``CorrectiveFit``, which runs any of them on a flagged
set."""

from lightning_modules.unlearning.methods import (
    SCRUB,
    SSD,
    BadTeacher,
    FineTune,
    FitSettings,
    Potion,
    Retrain,
    Unlearning,
    UnlearningData,
    UnlearningError,
    retain_loader,
)
from lightning_modules.unlearning.runner import CorrectiveFit, correct_in_rounds

__all__ = [
    "SCRUB",
    "SSD",
    "BadTeacher",
    "CorrectiveFit",
    "FineTune",
    "FitSettings",
    "Potion",
    "Retrain",
    "Unlearning",
    "UnlearningData",
    "UnlearningError",
    "correct_in_rounds",
    "retain_loader",
]
