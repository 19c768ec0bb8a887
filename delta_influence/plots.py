"""Pictures of an audit, written as PNG files: the queries, the collapse counts, the clean-class contrast."""

import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from matplotlib.figure import Figure  # the object API: no pyplot, no global backend change for the user
from torch import Tensor

from delta_influence.collapse import CollapseResult
from delta_influence.queries import QuerySet


def to_displayable(images: Tensor, mean: Optional[Tensor], std: Optional[Tensor]) -> Tensor:
    """Normalised images ``[B, C, H, W]`` back to [0, 1] (min-max per image when the normalisation is unknown)."""
    if mean is not None and std is not None:
        return (images * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)).clamp(0, 1)
    flat = images.flatten(1)
    low, high = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
    return (images - low) / (high - low).clamp_min(1e-8)


def _label(classes: Optional[Sequence[str]], label: int) -> str:
    return classes[label] if classes and label < len(classes) else str(label)


def _show(axis, image: Tensor, title: str) -> None:
    """Draws one [C, H, W] image in [0, 1] on an axis."""
    if image.shape[0] == 1:
        axis.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        axis.imshow(image.permute(1, 2, 0).numpy())
    axis.set_title(title, fontsize=7)
    axis.axis("off")


def plot_queries(
    queries: QuerySet, path: Path, mean: Optional[Tensor] = None, std: Optional[Tensor] = None, classes=None
) -> None:
    """A grid of the original query and its transformed copies, each titled with transformation and label."""
    images = to_displayable(queries.images, mean, std)
    columns = 10
    rows = -(-len(images) // columns)
    figure = Figure(figsize=(columns * 1.2, rows * 1.35))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, name, label in zip(axes.flat, images, queries.transforms, queries.labels.tolist()):
        _show(axis, image, f"{name}\n{_label(classes, label)}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_collapse_counts(
    counts: Tensor,
    num_transforms: int,
    tolerance: int,
    path: Path,
    poisons: Optional[Tensor] = None,
    scored: Optional[Tensor] = None,
) -> None:
    """Histogram of per-sample collapse counts (of the ``scored`` samples when not every one was), poisons and clean
    samples apart when the poisons are known."""
    figure = Figure(figsize=(6, 3.5))
    axis = figure.subplots()
    bins = torch.arange(num_transforms + 2).numpy() - 0.5
    scored = torch.ones(len(counts), dtype=torch.bool) if scored is None else scored
    counts = counts[scored]
    if poisons is not None and len(poisons):
        is_poison = torch.zeros(len(scored), dtype=torch.bool)
        is_poison[poisons] = True
        is_poison = is_poison[scored]
        axis.hist(counts[~is_poison].numpy(), bins=bins, alpha=0.6, label="clean", log=True)
        axis.hist(counts[is_poison].numpy(), bins=bins, alpha=0.8, label="poison", log=True)
        axis.legend()
    else:
        axis.hist(counts.numpy(), bins=bins, log=True, label="all samples")
    axis.axvline(num_transforms - tolerance - 0.5, color="black", linestyle="--", linewidth=1)
    axis.set_xlabel("transformed queries that lowered the sample's influence")
    axis.set_ylabel("training samples")
    scope = "" if bool(scored.all()) else f", the {len(counts)} samples of the query's label"
    title = f"Influence collapse: flagged right of the line (>= {num_transforms - tolerance}){scope}"
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_contrast(original: Tensor, decision: CollapseResult, path: Path, poisons: Optional[Tensor] = None) -> None:
    """Why samples were flagged: each collapsed sample's score on the misbehaving query against its mean score on the
    clean contrast queries, poisons marked when known, samples of other labels greyed out when the contrast keeps only
    the query's label, and the contrast boundary drawn (flagged above it, and left of the support floor if any)."""
    figure = Figure(figsize=(6, 4.5))
    axis = figure.subplots()
    collapsed = decision.collapsed
    x, y = decision.contrast[collapsed].numpy(), original[collapsed].numpy()
    other = torch.zeros(len(collapsed), dtype=torch.bool)
    if decision.same_label is not None:
        other = ~decision.same_label[collapsed]
        axis.scatter(
            x[other.numpy()], y[other.numpy()], s=6, alpha=0.4, color="tab:gray", label="other label (not kept)"
        )
    own = (~other).numpy()
    if poisons is not None and len(poisons):
        is_poison = torch.isin(collapsed, poisons).numpy()
        axis.scatter(x[own & ~is_poison], y[own & ~is_poison], s=6, alpha=0.5, label="clean")
        axis.scatter(x[is_poison], y[is_poison], s=10, marker="x", color="tab:red", label="poison")
    else:
        axis.scatter(x[own], y[own], s=6, alpha=0.5, label="collapsed samples")
    axis.set_xscale("symlog", linthresh=_linear_range(x))
    axis.set_yscale("symlog", linthresh=_linear_range(y))
    # flagged: above y = ratio * |x|
    reach, near = max(float(abs(x).max(initial=0)), 1.0), _linear_range(x)
    half = torch.logspace(math.log10(near), math.log10(reach), 200)  # even steps on the symlog axis
    edge = torch.cat([-half.flip(0), torch.zeros(1), half]).numpy()
    axis.plot(edge, decision.contrast_ratio * abs(edge), color="black", linestyle="--", linewidth=1,
              label=f"boundary: query = {decision.contrast_ratio:g} x |class|")  # fmt: skip
    if decision.floor is not None:
        axis.axvline(decision.floor, color="black", linestyle=":", linewidth=1,
                     label=f"support floor: {decision.support_floor:g} x the label's median above it")  # fmt: skip
    axis.set_xlabel("mean score on clean queries of the label")
    axis.set_ylabel("score on the misbehaving query")
    axis.set_title(f"Clean-class contrast: {len(decision.flagged)} of {len(collapsed)} collapsed samples kept")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _linear_range(values) -> float:
    """The symlog axis's linear range: a small share of the values' spread, never zero."""
    spread = float(abs(values).max(initial=0))
    return max(spread * 1e-3, 1e-12)


def plot_verification(result, path: Path, poisons: Optional[Tensor] = None) -> None:
    """The verification stage: each tested group's effect on the query against the threshold (left), and the first
    recovery round's support of each candidate against its threshold (right); poisons apart when known."""
    figure = Figure(figsize=(11, 3.8))
    left, right = figure.subplots(1, 2)
    known = set(poisons.tolist()) if poisons is not None else None
    sizes = [len(group["indices"]) for group in result.groups]
    effects = [group["effect"] for group in result.groups]
    colours = ["tab:red" if group["guilty"] else "tab:blue" for group in result.groups]
    left.scatter(sizes, effects, c=colours, s=18)
    if known is not None:
        for size, effect, group in zip(sizes, effects, result.groups):
            share = sum(index in known for index in group["indices"]) / len(group["indices"])
            left.annotate(f"{100 * share:.0f}%", (size, effect), fontsize=6, alpha=0.7)
    left.axhline(result.threshold, color="black", linestyle="--", linewidth=1, label="threshold")
    if sizes:
        left.set_xscale("log")
    left.set_xlabel("group size (red: guilty, kept or split; blue: dropped" + ("; % poisons" if known else "") + ")")
    left.set_ylabel("query's loss rise over the contrast's")
    left.set_title(f"prune: kept {len(result.kept)}, dropped {len(result.dropped)}", fontsize=9)
    left.legend(fontsize=7)
    if result.rounds:
        first = result.rounds[0]
        support = torch.tensor(first["support"])
        if known is not None:
            is_poison = torch.tensor([index in known for index in first["indices"]])
            right.hist([support[~is_poison].numpy(), support[is_poison].numpy()], bins=50, stacked=True,
                       histtype="stepfilled", label=["clean", "poison"], color=["tab:blue", "tab:red"])  # fmt: skip
        else:
            right.hist(support.numpy(), bins=50, histtype="stepfilled")
        right.set_yscale("symlog")
        right.axvline(first["threshold"], color="black", linestyle="--", linewidth=1, label="threshold")
        right.legend(fontsize=7)
    right.set_xlabel("support for the query after unlearning the kept set")
    right.set_title(f"recover: {len(result.recovered)} added in {len(result.rounds)} round(s)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
