"""Framework-free core of delta-influence: attacks, Δ-Influence queries, influence scores, collapse rule."""

from delta_influence.collapse import CollapseResult, detection_metrics, flag_collapsed
from delta_influence.queries import TRANSFORMS, QuerySet, make_queries

__all__ = ["TRANSFORMS", "CollapseResult", "QuerySet", "detection_metrics", "flag_collapsed", "make_queries"]
