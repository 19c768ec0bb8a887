"""Lightning callbacks: thin glue between a training run and delta_influence."""

from callbacks.attack_preview import AttackPreviewCallback
from callbacks.influence_collapse import InfluenceCollapseCallback
from delta_influence.pipeline import AuditError, AuditResult

__all__ = ["AttackPreviewCallback", "AuditError", "AuditResult", "InfluenceCollapseCallback"]
