"""The Lightning layer in one import: the audit callback, the detectors it runs, the unlearning methods of its
corrective fit, the classifier, the poisoned data module and the command line.

    from delta_influence.lightning import DeltaInfluence, InfluenceCollapseCallback, Retrain

    trainer = pl.Trainer(callbacks=[InfluenceCollapseCallback(detector=DeltaInfluence(), unlearning=Retrain())])

Its code lies in the repository's callbacks/, datamodules/, lightning_modules/ and cli/ folders, installed as
``delta_influence.callbacks``, ``.datamodules``, ``.lightning_modules`` and ``.cli``. This is the one module of
``delta_influence/`` that imports Lightning; the core never does.
"""

from delta_influence.callbacks import AttackPreviewCallback, InfluenceCollapseCallback
from delta_influence.cli import DeltaInfluenceCLI
from delta_influence.datamodules import PoisonedDataModule
from delta_influence.detectors import (
    AGPD,
    ASSET,
    ActivationClustering,
    CognitiveDistillation,
    DeltaInfluence,
    FrequencyAnalysis,
    InfluenceThreshold,
    Oracle,
    RandomSubset,
    SCAn,
    SpectralSignatures,
)
from delta_influence.lightning_modules import PoisonClassifier
from delta_influence.lightning_modules.progress import EpochLines
from delta_influence.lightning_modules.unlearning import (
    SCRUB,
    SSD,
    BadTeacher,
    FineTune,
    LightningCorrectiveFit,
    Potion,
    Retrain,
    Unlearning,
)
from delta_influence.second_opinion import SecondOpinion
from delta_influence.verification import Verification

__all__ = [
    "AGPD",
    "ASSET",
    "SCAn",
    "SCRUB",
    "SSD",
    "SecondOpinion",
    "ActivationClustering",
    "AttackPreviewCallback",
    "BadTeacher",
    "CognitiveDistillation",
    "DeltaInfluence",
    "DeltaInfluenceCLI",
    "EpochLines",
    "FineTune",
    "FrequencyAnalysis",
    "InfluenceCollapseCallback",
    "InfluenceThreshold",
    "LightningCorrectiveFit",
    "Oracle",
    "PoisonClassifier",
    "PoisonedDataModule",
    "Potion",
    "RandomSubset",
    "Retrain",
    "SpectralSignatures",
    "Unlearning",
    "Verification",
]
