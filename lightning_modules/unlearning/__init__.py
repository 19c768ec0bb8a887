"""The corrective fit of a Lightning run: the unlearning methods (retrain from scratch, fine-tune, SSD, Potion, SCRUB,
Bad Teacher), the distillation modules some of them train, and ``LightningCorrectiveFit``, which runs any of them on a
flagged set."""

from delta_influence.lightning_modules.unlearning.fit import LightningCorrectiveFit
from delta_influence.lightning_modules.unlearning.methods import (
    SCRUB,
    SSD,
    BadTeacher,
    FineTune,
    FitSettings,
    Potion,
    Retrain,
    Unlearning,
    UnlearningData,
    retain_loader,
)

__all__ = [
    "SCRUB",
    "SSD",
    "BadTeacher",
    "FineTune",
    "FitSettings",
    "LightningCorrectiveFit",
    "Potion",
    "Retrain",
    "Unlearning",
    "UnlearningData",
    "retain_loader",
]
