"""Lightning callbacks: thin glue between a training run and delta_influence."""

from callbacks.attack_preview import AttackPreviewCallback
from callbacks.influence_collapse import AuditError, AuditResult, InfluenceCollapseCallback

__all__ = ["AttackPreviewCallback", "AuditError", "AuditResult", "InfluenceCollapseCallback"]
