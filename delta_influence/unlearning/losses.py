"""Distillation losses of SCRUB (Kurmanji et al., 2023) and Bad Teacher (Chundawat et al., 2023)."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) of temperature-softened distributions, averaged over the batch.

    Example:
        >>> import torch
        >>> distillation_kl(torch.zeros(2, 3), torch.zeros(2, 3)).item()
        0.0
    """
    student = F.log_softmax(student_logits / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True)


def scrub_forget_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """SCRUB's max-step on the forget set: minimising this maximises the student's divergence from the teacher
    (scaled by ``T^2`` as in knowledge distillation, so that its gradients keep their size as ``T`` changes)."""
    return -(temperature**2) * distillation_kl(student_logits, teacher_logits, temperature)


def scrub_retain_loss(
    student_logits: Tensor,
    labels: Tensor,
    teacher_logits: Optional[Tensor],
    alpha: float = 0.001,
    temperature: float = 4.0,
) -> Tensor:
    """SCRUB's min-step on the retained set: cross-entropy plus ``alpha`` times the divergence from the teacher
    (scaled by ``T^2``); with ``alpha`` 0 the teacher's logits are not needed (``None``)."""
    loss = F.cross_entropy(student_logits, labels)
    if not alpha:
        return loss
    return loss + alpha * temperature**2 * distillation_kl(student_logits, teacher_logits, temperature)


def bad_teacher_loss(
    student_logits: Tensor, good_logits: Tensor, bad_logits: Tensor, forget: Tensor, temperature: float = 1.0
) -> Tensor:
    """Bad Teacher: follow the competent teacher on retained samples and the random one on ``forget`` samples.

    Args:
        student_logits: Student outputs ``[B, K]``.
        good_logits: Outputs of the original model ``[B, K]``.
        bad_logits: Outputs of a randomly initialised model ``[B, K]``.
        forget: Boolean ``[B]``, True where the sample is to be forgotten.
        temperature: Softening of both teachers and the student.
    """
    teacher = torch.where(forget[:, None], bad_logits, good_logits)
    return distillation_kl(student_logits, teacher, temperature)
