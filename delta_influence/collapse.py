"""The Δ-Influence decision rule: flag training samples whose influence collapses under transformations."""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_f1_score, binary_precision, binary_recall


@dataclass(frozen=True)
class CollapseResult:
    """What the rule decided, with what it decided from, so that users can inspect it."""

    flagged: Tensor  # [F] int64, sorted indices of flagged training samples
    counts: Tensor  # [N] int64, number of transformed queries that lowered each sample's score below threshold
    deltas: Tensor  # [n, N], score on transformed query k minus score on the original query
    num_transforms: int
    threshold: float
    tolerance: int


def flag_collapsed(scores: Tensor, threshold: float = 0.0, tolerance: int = 2) -> CollapseResult:
    """Flags sample i iff at least ``n - tolerance`` of the ``n`` transformed queries give Δ[k, i] < ``threshold``.

    Args:
        scores: Influence scores ``[1 + n, N]``; row 0 is the original query, rows 1..n its transformed copies.
        threshold: A transformed query counts as a collapse when it changes the score by less than this.
        tolerance: How many transformed queries may fail to collapse a sample that is still flagged.

    Returns:
        The flagged indices, the per-sample collapse counts and the score differences.

    Example:
        >>> scores = torch.tensor([[5.0, 1.0], [1.0, 2.0], [2.0, 0.0], [6.0, 3.0]])
        >>> flag_collapsed(scores, tolerance=1).flagged
        tensor([0])
    """
    if scores.dim() != 2 or scores.shape[0] < 2:
        raise ValueError(f"scores has shape {tuple(scores.shape)}; expected [1 + n, N] with n >= 1.")
    if not torch.isfinite(scores).all():
        bad = (~torch.isfinite(scores)).sum().item()
        raise ValueError(
            f"scores holds {bad} NaN or infinite values; the model or its influence factors are unstable. "
            "Check that the model's outputs are finite on the training set, or use a larger damping."
        )
    num_transforms = scores.shape[0] - 1
    if not 0 <= tolerance < num_transforms:
        raise ValueError(f"tolerance={tolerance} must lie in 0..{num_transforms - 1} for {num_transforms} copies.")
    deltas = scores[1:] - scores[:1]
    counts = (deltas < threshold).sum(dim=0)
    flagged = torch.nonzero(counts >= num_transforms - tolerance).flatten()
    return CollapseResult(flagged, counts, deltas, num_transforms, threshold, tolerance)


def detection_metrics(flagged: Tensor, num_samples: int, poisons: Optional[Tensor] = None) -> dict[str, float]:
    """Counts what was flagged and, when the true ``poisons`` are known, scores it against them.

    Example:
        >>> detection_metrics(torch.tensor([0, 1]), 4, poisons=torch.tensor([1]))
        {'flagged': 2.0, 'removed_fraction': 0.5, 'precision': 0.5, 'recall': 1.0, 'f1': 0.6666666865348816}
    """
    metrics = {"flagged": float(len(flagged)), "removed_fraction": len(flagged) / num_samples}
    if poisons is not None:
        predicted = torch.zeros(num_samples, dtype=torch.long)
        predicted[flagged] = 1
        truth = torch.zeros(num_samples, dtype=torch.long)
        truth[poisons] = 1
        metrics["precision"] = binary_precision(predicted, truth).item()
        metrics["recall"] = binary_recall(predicted, truth).item()
        metrics["f1"] = binary_f1_score(predicted, truth).item()
    return metrics


def topk_recall(scores: Tensor, poisons: Tensor) -> float:
    """Share of the poisons among the ``k = len(poisons)`` highest-scoring samples: the raw influence ranking.

    Example:
        >>> topk_recall(torch.tensor([0.1, 0.9, 0.5, 0.2]), torch.tensor([1, 3]))
        0.5
    """
    top = scores.topk(len(poisons)).indices
    return torch.isin(top, poisons).float().mean().item()
