"""Cores of the unlearning methods that are not plain training: SSD and Potion dampening, SCRUB and Bad Teacher
losses."""

from delta_influence.unlearning.losses import bad_teacher_loss, distillation_kl, scrub_forget_loss, scrub_retain_loss
from delta_influence.unlearning.ssd import (
    IMPORTANCES,
    SearchResult,
    dampen,
    importance_ratios,
    importances,
    potion_search,
    ratio_quantiles,
)

__all__ = [
    "IMPORTANCES",
    "SearchResult",
    "bad_teacher_loss",
    "dampen",
    "distillation_kl",
    "importance_ratios",
    "importances",
    "potion_search",
    "ratio_quantiles",
    "scrub_forget_loss",
    "scrub_retain_loss",
]
