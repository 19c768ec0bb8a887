"""Lightning callbacks: thin glue between a training run and delta_influence's core."""

from delta_influence.callbacks.attack_preview import AttackPreviewCallback
from delta_influence.callbacks.influence_collapse import InfluenceCollapseCallback

__all__ = ["AttackPreviewCallback", "InfluenceCollapseCallback"]
