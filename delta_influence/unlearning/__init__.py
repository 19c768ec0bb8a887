"""Cores of the unlearning methods that are not plain training: SSD dampening, SCRUB and Bad Teacher losses."""

from delta_influence.unlearning.indices import retained_indices
from delta_influence.unlearning.losses import bad_teacher_loss, distillation_kl, scrub_forget_loss, scrub_retain_loss
from delta_influence.unlearning.ssd import dampen, diagonal_fisher

__all__ = [
    "bad_teacher_loss",
    "dampen",
    "diagonal_fisher",
    "distillation_kl",
    "retained_indices",
    "scrub_forget_loss",
    "scrub_retain_loss",
]
