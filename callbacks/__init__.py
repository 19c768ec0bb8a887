"""Lightning callbacks: thin glue between a training run and delta_influence."""

from callbacks.influence_collapse import AuditError, AuditResult, InfluenceCollapseCallback

__all__ = ["AuditError", "AuditResult", "InfluenceCollapseCallback"]
