"""LightningModules: the poisoned classifier and the unlearning methods."""

from delta_influence.models import ARCHITECTURES, build_model
from lightning_modules.classifier import PoisonClassifier

__all__ = ["ARCHITECTURES", "PoisonClassifier", "build_model"]
