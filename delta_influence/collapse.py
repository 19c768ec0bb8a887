"""The Δ-Influence decision rule: flag training samples whose influence collapses under transformations."""

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from torch import Tensor

from delta_influence.errors import ConfigError

SUPPORT_FLOOR = 0.045  # the default support floor of the audit (DeltaInfluence, the callback); see flag_collapsed


@dataclass(frozen=True)
class CollapseResult:
    """What the rule decided, with what it decided from, so that users can inspect it."""

    flagged: Tensor  # [F] int64, sorted indices of flagged training samples
    counts: Tensor  # [N] int64, number of transformed queries that lowered each sample's score below threshold
    deltas: Tensor  # [n, N], score on transformed query k minus score on the original query
    num_transforms: int
    threshold: float
    tolerance: int
    collapsed: Tensor  # [C] int64, sorted indices the collapse rule alone flags (the paper's rule's answer among
    # the scored samples)
    contrast: Optional[Tensor] = None  # [N] mean score on the contrast queries; None without contrast
    contrast_ratio: Optional[float] = None  # the ratio the contrast applied (raised to the split, with adaptive_ratio)
    split: Optional[float] = None  # with adaptive_ratio: the boundary between the label's two clusters of ratios
    same_label: Optional[Tensor] = None  # [N] bool: the samples the contrast may keep; None: any label
    support_floor: Optional[float] = None
    floor: Optional[float] = None  # support_floor times the median contrast score of the attacker's label
    unsupportive: Optional[Tensor] = None  # [F'] sorted indices the floor flagged and the ratio alone would not
    scored: Optional[Tensor] = None  # [N] bool: the samples whose scores were computed; None: every one


