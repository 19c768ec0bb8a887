"""Δ-Influence as a detector: queries, one scoring pass over the training set, the decision rule, the verification
stage; and the evidence it leaves in the audit folder."""

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import Subset, TensorDataset

from delta_influence import plots
from delta_influence.collapse import SUPPORT_FLOOR, CollapseResult, check_rule, flag_collapsed
from delta_influence.datasets import labels_of
from delta_influence.detectors.base import Detection, DetectionInput, Detector, require
from delta_influence.errors import ConfigError
from delta_influence.evidence import AuditView, Evidence
from delta_influence.influence import (
    InfluenceAnalysis,
    InfluenceScores,
    Strategy,
    check_factor_examples,
    check_strategy,
    check_trackable,
    compute_influence_scores,
)
from delta_influence.metrics import detection_metrics, topk_recall
from delta_influence.queries import QuerySet, make_queries, scoring_set
from delta_influence.quiet import interactive
from delta_influence.verification import Verification, VerificationResult, head_data, head_of, retain_rows, verify


@dataclass(frozen=True)
class DeltaInfluence(Detector):
    """Δ-Influence (Li et al., 2024) with the clean-class contrast and the verification stage; every setting is
    checked here, once (the callback and the command line pass this object whole).

    As a ``Detector`` it needs the misbehaving query and, unless ``num_contrast=0``, clean contrast images of the
    query's label; its ``Detection`` holds the scores on the original query and a ``DeltaInfluenceEvidence``.
    ``num_contrast=0`` with ``verification=None`` is the paper's rule (collapse alone, every sample scored).

    Example:
        >>> DeltaInfluence(tolerance=50)
        Traceback (most recent call last):
        ...
        delta_influence.errors.ConfigError: tolerance=50 must lie in 0..49 (num_transforms - 1) for 50 copies.
    """

    name: ClassVar[str] = "delta_influence"
    title: ClassVar[str] = "Δ-Influence"
    needs_query: ClassVar[bool] = True

    num_transforms: int = field(default=50, metadata={"help": "transformed copies of the query"})
    threshold: float = field(default=0.0, metadata={"help": "a copy collapses a sample when Δ is below this"})
    tolerance: int = field(default=2, metadata={"help": "copies that may fail to collapse a flagged sample"})
    num_contrast: int = field(
        default=20,
        metadata={"help": "correctly classified clean test samples of the query's label; 0: the paper's rule"},
    )
    contrast_ratio: float = field(
        default=2.0, metadata={"help": "a flagged sample supports the query this many times more than the class"}
    )
    adaptive_ratio: bool = field(
        default=False,
        metadata={"help": "with same_label, raise contrast_ratio to where the label's ratios split into two clusters "
                          "(its clean members, the poisons) when that lies above it"},
    )  # fmt: skip
    same_label: bool = field(
        default=True, metadata={"help": "the contrast keeps only samples of the query's label; False: any label"}
    )
    support_floor: Optional[float] = field(
        default=SUPPORT_FLOOR,
        metadata={"help": "with same_label, also flag collapsed samples of the label below this share of its median "
                          "contrast score (of the scores above the floor; clean-label poisons); None: off"},
    )  # fmt: skip
    strategy: Strategy = field(default="ekfac", metadata={"help": "kronfluence's Hessian approximation"})
    space: Literal["normalized", "pixel"] = field(
        default="normalized", metadata={"help": "transform the normalised input (the reference) or pixels"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the transformations, their labels and the Fisher's draw"})
    train_batch_size: int = field(default=128, metadata={"help": "training samples per batch of kronfluence"})
    factor_examples: Optional[int] = field(
        default=2500,
        metadata={"help": "training samples the factor fits see (a seeded sample; all when fewer); None: all"},
    )
    score_all: bool = field(
        default=False,
        metadata={"help": "score every training sample; False: only the query's label when the rule can flag no "
                          "other (same_label with the contrast), the others' scores NaN"},
    )  # fmt: skip
    num_workers: int = field(default=0, metadata={"help": "data loader workers of kronfluence"})
    verification: Optional[Verification] = field(
        default=Verification(),
        metadata={"help": "the verification stage's settings (it needs the contrast); None: the rule's set as it is"},
    )

    def __post_init__(self) -> None:
        check_rule(self.num_transforms, self.tolerance, self.num_contrast, self.contrast_ratio, self.support_floor)
        if self.num_contrast == 0 and self.verification is not None:
            raise ConfigError(
                "num_contrast=0 (the paper's rule) leaves the verification stage no clean contrast to measure the "
                "query against; set verification=None with it (--detector.verification null), or num_contrast above 0."
            )
        if self.adaptive_ratio and not (self.same_label and self.num_contrast):
            raise ConfigError(
                "adaptive_ratio splits the contrast ratios of the query's label: it needs same_label=True and "
                f"num_contrast above 0 (got same_label={self.same_label}, num_contrast={self.num_contrast}); set "
                "adaptive_ratio=False otherwise."
            )
        check_strategy(self.strategy)
        if self.space not in ("normalized", "pixel"):
            raise ConfigError(f"space={self.space!r} is not known; use 'normalized' or 'pixel'.")
        check_factor_examples(self.factor_examples)
        if self.train_batch_size < 1 or self.num_workers < 0:
            raise ConfigError(
                f"train_batch_size={self.train_batch_size} must be at least 1 and num_workers={self.num_workers} "
                "at least 0."
            )

    def check_model(self, model: nn.Module) -> None:
        check_trackable(model)

    def _detect(self, inputs: DetectionInput) -> Detection:
        """Scores the training samples (those of the query's label, unless ``score_all`` or the rule needs every one)
        on the query, its copies and the contrast in one pass, flags by the rule, then verifies."""
        image, label = require(inputs.query, "the misbehaving query (an input and the attacker's label)", self.name)
        start = time.perf_counter()
        label = int(label)
        contrast = self._checked_contrast(inputs.contrast, image)
        queries = make_queries(
            image, label, inputs.num_classes, self.num_transforms, self.seed, self.space, inputs.mean, inputs.std
        )
        labels = labels_of(inputs.train_set) if len(contrast) and self.same_label else None  # may be a pass: once
        same_label = labels == label if labels is not None else None
        if same_label is not None and not same_label.any():
            raise ConfigError(
                f"no training sample carries the query's label {label}, and with same_label=True only those can be "
                "flagged; check the query's label, or set same_label=False."
            )
        scored = None if same_label is None or self.score_all else same_label  # all the rule can flag
        influence = compute_influence_scores(
            inputs.model, inputs.train_set, scoring_set(queries, contrast), inputs.factors_dir, self.strategy,
            inputs.device, self.train_batch_size, num_workers=self.num_workers, seed=self.seed,
            factor_examples=self.factor_examples, partitions=inputs.partitions,
            scored=None if scored is None else torch.nonzero(scored).flatten(),
        )  # fmt: skip
        decision = flag_collapsed(
            influence.scores, self.threshold, self.tolerance, len(contrast), self.contrast_ratio, same_label,
            self.support_floor if same_label is not None else None, scored,
            self.adaptive_ratio,
        )  # fmt: skip
        timings = dict(influence.timings)
        verified = None
        if self.verification is not None:
            began = time.perf_counter()
            verified = self._verify(inputs, queries, contrast, influence, decision, labels)
            timings["verify_s"] = time.perf_counter() - began
        timings["total_s"] = time.perf_counter() - start
        evidence = DeltaInfluenceEvidence(
            queries, contrast, influence.scores, decision, influence.factors_name, influence.factors_reused, timings,
            verified, influence.process_timings,
        )  # fmt: skip
        return Detection(self.name, evidence.flagged, evidence.scores[0], evidence, info=dict(timings))

    def _verify(
        self,
        inputs: DetectionInput,
        queries: QuerySet,
        contrast: Tensor,
        influence: InfluenceScores,
        decision: CollapseResult,
        labels: Optional[Tensor],
    ) -> VerificationResult:
        """The verification stage on the rule's flagged set: the candidates for recovery are the training samples of
        the query's label (any label without ``same_label``), their support EK-FAC scores with the audit's factors."""
        model, train_set, device = inputs.model, inputs.train_set, inputs.device
        image, label = queries.images[0], int(queries.labels[0])
        rows = retain_rows(labels, label, self.verification.seed) if labels is not None else None
        data = head_data(model, train_set, image, label, contrast, device, rows)  # with same_label: what tests read
        candidates = torch.nonzero(data.labels == label).flatten() if self.same_label else torch.arange(len(train_set))

        def support(weight: Tensor, bias: Tensor, indices: Tensor) -> Tensor:
            forgetting = copy.deepcopy(model)
            with torch.no_grad():
                head_of(forgetting).weight.copy_(weight)
                head_of(forgetting).bias.copy_(bias)
            analysis = InfluenceAnalysis(
                forgetting, Subset(train_set, indices.tolist()), inputs.factors_dir, self.strategy, device,
                self.train_batch_size, self.num_workers, seed=self.seed, factors_name=influence.factors_name,
            )  # fmt: skip
            scored = torch.cat([image[None], contrast.to(image.dtype)])
            return analysis.pairwise_scores(TensorDataset(scored, torch.full((len(scored),), label)))

        profiles = influence.scores[:, decision.flagged].T
        untested = None if decision.unsupportive is None else torch.isin(decision.flagged, decision.unsupportive)
        return verify(
            data, decision.flagged, profiles, candidates, support, self.verification, interactive(), untested=untested
        )

    def _checked_contrast(self, contrast: Optional[Tensor], image: Tensor) -> Tensor:
        """The contrast images, checked against the settings and the query's shape; empty without contrast."""
        if self.num_contrast == 0:
            if contrast is not None and len(contrast):
                raise ConfigError("contrast images were given but num_contrast=0 turns the contrast off; drop one.")
            return image.new_zeros((0, *image.shape))
        if contrast is None or len(contrast) == 0:
            raise ConfigError(
                "the clean-class contrast needs clean images of the query's label (num_contrast > 0); give them, or "
                "set num_contrast=0 (with verification=None) for the paper's rule."
            )
        if contrast.dim() != 4 or contrast.shape[1:] != image.shape:
            raise ConfigError(
                f"contrast images have shape {tuple(contrast.shape)}; expected [k, "
                f"{', '.join(map(str, image.shape))}], the query's channels and size."
            )
        return contrast


@dataclass
class DeltaInfluenceEvidence(Evidence):
    """What Δ-Influence computed: the queries, the training samples' scores on them (NaN: not scored), the rule's
    decision and the verification's; the evidence behind its flagged set."""

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
                 "split": decision.split, "same_label": decision.same_label, "floor": decision.floor,
                 "unsupportive": decision.unsupportive},
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
                {"contrast_ratio_applied": self.decision.contrast_ratio, "split": self.decision.split}
                if self.decision.split is not None
                else {}
            ),
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
            verified, rule = self.verification, self.decision.flagged
            metrics |= {key: float(len(getattr(verified, key))) for key in ("kept", "dropped", "recovered")}
            metrics["pruned"] = float((~torch.isin(rule, verified.kept)).sum())  # kept + pruned = the rule's set
            metrics["recovered_pruned"] = float(torch.isin(verified.recovered, rule).sum())  # pruned, then recovered
        return metrics

    def details(self, index: int) -> dict[str, Any]:
        contrast, verified = self.decision.contrast, self.verification
        return {
            "contrast": float(contrast[index]) if contrast is not None else None,
            "count": int(self.decision.counts[index]),
            **({"recovered": bool(torch.isin(index, verified.recovered))} if verified is not None else {}),
        }
