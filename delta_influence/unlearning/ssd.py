"""Selective Synaptic Dampening (Foster et al., 2024) and Potion's outlier-resistant form of it (Schoepf et al.,
2024): dampen the parameters far more important to the forget set than to the data the model keeps.

Two importances:

- ``"cross_entropy"`` (SSD): per batch, the squared gradient of the batch's mean cross-entropy, averaged over batches.
  This is what SSD's reference code computes; it is not the empirical Fisher (the mean of per-sample squared
  gradients), and on samples the model fits to near-zero loss it vanishes with their gradients.
- ``"logit_norm"`` (Potion): per batch, the absolute gradient of the batch's mean L2 norm of the logits, averaged over
  batches. It needs no labels and does not vanish on fitted samples.

SSD selects the parameters whose importance ratio ``I_F / I_D`` exceeds a fixed ``alpha``; Potion sets ``alpha`` to a
high percentile of those ratios over the whole network and searches that percentile until the model no longer
predicts the forget set's labels (for a backdoor, the attacker's target).

``I_D`` is the importance to the data the model keeps, as a whole.
"""

import copy
import dataclasses
import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from delta_influence.errors import ConfigError

IMPORTANCES = ("cross_entropy", "logit_norm")


def importances(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device | str, kind: str = "cross_entropy"
) -> dict[str, Tensor]:
    """Per-parameter importance of ``batches`` to ``model`` (eval mode: batch norm's running statistics are used and
    left as they are), the mean over batches of the squared gradient of the mean cross-entropy (``"cross_entropy"``)
    or the absolute gradient of the mean logit norm (``"logit_norm"``)."""
    if kind not in IMPORTANCES:
        raise ConfigError(f"importance={kind!r} is not one of {', '.join(IMPORTANCES)}.")
    was_training = model.training
    model.eval()
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters() if p.requires_grad}
    count = 0
    with torch.enable_grad():
        for inputs, labels in batches:
            model.zero_grad(set_to_none=True)
            logits = model(inputs.to(device))
            if kind == "cross_entropy":
                F.cross_entropy(logits, torch.as_tensor(labels).to(device)).backward()
            else:
                logits.norm(dim=-1).mean().backward()
            for name, parameter in model.named_parameters():
                if parameter.grad is not None:
                    grad = parameter.grad.detach()
                    total[name] += grad**2 if kind == "cross_entropy" else grad.abs()
            count += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if count == 0:
        raise ConfigError("importances got no batches: the data set is empty.")
    return {name: value / count for name, value in total.items()}


def importance_ratios(forget: dict[str, Tensor], kept: dict[str, Tensor]) -> Tensor:
    """Every parameter's ``I_F / I_D`` in one flat tensor, sorted, without the undefined ones (``0 / 0``, ``x / 0``;
    ``dampen`` selects and zeroes a parameter with ``x / 0`` at any ``alpha``).

    Example:
        >>> importance_ratios({"w": torch.tensor([4.0, 1.0, 0.0, 2.0])}, {"w": torch.tensor([2.0, 4.0, 0.0, 0.0])})
        tensor([0.2500, 2.0000])
    """
    ratios = torch.cat([(forget[name] / kept[name]).flatten() for name in forget])
    return ratios[torch.isfinite(ratios)].sort().values


def ratio_quantiles(ratios: Tensor, levels: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999, 1.0)) -> dict[str, float]:
    """Quantiles of the sorted importance ratios, by name (``q0.99``), for reports."""
    if len(ratios) == 0:
        return {f"q{level:g}": float("nan") for level in levels}
    return {f"q{level:g}": percentile(ratios, 100 * level) for level in levels}


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


def percentile_of_share(share: float) -> float:
    """Potion's percentile of the importance ratios at which to select, for a share ``s`` of the training set thought
    to be poisoned: ``100 - ln(1 + 100 s)`` (slowly lower as ``s`` grows).

    Example:
        >>> round(percentile_of_share(0.01), 3)
        99.307
    """
    return 100.0 - math.log1p(100.0 * share)