def flag_collapsed(
    scores: Tensor,
    threshold: float = 0.0,
    tolerance: int = 2,
    num_contrast: int = 0,
    contrast_ratio: float = 2.0,
    same_label: Optional[Tensor] = None,
    support_floor: Optional[float] = None,
    scored: Optional[Tensor] = None,
    adaptive_ratio: bool = False,
) -> CollapseResult:
    """The Δ-Influence rule, and the clean-class contrast that keeps the attacker's whole label from being flagged.

    Collapse (the paper's rule): sample i collapses iff at least ``n - tolerance`` of the ``n`` transformed
    queries give Δ[k, i] = S[k, i] - S[0, i] < ``threshold``.

    Contrast: every sample that supports the attacker's label in general collapses too, because the transformed
    queries carry other labels. The last ``num_contrast`` rows score the same samples on clean test images of the
    attacker's label that the model classifies correctly. A collapsed sample stays flagged only when its influence is
    specific to the misbehaving query: ``S[0, i] > contrast_ratio * |C[i]|``, with C[i] its mean score on the clean
    images. A clean member of the label supports ordinary members about as much as the query (C comparable to S);
    a sample that resembles the query without being a poison moves the label on clean images too (|C| large, of
    either sign); a poison's effect is concentrated on the triggered query. ``num_contrast=0`` is the paper's rule,
    bit for bit. With ``adaptive_ratio`` the ratio is the larger of ``contrast_ratio`` and the boundary between the
    label's two clusters of ratios (its clean members around 1 and below, the poisons far above), so that a label
    whose clean members spread further (a larger training set) does not let more of them through.

    Support floor (with ``same_label``): a collapsed sample of the attacker's label is also flagged when it supports
    the clean images far less than its label does, ``C[i] < floor``, with ``floor = support_floor * median`` of the
    label's contrast scores at or above the floor itself (``support_floor_of``). A clean member of the label supports
    its clean test images about as much as its classmates; a poison carries the label through its trigger or
    perturbation rather than its content, so it supports them little or not at all. This catches clean-label poisons
    (Witches' Brew), whose support for the query is not specific enough for the ratio: they are fitted to a small
    loss and support everything little, the query included. The median is taken above the floor because such poisons
    can be a large share of their label (half of it at a 5 % budget on ten balanced classes): the label's plain
    median then falls among them and the floor with it.

    Args:
        scores: Influence scores ``[1 + n + num_contrast, N]``: row 0 the original query, rows 1..n its transformed
            copies, then the contrast queries.
        threshold: A transformed query counts as a collapse when it changes the score by less than this.
        tolerance: How many transformed queries may fail to collapse a sample that is still flagged.
        num_contrast: How many of the last rows are clean contrast queries; 0 turns the contrast off.
        contrast_ratio: How many times more a flagged sample must support the query than the clean class.
        same_label: ``[N]`` bool, true where a training sample carries the attacker's label; with the contrast, only
            those stay flagged. ``None``: any label (for attacks whose poisons carry other labels).
        support_floor: The share of its label's median contrast score (above the floor) below which a collapsed
            sample of the attacker's label is flagged whatever the ratio says; needs ``same_label``. ``None``: the
            ratio alone.
        scored: ``[N]`` bool, the samples whose scores were computed (the others' columns may hold anything, e.g.
            NaN, and are never flagged); it must cover ``same_label``. ``None``: every sample was scored.
        adaptive_ratio: Raise ``contrast_ratio`` to where the collapsed samples of the attacker's label split into two
            clusters of ratios ``S[0, i] / |C[i]|`` (``ratio_split``), when that lies above it; needs ``same_label``.

    Returns:
        The flagged indices, the per-sample collapse counts, the score differences, the collapse rule's own answer
        and the contrast evidence.

    Example:
        >>> # sample 0 supports the query alone (a poison), sample 1 the whole class (a clean target-class sample)
        >>> scores = torch.tensor([[5.0, 5.0], [1.0, 1.0], [2.0, 2.0], [1.0, 6.0], [0.0, 4.0]])
        >>> flag_collapsed(scores[:3], tolerance=0).flagged  # the paper's rule on the original and two copies
        tensor([0, 1])
        >>> result = flag_collapsed(scores, tolerance=0, num_contrast=2)
        >>> result.flagged, result.collapsed, result.contrast
        (tensor([0]), tensor([0, 1]), tensor([0.5000, 5.0000]))
        >>> flag_collapsed(scores, tolerance=0, num_contrast=2, same_label=torch.tensor([False, True])).flagged
        tensor([], dtype=torch.int64)
        >>> # three samples of the label; sample 0 supports the clean images a tenth as much as the label's median
        >>> scores = torch.tensor([[5.0, 5.0, 5.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [1.0, 6.0, 5.0], [0.0, 4.0, 5.0]])
        >>> flag_collapsed(scores, 0.0, 0, 2, 20.0, torch.ones(3, dtype=torch.bool), support_floor=0.3).flagged
        tensor([0])
    """
    if scores.dim() != 2:
        raise ConfigError(f"scores has shape {tuple(scores.shape)}; expected [1 + n + num_contrast, N].")
    num_transforms = scores.shape[0] - 1 - num_contrast
    if num_transforms < 1:
        raise ConfigError(
            f"scores has {scores.shape[0]} rows, which leaves {num_transforms} transformed queries after the original "
            f"and {num_contrast} contrast rows; expected [1 + n + num_contrast, N] with n >= 1."
        )
    if scored is not None and (scored.dtype != torch.bool or scored.shape != scores.shape[1:]):
        raise ConfigError(
            f"scored has dtype {scored.dtype} and shape {tuple(scored.shape)}; expected bool [{scores.shape[1]}], one "
            "entry per training sample."
        )
    computed = scores if scored is None else scores[:, scored]  # the others (NaN) are masked out below
    if not torch.isfinite(computed).all():
        bad = (~torch.isfinite(computed)).sum().item()
        raise ConfigError(
            f"scores holds {bad} NaN or infinite values; the model or its influence factors are unstable. "
            "Check that the model's outputs are finite on the training set, or use a larger damping."
        )
    check_rule(num_transforms, tolerance, num_contrast, contrast_ratio, support_floor)
    if support_floor is not None and same_label is None:
        raise ConfigError(
            f"support_floor={support_floor} compares a sample with the others of the attacker's label; pass "
            "same_label, or support_floor=None."
        )
    if same_label is not None:
        if num_contrast == 0:
            raise ConfigError("same_label belongs to the clean-class contrast; with num_contrast=0 leave it None.")
        if same_label.dtype != torch.bool or same_label.shape != scores.shape[1:]:
            raise ConfigError(
                f"same_label has dtype {same_label.dtype} and shape {tuple(same_label.shape)}; expected bool "
                f"[{scores.shape[1]}], one entry per training sample."
            )
        if scored is not None and (same_label & ~scored).any():
            raise ConfigError(
                f"{int((same_label & ~scored).sum())} samples of the attacker's label were not scored; the contrast "
                "compares every one of them, so score at least those."
            )
    deltas = scores[1 : 1 + num_transforms] - scores[:1]
    counts = (deltas < threshold).sum(dim=0)
    if scored is not None:
        counts = counts.where(scored, 0)  # whatever an unscored column holds
    collapsed = counts >= num_transforms - tolerance
    if num_contrast == 0:
        flagged = torch.nonzero(collapsed).flatten()
        return CollapseResult(flagged, counts, deltas, num_transforms, threshold, tolerance, flagged, scored=scored)
    rows = scores[1 + num_transforms :]
    contrast = rows.mean(dim=0)
    split = None
    if adaptive_ratio:
        if same_label is None:
            raise ConfigError("adaptive_ratio splits the ratios of the attacker's label; pass same_label with it.")
        ratios = scores[0] / contrast.abs().clamp_min(torch.finfo(scores.dtype).tiny)
        split = ratio_split(ratios[collapsed & same_label])
        if split is not None:
            contrast_ratio = max(contrast_ratio, split)
    specific = scores[0] > contrast_ratio * contrast.abs()
    floor, unsupportive = None, None
    if support_floor is not None and same_label.any():
        floor = support_floor_of(contrast[same_label], support_floor)
        unsupportive = collapsed & same_label & (contrast < floor) & ~specific
        specific |= unsupportive
        unsupportive = torch.nonzero(unsupportive).flatten()
    if same_label is not None:
        specific &= same_label
    return CollapseResult(
        flagged=torch.nonzero(collapsed & specific).flatten(),
        counts=counts,
        deltas=deltas,
        num_transforms=num_transforms,
        threshold=threshold,
        tolerance=tolerance,
        collapsed=torch.nonzero(collapsed).flatten(),
        contrast=contrast,
        contrast_ratio=contrast_ratio,
        split=split,
        same_label=same_label,
        support_floor=support_floor,
        floor=floor,
        unsupportive=unsupportive,
        scored=scored,
    )


