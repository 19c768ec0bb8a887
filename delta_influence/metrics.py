"""How a flagged set compares with the true poisons, when they are known."""

from typing import Optional

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_f1_score, binary_precision, binary_recall


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
    """Share of the poisons among the ``k = len(poisons)`` highest-scoring samples (NaN: not scored, never among
    them): the raw influence ranking.

    Example:
        >>> topk_recall(torch.tensor([0.1, 0.9, 0.5, 0.2]), torch.tensor([1, 3]))
        0.5
    """
    top = scores.nan_to_num(float("-inf")).topk(len(poisons)).indices  # NaN: not scored
    return torch.isin(top, poisons).float().mean().item()
