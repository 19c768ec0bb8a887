"""LightningModules: the poisoned classifier and the unlearning methods' modules."""

from delta_influence.lightning_modules.classifier import PoisonClassifier
from delta_influence.models import ARCHITECTURES, build_model

__all__ = ["ARCHITECTURES", "PoisonClassifier", "build_model"]