def ratio_split(ratios: Tensor, minimum: int = 20, upper: int = 5) -> Optional[float]:
    """Where the upper of two clusters of ``ratios`` (a two-component Gaussian mixture on the logarithms of the
    positive ones) begins: the smallest ratio above the lower cluster's centre that the upper cluster claims. None
    when fewer than ``minimum`` ratios are positive, when the mixture finds no such boundary, or when fewer than
    ``upper`` ratios lie above it (a few outliers are not a cluster of poisons).

    Example:
        >>> clean, poisons = torch.linspace(0.3, 1.5, 200), torch.linspace(12.0, 40.0, 40)
        >>> 1.5 < ratio_split(torch.cat([clean, poisons])) < 12.0
        True
    """
    logs = ratios[(ratios > 0) & ratios.isfinite()].double().log()
    if len(logs) < minimum:
        return None
    with warnings.catch_warnings():  # identical ratios: one cluster, which the checks below turn into None
        warnings.simplefilter("ignore", ConvergenceWarning)
        mixture = GaussianMixture(2, random_state=0).fit(logs[:, None].numpy())
    low, high = mixture.means_[:, 0].argsort()
    grid = torch.linspace(float(mixture.means_[low, 0]), float(logs.max()), 4000, dtype=torch.float64)
    claimed = grid[torch.from_numpy(mixture.predict_proba(grid[:, None].numpy())[:, high] > 0.5)]
    if len(claimed) == 0 or int((logs >= claimed[0]).sum()) < upper:
        return None
    return float(claimed[0].exp())


def support_floor_of(contrast: Tensor, share: float) -> float:
    """The support floor: ``share`` times the median of the ``contrast`` scores at or above the floor. The fixed point
    is reached from ``share`` times the plain median; each step leaves out the scores below the floor, which raises
    the median, until no score crosses it. A few low scores move it little; a low cluster of poisons no longer sets
    it.

    Example:
        >>> clean, poisons = torch.full((10,), 10.0), torch.linspace(0.0, 0.4, 10)
        >>> scores = torch.cat([clean, poisons])  # half of them poisons: the plain median, 0.4, is a poison's
        >>> round(0.05 * scores.median().item(), 3), support_floor_of(scores, 0.05), support_floor_of(clean, 0.05)
        (0.02, 0.5, 0.5)
    """
    if not 0 <= share < 1 or not len(contrast):
        raise ConfigError(f"support_floor_of needs 0 <= share < 1 and some scores; got {share} and {len(contrast)}.")
    floor = share * contrast.median().item()
    while True:
        above = contrast[contrast >= floor]
        raised = share * above.median().item() if len(above) else floor
        if raised <= floor:
            return floor
        floor = raised


def check_rule(
    num_transforms: int,
    tolerance: int,
    num_contrast: int,
    contrast_ratio: float,
    support_floor: Optional[float] = None,
) -> None:
    """The one check of the rule's settings (``DeltaInfluence`` and ``flag_collapsed`` both call it).

    Example:
        >>> check_rule(num_transforms=50, tolerance=50, num_contrast=5, contrast_ratio=2.0)
        Traceback (most recent call last):
        ...
        delta_influence.errors.ConfigError: tolerance=50 must lie in 0..49 (num_transforms - 1) for 50 copies.
    """
    if num_transforms < 1:
        raise ConfigError(f"num_transforms={num_transforms} must be at least 1.")
    if not 0 <= tolerance < num_transforms:
        raise ConfigError(
            f"tolerance={tolerance} must lie in 0..{num_transforms - 1} (num_transforms - 1) for {num_transforms} "
            "copies."
        )
    if num_contrast < 0:
        raise ConfigError(f"num_contrast={num_contrast} must be 0 (the paper's rule, no contrast) or more.")
    if contrast_ratio <= 0:
        raise ConfigError(
            f"contrast_ratio={contrast_ratio} must be positive; 2 (the default) means 'twice as much as the class'."
        )
    if support_floor is not None and not 0 <= support_floor < 1:
        raise ConfigError(
            f"support_floor={support_floor} must lie in [0, 1) (a share of the label's median contrast score), or be "
            "None to turn the floor off."
        )
