"""The Δ-Influence pipeline: queries, one scoring pass over the training set, the decision rule."""

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset, TensorDataset

from delta_influence import plots
from delta_influence.collapse import (
    SUPPORT_FLOOR,
    CollapseResult,
    check_rule,
    detection_metrics,
    flag_collapsed,
    topk_recall,
)
from delta_influence.detectors.base import Detection, DetectionInput, Detector, labels_of, require
from delta_influence.errors import ConfigError
from delta_influence.evidence import AuditView, Evidence
from delta_influence.influence import (
    DataPartitions,
    InfluenceAnalysis,
    InfluenceScores,
    Strategy,
    check_factor_examples,
    check_strategy,
    check_trackable,
    compute_influence_scores,
)
from delta_influence.queries import QuerySet, make_queries
from delta_influence.verification import Verification, VerificationResult, head_data, head_of, retain_rows, verify


@dataclass(frozen=True)
class DeltaInfluence(Detector):
    """Δ-Influence (Li et al., 2024) with the clean-class contrast; every setting is checked here, once.

    As a ``Detector`` it needs the query and, unless ``num_contrast=0``, the clean contrast images; its
    ``Detection`` holds the scores on the original query and the whole ``DeltaInfluenceAudit`` as evidence.

    Example:
        >>> DeltaInfluence(tolerance=50)
        Traceback (most recent call last):
        ...
        delta_influence.errors.ConfigError: tolerance=50 must lie in 0..49 (num_transforms - 1) for 50 copies.
    """

    title: ClassVar[str] = "Δ-Influence"
    needs_query: ClassVar[bool] = True

    num_transforms: int = field(default=50, metadata={"help": "transformed copies of the query"})
    threshold: float = field(default=0.0, metadata={"help": "a copy collapses a sample when Δ is below this"})
    tolerance: int = field(default=2, metadata={"help": "copies that may fail to collapse a flagged sample"})
    num_contrast: int = field(
        default=5, metadata={"help": "correctly classified clean test samples of the query's label; 0: reference rule"}
    )
    contrast_ratio: float = field(
        default=2.0, metadata={"help": "a flagged sample supports the query this many times more than the class"}
    )
    same_label: bool = field(
        default=True, metadata={"help": "the contrast keeps only samples of the query's label; False: any label"}
    )
    contrast_statistic: Literal["mean", "max"] = field(
        default="mean", metadata={"help": "a sample's contrast score: the mean, or the largest magnitude"}
    )
    support_floor: Optional[float] = field(
        default=SUPPORT_FLOOR,
        metadata={"help": "also flag collapsed samples of the label below this share of its median contrast score "
                          "(of the scores above the floor; clean-label poisons); applies with same_label; None: off"},
    )  # fmt: skip
    strategy: Strategy = field(default="ekfac", metadata={"help": "kronfluence's Hessian approximation"})
    space: Literal["normalized", "pixel"] = field(
        default="normalized", metadata={"help": "transform the normalised input (the reference) or pixels"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the transformations and their labels"})
    train_batch_size: int = field(default=128, metadata={"help": "training samples per batch of kronfluence"})
    factor_examples: Optional[int] = field(
        default=None, metadata={"help": "training samples the factor fits see (a seeded sample); None: all"}
    )
    score_all: bool = field(
        default=False,
        metadata={"help": "score every training sample; False: only the query's label when the rule can flag no "
                          "other (same_label with the contrast), the others' scores NaN"},
    )  # fmt: skip
    num_workers: int = field(default=0, metadata={"help": "data loader workers of kronfluence"})
    verification: Optional[Verification] = field(
        default=Verification(),
        metadata={"help": "the verification stage's settings; None (and always with num_contrast=0): the rule's set"},
    )

    def __post_init__(self) -> None:
        check_rule(
            self.num_transforms, self.tolerance, self.num_contrast, self.contrast_ratio, self.contrast_statistic,
            self.support_floor,
        )  # fmt: skip
        if self.num_contrast == 0:  # the verification measures the query against the contrast: the reference rule
            object.__setattr__(self, "verification", None)  # has none, and stays the paper's rule bit for bit
        check_strategy(self.strategy)
        if self.space not in ("normalized", "pixel"):
            raise ConfigError(f"space={self.space!r} is not known; use 'normalized' or 'pixel'.")
        check_factor_examples(self.factor_examples)
        if self.train_batch_size < 1 or self.num_workers < 0:
            raise ConfigError(
                f"train_batch_size={self.train_batch_size} must be at least 1 and num_workers={self.num_workers} "
                "at least 0."
            )

    def run(
        self,
        model: nn.Module,
        train_set: Dataset,
        image: Tensor,
        label: int,
        num_classes: int,
        factors_dir: str | Path,
        contrast: Optional[Tensor] = None,
        device: torch.device | str = "cpu",
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        partitions: Optional[DataPartitions] = None,
    ) -> "DeltaInfluenceAudit":
        """Audits ``model``: scores the training samples (those of ``label``, unless ``score_all`` or the rule needs
        every one) on the query, its copies and the contrast in one pass.

        Args:
            model: The trained classifier (its forward returns logits); it is not modified.
            train_set: The training set in evaluation form: ``(input, label)`` pairs, fixed order, no augmentation.
            image: The misbehaving test example as the model sees it, ``[C, H, W]``.
            label: The attacker's label, which the model predicts for ``image``.
            num_classes: Number of classes of the model.
            factors_dir: Where kronfluence's factors are cached.
            contrast: Clean test images ``[k, C, H, W]`` of class ``label`` that the model classifies correctly;
                needed when ``num_contrast > 0`` (any k >= 1), refused when it is 0.
            device: Where to compute.
            mean: Per-channel mean of the normalisation (for ``space="pixel"``).
            std: Per-channel standard deviation of the normalisation (for ``space="pixel"``).
            partitions: Split the influence passes across the processes of a distributed run (this one being
                process 0, the others in ``delta_influence.influence.serve``).
        """
        start = time.perf_counter()
        contrast = self._checked_contrast(contrast, image)
        queries = make_queries(
            image, label, num_classes, self.num_transforms, self.seed, self.space, mean, std
        )  # fmt: skip
        labels = labels_of(train_set) if len(contrast) and self.same_label else None  # read once: may be a pass
        same_label = labels == label if labels is not None else None
        if same_label is not None and not same_label.any():
            raise ConfigError(
                f"no training sample carries the query's label {label}, and with same_label=True only those can be "
                "flagged; check the query's label, or set same_label=False."
            )
        scored = None if same_label is None or self.score_all else same_label  # all the rule can flag
        influence = compute_influence_scores(
            model, train_set, _scored(queries, contrast), factors_dir, self.strategy, device,
            self.train_batch_size, num_workers=self.num_workers, seed=self.seed, factor_examples=self.factor_examples,
            partitions=partitions, scored=None if scored is None else torch.nonzero(scored).flatten(),
        )  # fmt: skip
        decision = flag_collapsed(
            influence.scores, self.threshold, self.tolerance, len(contrast), self.contrast_ratio, same_label,
            self.contrast_statistic, self.support_floor if same_label is not None else None, scored,
        )  # fmt: skip
        timings = dict(influence.timings)
        verified = None
        if self.verification is not None:
            began = time.perf_counter()
            verified = self._verify(
                model, train_set, queries, contrast, influence, decision, factors_dir, device, labels
            )  # fmt: skip
            timings["verify_s"] = time.perf_counter() - began
        timings["total_s"] = time.perf_counter() - start
        return DeltaInfluenceAudit(
            queries, contrast, influence.scores, decision, influence.factors_name, influence.factors_reused, timings,
            verified, influence.process_timings,
        )  # fmt: skip

    def _verify(
        self,
        model: nn.Module,
        train_set: Dataset,
        queries: QuerySet,
        contrast: Tensor,
        influence: InfluenceScores,
        decision: CollapseResult,
        factors_dir: str | Path,
        device: torch.device | str,
        labels: Optional[Tensor],
    ) -> VerificationResult:
        """The verification stage on the rule's flagged set: the candidates for recovery are the training samples of
        the query's label (any label without ``same_label``), their support EK-FAC scores with the audit's factors."""
        image, label = queries.images[0], int(queries.labels[0])
        rows = retain_rows(labels, label, self.verification.seed) if labels is not None else None
        data = head_data(model, train_set, image, label, contrast, device, rows)  # with same_label: what tests read
        candidates = torch.nonzero(data.labels == label).flatten() if self.same_label else torch.arange(len(train_set))

        def support(weight: Tensor, bias: Tensor, indices: Tensor) -> Tensor:
            unlearned = copy.deepcopy(model)
            with torch.no_grad():
                head_of(unlearned).weight.copy_(weight)
                head_of(unlearned).bias.copy_(bias)
            analysis = InfluenceAnalysis(
                unlearned, Subset(train_set, indices.tolist()), factors_dir, self.strategy, device,
                self.train_batch_size, self.num_workers, seed=self.seed, factors_name=influence.factors_name,
            )  # fmt: skip
            scored = torch.cat([image[None], contrast.to(image.dtype)])
            return analysis.pairwise_scores(TensorDataset(scored, torch.full((len(scored),), label)))

        profiles = influence.scores[:, decision.flagged].T
        untested = None if decision.unsupportive is None else torch.isin(decision.flagged, decision.unsupportive)
        return verify(data, decision.flagged, profiles, candidates, support, self.verification, untested=untested)

    name = "delta_influence"

    def check_model(self, model: nn.Module) -> None:
        check_trackable(model)

    def _detect(self, inputs: DetectionInput) -> Detection:
        image, label = require(inputs.query, "the misbehaving query (an input and the attacker's label)", self.name)
        audit = self.run(
            inputs.model, inputs.train_set, image, int(label), inputs.num_classes, inputs.factors_dir,
            contrast=inputs.contrast if self.num_contrast else None, device=inputs.device, mean=inputs.mean,
            std=inputs.std, partitions=inputs.partitions,
        )  # fmt: skip
        return Detection(self.name, audit.flagged, audit.scores[0], audit, info=dict(audit.timings))

    def _checked_contrast(self, contrast: Optional[Tensor], image: Tensor) -> Tensor:
        """The contrast images, checked against the settings and the query's shape; empty without contrast."""
        if self.num_contrast == 0:
            if contrast is not None and len(contrast):
                raise ConfigError("contrast images were given but num_contrast=0 turns the contrast off; drop one.")
            return image.new_zeros((0, *image.shape))
        if contrast is None or len(contrast) == 0:
            raise ConfigError(
                "the clean-class contrast needs clean images of the query's label (num_contrast > 0); give them, or "
                "set num_contrast=0 for the reference rule."
            )
        if contrast.dim() != 4 or contrast.shape[1:] != image.shape:
            raise ConfigError(
                f"contrast images have shape {tuple(contrast.shape)}; expected [k, "
                f"{', '.join(map(str, image.shape))}], the query's channels and size."
            )
        return contrast


@dataclass
class DeltaInfluenceAudit(Evidence):
    """What an audit computed: the queries, the training samples' scores on them (NaN: not scored), and the
    decision; the evidence behind Δ-Influence's flagged set."""

    queries: QuerySet  # the original query and its transformed copies
    contrast: Tensor  # [k, C, H, W] clean contrast images (k = 0 without contrast)
    scores: Tensor  # [1 + n + k, N]: the original query, the n copies, the k contrast images
    decision: CollapseResult
    factors_name: str
    factors_reused: bool
    timings: dict[str, float]
    verification: Optional[VerificationResult] = None  # None: the stage was off
    process_timings: dict[str, list[float]] = field(default_factory=dict)  # split across processes: each one's

    @property
    def flagged(self) -> Tensor:
        """The verified set, or the rule's when the verification stage was off."""
        return self.verification.flagged if self.verification is not None else self.decision.flagged

    def scored_queries(self) -> TensorDataset:
        """The rows of ``scores`` as a data set: the query, its copies and the contrast images, with their labels."""
        return _scored(self.queries, self.contrast)

    def write(self, folder: Path, view: AuditView) -> None:
        """The scores, counts, queries and contrast evidence as tensors, and their pictures."""
        decision, queries = self.decision, self.queries
        torch.save(self.scores, folder / "scores.pt")
        torch.save(decision.counts, folder / "counts.pt")
        torch.save(
            {"images": queries.images, "labels": queries.labels, "transforms": queries.transforms,
             "contrast_images": self.contrast},
            folder / "queries.pt",
        )  # fmt: skip
        plots.plot_queries(queries, folder / "queries.png", view.mean, view.std, view.classes)
        plots.plot_collapse_counts(
            decision.counts, decision.num_transforms, decision.tolerance, folder / "collapse_counts.png",
            view.poison_indices, decision.scored,
        )  # fmt: skip
        if decision.contrast is not None:
            torch.save(
                {"collapsed": decision.collapsed, "contrast": decision.contrast, "ratio": decision.contrast_ratio,
                 "same_label": decision.same_label, "floor": decision.floor, "unsupportive": decision.unsupportive},
                folder / "contrast.pt",
            )  # fmt: skip
            plots.plot_contrast(self.scores[0], decision, folder / "contrast.png", view.poison_indices)
        if self.verification is not None:
            verified = self.verification
            (folder / "verification.json").write_text(
                json.dumps(
                    {**verified.summary(), "rule_flagged": decision.flagged.tolist(), "kept": verified.kept.tolist(),
                     "dropped": verified.dropped.tolist(), "recovered": verified.recovered.tolist(),
                     "untested": verified.untested.tolist(),
                     "groups": verified.groups, "rounds": verified.rounds}
                )
            )  # fmt: skip
            plots.plot_verification(verified, folder / "verification.png", view.poison_indices)

    def summary(self) -> dict[str, Any]:
        first = 1 + self.decision.num_transforms
        return {
            "num_contrast": len(self.contrast),
            "factors": self.factors_name,
            "factors_reused": self.factors_reused,
            "score_rows": {
                "original": 0,
                "transformed": [1, self.decision.num_transforms],
                "contrast": [first, first + len(self.contrast) - 1] if len(self.contrast) else [],
            },
            **(
                {"floor": self.decision.floor, "unsupportive": len(self.decision.unsupportive)}
                if self.decision.unsupportive is not None
                else {}
            ),
            "verified": self.verification.summary() if self.verification is not None else None,
            **({"process_timings": self.process_timings} if self.process_timings else {}),
        }

    def metrics(self, poisons: Optional[Tensor]) -> dict[str, float]:
        metrics = {"collapsed": float(len(self.decision.collapsed))}
        if self.decision.scored is not None:  # collapse among these only: the paper's rule needs score_all
            metrics["scored"] = float(self.decision.scored.sum())
        if poisons is not None and self.decision.scored is None:  # the raw ranking needs every sample's score
            metrics["raw_topk_recall"] = topk_recall(self.scores[0], poisons)
        if self.verification is not None:  # the rule's own answer beside the verified one
            rule = detection_metrics(self.decision.flagged, self.scores.shape[1], poisons)
            metrics |= {f"rule_{key}": value for key, value in rule.items() if key != "removed_fraction"}
            metrics |= {key: float(len(getattr(self.verification, key))) for key in ("kept", "dropped", "recovered")}
        return metrics

    def details(self, index: int) -> dict[str, Any]:
        contrast, verified = self.decision.contrast, self.verification
        return {
            "contrast": float(contrast[index]) if contrast is not None else None,
            "count": int(self.decision.counts[index]),
            **({"recovered": bool(torch.isin(index, verified.recovered))} if verified is not None else {}),
        }


def _scored(queries: QuerySet, contrast: Tensor) -> TensorDataset:
    """What one scoring pass scores: the query and its copies, then the contrast images with the query's label."""
    images = torch.cat([queries.images, contrast.to(queries.images.dtype)])
    labels = torch.cat([queries.labels, queries.labels[:1].expand(len(contrast))])
    return TensorDataset(images, labels)