def dampen_share(
    model: nn.Module, forget: dict[str, Tensor], kept: dict[str, Tensor], ratios: Tensor, share: float
) -> tuple[float, float]:
    """Potion's dampening of ``model`` in place for a share ``s`` of the training set thought to be poisoned: the
    parameters whose ``I_F / I_D`` exceeds the ascending ``ratios``' ``percentile_of_share(s)``-th percentile are
    scaled by ``min(1, I_D / I_F)``.

    Returns:
        The selection ratio (``alpha``) and the share of parameters dampened.
    """
    alpha = percentile(ratios, percentile_of_share(share))
    return alpha, dampen(model, forget, kept, alpha, lam=1.0)


def percentile(sorted_values: Tensor, level: float) -> float:
    """The ``level``-th percentile (0-100) of ascending ``sorted_values``, interpolated linearly between ranks.

    Example:
        >>> percentile(torch.tensor([0.0, 1.0, 2.0, 3.0]), 50.0)
        1.5
    """
    position = min(max(level, 0.0), 100.0) / 100.0 * (len(sorted_values) - 1)
    low, high = math.floor(position), math.ceil(position)
    weight = position - low
    return float(sorted_values[low] * (1 - weight) + sorted_values[high] * weight)


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """Potion's search: the dampened model, the share and percentile it stopped at, the ``alpha`` they gave, how many
    shares it tried, the forget set's accuracy (on its own labels) before and after, whether the target was reached,
    the share of parameters dampened and the importance ratios' ``ratio_quantiles``."""

    model: nn.Module
    share: float
    percentile: float
    alpha: float
    tries: int
    forget_acc_before: float
    forget_acc: float
    reached: bool
    dampened_fraction: float
    quantiles: dict[str, float]


def potion_search(
    model: nn.Module,
    forget: dict[str, Tensor],
    kept: dict[str, Tensor],
    forget_accuracy: Callable[[nn.Module], float],
    start_share: float,
    step: float = 1.1,
    rho: float = 0.0,
    max_tries: int = 500,
) -> SearchResult:
    """Potion's search for how much to dampen (PTN): for a share ``s``, select the parameters whose ratio
    ``I_F / I_D`` exceeds the ratios' ``percentile_of_share(s)``-th percentile and dampen them by ``min(1, I_D / I_F)``
    on a fresh copy of ``model``; the target is reached when ``forget_accuracy`` (the accuracy on the forget set's own
    labels: the poisons' target) is at most ``rho`` times the undamped model's. From ``start_share`` the share grows
    by a factor ``step`` until the target is reached, as in Potion. Unlike Potion, when the start already reaches it
    (its start, ``|forget| / |train| / 25``, dampens too much when the forget set is a large share of a small
    network's data), the share shrinks by ``step`` while the target still holds: either way the result is the least
    dampening on that geometric grid that reaches the target.

    Returns:
        That model, else the last one tried, at a share of at most 1 (``reached`` False); a copy of ``model`` as it
        is when the forget set's accuracy is 0 already. ``model`` itself is left as it was.
    """
    ratios = importance_ratios(forget, kept)
    if len(ratios) == 0:
        raise ConfigError("no parameter has a defined importance ratio: the importances are all zero.")
    before, quantiles = forget_accuracy(model), ratio_quantiles(ratios)

    def attempt(share: float) -> SearchResult:
        level = percentile_of_share(share)
        candidate = copy.deepcopy(model)
        alpha, fraction = dampen_share(candidate, forget, kept, ratios, share)
        after = forget_accuracy(candidate)
        reached = after <= rho * before
        return SearchResult(candidate, share, level, alpha, 0, before, after, reached, fraction, quantiles)

    if before == 0:  # the forget set is not predicted as labelled: nothing to neutralise
        return SearchResult(copy.deepcopy(model), 0.0, 100.0, math.inf, 0, before, before, True, 0.0, quantiles)
    found, tries = attempt(start_share), 1
    shrink = found.reached
    while tries < max_tries:
        share = found.share / step if shrink else found.share * step
        if share > 1.0:  # no more than the whole training set can be poisoned
            break
        trial, tries = attempt(share), tries + 1
        if shrink and (not trial.reached or trial.dampened_fraction == found.dampened_fraction):
            break
        found = trial
        if found.reached and not shrink:
            break
    return dataclasses.replace(found, tries=tries)
