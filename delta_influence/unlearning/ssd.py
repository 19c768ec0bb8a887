"""Selective Synaptic Dampening (Foster et al., 2024): dampen parameters far more important to the forget set
than to the whole training set. Importance is the diagonal of the empirical Fisher information."""

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from delta_influence.errors import ConfigError


def diagonal_fisher(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device | str) -> dict:
    """Mean over batches of the squared gradient of the batch's cross-entropy, per parameter (eval mode)."""
    was_training = model.training
    model.eval()
    importance = {name: torch.zeros_like(p) for name, p in model.named_parameters() if p.requires_grad}
    count = 0
    for inputs, labels in batches:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs.to(device)), labels.to(device)).backward()
        for name, parameter in model.named_parameters():
            if parameter.grad is not None:
                importance[name] += parameter.grad.detach() ** 2
        count += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if count == 0:
        raise ConfigError("diagonal_fisher got no batches: the data set is empty.")
    return {name: value / count for name, value in importance.items()}


@torch.no_grad()
def dampen(
    model: nn.Module, forget_importance: dict, full_importance: dict, alpha: float = 10.0, lam: float = 1.0
) -> float:
    """Where ``I_F > alpha * I_D`` multiplies the parameter by ``min(1, lam * I_D / I_F)``, in place.

    Returns:
        The share of parameters that were dampened.

    Example:
        >>> layer = nn.Linear(2, 1, bias=False)
        >>> layer.weight.data = torch.tensor([[1.0, 1.0]])
        >>> dampen(layer, {"weight": torch.tensor([[40.0, 1.0]])}, {"weight": torch.tensor([[2.0, 1.0]])})
        0.5
        >>> layer.weight.data
        tensor([[0.0500, 1.0000]])
    """
    dampened = total = 0
    for name, parameter in model.named_parameters():
        if name not in forget_importance:
            continue
        forget, full = forget_importance[name], full_importance[name]
        selected = forget > alpha * full
        factor = (lam * full / forget.clamp_min(torch.finfo(forget.dtype).tiny)).clamp(max=1.0)
        parameter[selected] *= factor[selected]
        dampened += int(selected.sum())
        total += parameter.numel()
    return dampened / max(total, 1)
