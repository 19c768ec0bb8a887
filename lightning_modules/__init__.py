"""LightningModules: the poisoned classifier and the unlearning methods."""

from lightning_modules.classifier import PoisonClassifier
from lightning_modules.models import ARCHITECTURES, build_model

__all__ = ["ARCHITECTURES", "PoisonClassifier", "build_model"]
