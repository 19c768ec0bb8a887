"""The audit: a trained model and its data in, a finished audit folder out.

``run_audit`` chooses and checks the misbehaving query and the clean contrast for the detectors that need them, runs
the detector, measures what it flagged against the ground truth when known, and publishes the flagged indices, the
summary, the scores and the detector's evidence (files and pictures) as one folder, atomically. The Lightning
callback, ``train.py audit``, the correction loop, the benchmarks and the tests all audit through it.
"""

import json
import time
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torchvision
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset
from torchvision.io import ImageReadMode

from delta_influence.attacks.base import class_index
from delta_influence.detectors.base import Detection, DetectionInput, Detector
from delta_influence.errors import ConfigError
from delta_influence.evidence import AuditView, Evidence
from delta_influence.examples import evaluating, first_attacked, select_contrast
from delta_influence.files import shown, write_new
from delta_influence.influence import DataPartitions
from delta_influence.metrics import detection_metrics
from delta_influence.plots import to_displayable


class AuditError(ConfigError):
    """The audit cannot run on what it was given."""


@dataclass(frozen=True)
class QueryChoice:
    """Which test example the influence detectors trace, and which clean images they contrast it with.

    Args:
        index: Index into the attack's test set; ``None`` takes the first one the model gets wrong.
        image: Path of an image file to use as the query, instead of the attack's test set.
        label: The attacker's label for ``image``: a class index, or a name from the data's ``classes``.
        require_misclassified: Stop with an error when the model does not predict the query's label.
        contrast_images: Image files of clean samples of the query's label, instead of the test set's (all of them
            are used, whatever the detector's ``num_contrast``).

    Example:
        >>> QueryChoice(image="x.png")
        Traceback (most recent call last):
        ...
        delta_influence.audit.AuditError: query_image and query_label go together: give both or neither.
    """

    index: Optional[int] = None
    image: Optional[str] = None
    label: Optional[int | str] = None
    require_misclassified: bool = True
    contrast_images: Optional[tuple[str, ...]] = None

    def __post_init__(self) -> None:
        if (self.image is None) != (self.label is None):
            raise AuditError("query_image and query_label go together: give both or neither.")
        if self.image is not None and self.index is not None:
            raise AuditError("give query_index or query_image, not both.")
        if self.index is not None and self.index < 0:
            raise AuditError(f"query_index={self.index} must be 0 or more.")
        if self.contrast_images is not None and not self.contrast_images:
            raise AuditError("contrast_images=[] holds no file: give at least one, or drop contrast_images.")


def check_choice(choice: QueryChoice, detector: Detector) -> None:
    """Refuses a query choice the detector would ignore in part: contrast images for a detector without contrast."""
    if choice.contrast_images and not detector.num_contrast:
        raise AuditError(
            f"contrast_images={list(choice.contrast_images)!r} were given, but the detector uses no contrast "
            "(num_contrast=0); drop contrast_images, or give the detector num_contrast above 0."
        )


@dataclass
class AuditData:
    """The data an audit reads: the training set in evaluation form (``(input, label)`` pairs, fixed order, no
    augmentation: flagged indices point into it) and, when there are, the clean test set, the attack's test set
    (inputs labelled with what the attacker wants), the true poison indices, the normalisation and class names.
    ``indices``: where ``train_set`` is part of a larger training set (``subset``), the position of each of its
    samples in that set; the published flagged indices point into the larger set."""

    train_set: Dataset
    test_set: Optional[Dataset] = None
    attack_test_set: Optional[Dataset] = None
    poison_indices: Optional[Tensor] = None
    mean: Optional[Tensor] = None
    std: Optional[Tensor] = None
    classes: Optional[Sequence[str]] = None
    indices: Optional[Tensor] = None

    @classmethod
    def of(cls, source: Any) -> "AuditData":
        """Reads a data module's ``eval_train_set``, ``test_set``, ``attack_test_set``, ``poison_indices``, ``mean``,
        ``std`` and ``classes`` (only the first is required), refusing a training set that is shuffled or augmented."""
        poisons = getattr(source, "poison_indices", None)
        return cls(
            train_set=eval_train_set_of(source),
            test_set=getattr(source, "test_set", None),
            attack_test_set=getattr(source, "attack_test_set", None),
            poison_indices=torch.as_tensor(poisons) if poisons is not None and len(poisons) else None,
            mean=getattr(source, "mean", None),
            std=getattr(source, "std", None),
            classes=getattr(source, "classes", None),
        )

    def view(self) -> AuditView:
        return AuditView(self.train_set, self.poison_indices, self.mean, self.std, self.classes)

    def subset(self, keep: Tensor) -> "AuditData":
        """The same data with only the training samples ``keep`` (indices into this training set): what a model
        trained without the others is audited on. Its poison indices and ``indices`` are positions in the part, so
        that an audit of it still publishes indices into the whole training set.

        Example:
            >>> data = AuditData(list(range(10)), poison_indices=torch.tensor([2, 5, 7]))
            >>> part = data.subset(torch.tensor([0, 1, 5, 6, 7]))
            >>> part.poison_indices.tolist(), part.indices.tolist(), part.subset(torch.tensor([1, 4])).indices.tolist()
            ([2, 4], [0, 1, 5, 6, 7], [1, 7])
        """
        keep = torch.as_tensor(keep, dtype=torch.long)
        poisons = None
        if self.poison_indices is not None:
            position = torch.full((len(self.train_set),), -1, dtype=torch.long)
            position[keep] = torch.arange(len(keep))
            poisons = position[self.poison_indices]
            poisons = poisons[poisons >= 0].sort().values
            poisons = poisons if len(poisons) else None  # as `of` gives it: none left to measure against
        indices = self.indices[keep] if self.indices is not None else keep
        return replace(self, train_set=Subset(self.train_set, keep.tolist()), poison_indices=poisons, indices=indices)

    def whole(self, positions: Tensor) -> Tensor:
        """Positions in ``train_set`` as indices into the whole training set (the same without ``indices``)."""
        return self.indices[positions] if self.indices is not None else positions


@dataclass
class AuditResult:
    """A finished audit: the detection, its metrics and summary, and the folder it was published as."""

    detection: Detection
    metrics: dict[str, float]
    summary: dict[str, Any]
    output_dir: Path
    data: AuditData = field(repr=False)
    title: str = ""
    query: Optional[QueryChoice] = None  # the query traced, as a choice that picks it again (index resolved)

    @property
    def flagged(self) -> Tensor:
        """The flagged samples, as indices into the whole training set."""
        return self.data.whole(self.detection.flagged)

    @property
    def evidence(self) -> Optional[Evidence]:
        """The detector's evidence, when it is an ``Evidence`` (files of its own)."""
        evidence = self.detection.evidence
        return evidence if isinstance(evidence, Evidence) else None

    @property
    def pictures(self) -> list[Path]:
        """The audit's pictures (PNG files in its folder)."""
        return sorted(self.output_dir.glob("*.png"))

    def top_flagged(self, k: int) -> tuple[list[dict[str, Any]], Tensor]:
        """The ``k`` flagged samples with the highest scores: a row of details each, and their images shown in
        [0, 1]."""
        scores, flagged = self.detection.scores, self.detection.flagged
        order = scores[flagged].argsort(descending=True)[:k] if scores is not None else torch.arange(len(flagged))[:k]
        poisons = set(self.data.poison_indices.tolist()) if self.data.poison_indices is not None else None
        rows, images = [], []
        for rank, index in enumerate(flagged[order].tolist()):
            image, label = self.data.train_set[index]
            images.append(torch.as_tensor(image))
            rows.append(
                {
                    "rank": rank,
                    "index": int(self.data.whole(torch.tensor(index))),
                    "label": int(label),
                    "score": float(scores[index]) if scores is not None else None,
                    "contrast": None,
                    "count": None,
                    "poison": index in poisons if poisons is not None else None,
                    **(self.evidence.details(index) if self.evidence is not None else {}),
                }
            )
        if not images:
            return rows, torch.zeros(0)
        return rows, to_displayable(torch.stack(images), self.data.mean, self.data.std)

    def describe(self) -> str:
        """One paragraph for the console."""
        metrics = self.metrics
        text = f"{self.title} flagged {int(metrics['flagged'])} samples ({100 * metrics['removed_fraction']:.1f} % of "
        text += "the training set)"
        if "precision" in metrics:
            text += f": precision {100 * metrics['precision']:.1f} %, recall {100 * metrics['recall']:.1f} %"
        if "kept" in metrics:  # kept + recovered = flagged; kept + pruned = the rule's
            text += (
                f"; the verification's prune kept {int(metrics['kept'])} of the rule's {int(metrics['rule_flagged'])} "
                f"and its recovery added {int(metrics['recovered'])} ({int(metrics['recovered_pruned'])} of them "
                "pruned before)"
            )
        if "scored" in metrics:
            text += f"; {int(metrics['collapsed'])} of the {int(metrics['scored'])} samples of the label collapse"
        elif "collapsed" in metrics:
            text += f"; the paper's rule alone (collapse, no contrast) flags {int(metrics['collapsed'])}"
        if "raw_topk_recall" in metrics:
            text += f" (raw influence top-k recall {100 * metrics['raw_topk_recall']:.1f} %)"
        if "factors_s" in metrics:
            text += f". Factors {metrics['factors_s']:.1f} s, scores {metrics['scores_s']:.1f} s"
            if "verify_s" in metrics:
                text += f", verification {metrics['verify_s']:.1f} s"
        else:
            text += f" in {metrics['total_s']:.1f} s"
        return f"{text}. Written to {shown(self.output_dir)}"


def run_audit(
    model: nn.Module,
    data: AuditData,
    detector: Detector,
    output_dir: str | Path,
    factors_dir: str | Path,
    choice: QueryChoice = QueryChoice(),
    device: Optional[torch.device | str] = None,
    log: Callable[[str], object] = print,
    epoch_seconds: Optional[float] = None,
    partitions: Optional[DataPartitions] = None,
) -> AuditResult:
    """Audits ``model`` with ``detector`` and publishes the result as ``output_dir`` (or ``output_dir-2``, ... when
    taken; a finished audit is never overwritten and an interrupted one leaves nothing behind).

    Args:
        model: The trained classifier (its forward returns logits); it is not modified.
        data: The training set in evaluation form and whatever else the data has (``AuditData.of(datamodule)``).
        detector: Δ-Influence (``delta_influence.DeltaInfluence``) or any other ``Detector``.
        output_dir: The audit folder's name.
        factors_dir: Where kronfluence's factors are cached (shared by audits of the same weights and data).
        choice: The query and contrast, for the detectors that need them.
        device: Where to compute; default: where the model is.
        log: Where the two console lines go (what is about to happen, what was found).
        epoch_seconds: One training epoch of the audited run: every stage's time is then also given in epochs
            (``<stage>_epochs``), the unit in which a user plans the audit's cost.
        partitions: The processes of a distributed run that share the influence passes, this one being process 0
            (the others in ``delta_influence.influence.serve``).

    Returns:
        The detection, its metrics (flagged count and share; precision, recall and F1 when the true poisons are
        known; the detector's own; stage times) and summary, and the published folder.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    check_choice(choice, detector)
    detector.check_model(model)
    inputs = DetectionInput(
        model=model, train_set=data.train_set, num_classes=0, factors_dir=Path(factors_dir), clean_set=data.test_set,
        poison_indices=data.poison_indices, device=device, mean=data.mean, std=data.std, partitions=partitions,
    )  # fmt: skip
    context: dict[str, Any] = {}
    query = None
    if detector.needs_query:
        image, label, where, query = _query(model, data, choice)
        inputs.num_classes = _check_query(model, image, label, where, choice.require_misclassified, device)
        inputs.query = (image, label)
        context = {"query": where, "query_label": label, "contrast": []}
        if detector.num_contrast:
            inputs.contrast, context["contrast"] = _contrast(model, data, choice, label, detector.num_contrast)
    else:
        with torch.no_grad(), evaluating(model, device):
            inputs.num_classes = model(torch.as_tensor(data.train_set[0][0])[None].to(device)).shape[-1]
    title = detector.title or detector.name
    log(_announce(title, detector, context))
    detection = detector.detect(inputs)
    metrics = detection_metrics(detection.flagged, len(data.train_set), data.poison_indices)
    metrics["total_s"] = detection.seconds
    evidence = detection.evidence if isinstance(detection.evidence, Evidence) else None  # others' stay in memory
    if evidence is not None:
        metrics |= evidence.metrics(data.poison_indices)
    metrics |= {key: float(value) for key, value in detection.info.items()}
    if epoch_seconds:
        metrics |= {
            f"{key[:-2]}_epochs": value / epoch_seconds for key, value in list(metrics.items()) if key.endswith("_s")
        }
    summary = {
        "detector": detection.detector,
        **context,
        **(asdict(detector) if is_dataclass(detector) else {}),
        "num_train": len(data.train_set),
        **({"part_of_training_set": "train_indices.pt"} if data.indices is not None else {}),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),  # which of a run's audits is the newest
        **(evidence.summary() if evidence is not None else {}),
        "metrics": metrics,
    }
    out = write_new(Path(output_dir), lambda folder: _write(folder, detection, evidence, summary, data), folder=True)
    result = AuditResult(detection, metrics, summary, out, data, title, query)
    log(result.describe())
    return result


def _write(folder: Path, detection: Detection, evidence: Optional[Evidence], summary: dict, data: AuditData) -> None:
    """Every file of an audit: the flagged indices (into the whole training set), the evidence's own files, the
    per-sample scores unless the evidence wrote its own, and the summary. An audit of part of the training set also
    writes ``train_indices.pt``, the whole set's index of each audited sample: the per-sample files' columns."""
    flagged = data.whole(detection.flagged)
    (folder / "flagged.json").write_text(json.dumps({"flagged": flagged.tolist(), "count": len(flagged)}))
    torch.save(flagged, folder / "flagged.pt")
    if data.indices is not None:
        torch.save(data.indices, folder / "train_indices.pt")
    if evidence is not None:
        evidence.write(folder, data.view())
    if detection.scores is not None and not (folder / "scores.pt").exists():
        torch.save(detection.scores, folder / "scores.pt")
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))


def _announce(title: str, detector: Detector, context: dict[str, Any]) -> str:
    """One line saying what the audit is about to do."""
    if not context:
        return f"{title}: auditing the training set."
    copies = getattr(detector, "num_transforms", None)
    text = f"{title}: query {context['query']}"
    if copies:
        text += f", {copies} transformed copies"
    if detector.num_contrast:
        text += f", {len(context['contrast'])} clean contrast images"
    return text + "."


def misbehaves(model: nn.Module, data: AuditData, choice: QueryChoice, device: Optional[torch.device] = None) -> bool:
    """Whether ``model`` still predicts the attacker's label for the query ``choice`` picks (an audit's
    ``AuditResult.query``)."""
    image, label, _, _ = _query(model, data, choice)
    return int(_logits(model, image, device or next(model.parameters()).device).argmax(-1)) == label


def _query(model: nn.Module, data: AuditData, choice: QueryChoice) -> tuple[Tensor, int, str, QueryChoice]:
    """The misbehaving example (a user's image file, or a sample of the attack's test set), and the choice that picks
    it again whatever the model."""
    if choice.image is not None:
        image = _read_image(choice.image, data, "query_image", resize=True)
        return image, int(class_index(choice.label, data.classes or (), "query_label")), choice.image, choice
    attacked = data.attack_test_set
    if attacked is None:
        raise AuditError(
            "no query: the data has no `attack_test_set`; pass query_image and query_label, or give the datamodule "
            "an attack_test_set."
        )
    index = choice.index
    if index is not None and index >= len(attacked):
        raise AuditError(
            f"query_index={index} is out of range: the attack's test set has {len(attacked)} samples, so use "
            f"0..{len(attacked) - 1}, or leave query_index empty to pick one."
        )
    if index is None:
        index = first_attacked(model, attacked)
    if index is None:
        raise AuditError(
            f"the model classifies none of the {len(attacked)} samples of the attack's test set as the attack's "
            "label, so there is no misbehaviour to trace. Train longer or check the attack; or pass query_index "
            "and require_misclassified=false to audit anyway."
        )
    image, label = attacked[index]
    return torch.as_tensor(image), int(label), f"attack_test_set[{index}]", replace(choice, index=index)


def _check_query(
    model: nn.Module, image: Tensor, label: int, where: str, require_misclassified: bool, device: torch.device
) -> int:
    """Checks the label is a class and, unless told otherwise, that the model predicts it; returns #classes."""
    logits = _logits(model, image, device)
    num_classes = logits.shape[-1]
    if not 0 <= label < num_classes:
        raise AuditError(f"query_label={label} is out of range for a model with {num_classes} classes.")
    predicted = int(logits.argmax(-1))
    if predicted != label and require_misclassified:
        raise AuditError(
            f"the model predicts class {predicted} for the query {where}, not the attack's label {label}: it does "
            "not show the bad behaviour, so Δ-Influence has nothing to trace. Choose another query, or set "
            "require_misclassified=false to proceed anyway."
        )
    return num_classes


def _logits(model: nn.Module, image: Tensor, device: torch.device) -> Tensor:
    """The model's logits for one input, in eval mode on ``device``."""
    with torch.no_grad(), evaluating(model, device):
        return model(image[None].to(device))


def _contrast(
    model: nn.Module, data: AuditData, choice: QueryChoice, label: int, count: int
) -> tuple[Tensor, list[str]]:
    """The clean contrast images of the query's label, and where they came from (files or test indices)."""
    if choice.contrast_images:
        images = [_read_image(path, data, "contrast_images", resize=False) for path in choice.contrast_images]
        return torch.stack(images), list(choice.contrast_images)
    if data.test_set is None:
        raise AuditError(
            "the clean-class contrast needs clean test samples of the query's label, and the datamodule has no "
            "`test_set`. Give one, pass contrast_images (image files of that class), or set num_contrast=0 and "
            "verification=None for the paper's rule (--detector.num_contrast 0 --detector.verification null)."
        )
    indices = select_contrast(model, data.test_set, label, count)
    images = torch.stack([torch.as_tensor(data.test_set[i][0]) for i in indices])
    return images, [f"test_set[{i}]" for i in indices]


def eval_train_set_of(source: Any) -> Dataset:
    """A data module's training set in evaluation form (``eval_train_set``), refused when it is shuffled or
    augmented."""
    train_set = getattr(source, "eval_train_set", None)
    if train_set is None:
        raise AuditError(
            "the datamodule has no `eval_train_set`: the audit needs the training set without augmentation, in a "
            "fixed order, as `datamodule.eval_train_set` (see the README's recipe)."
        )
    if isinstance(train_set, DataLoader):
        if isinstance(train_set.sampler, RandomSampler):
            raise AuditError(
                "datamodule.eval_train_set is a shuffling DataLoader: index i must always mean the same sample, so "
                "give the Dataset (or a DataLoader with shuffle=False)."
            )
        train_set = train_set.dataset
    if len(train_set) == 0:
        raise AuditError("datamodule.eval_train_set is empty.")
    _check_not_augmented(train_set)
    return train_set


def _check_not_augmented(train_set: Dataset, samples: int = 16, reads: int = 3) -> None:
    """Refuses a training set that returns a different input when a sample is read again: ``samples`` samples spread
    over the set, each read ``reads`` times, every read under a torch seed of its own (the caller's random state is
    left as it is). A transform that changes a sample half the time, from torch's generator or any other, goes
    unnoticed with a chance of ``2 ** -(samples * (reads - 1))``: one in four billion."""
    positions = torch.linspace(0, len(train_set) - 1, min(samples, len(train_set))).round().long().unique()
    with torch.random.fork_rng(devices=[]):
        for index in positions.tolist():
            inputs = []
            for read in range(reads):
                torch.manual_seed(reads * index + read)
                inputs.append(torch.as_tensor(train_set[index][0]))
            if not all(torch.equal(inputs[0], other) for other in inputs[1:]):
                raise AuditError(
                    f"datamodule.eval_train_set returns a different input each time for sample {index}: it is "
                    "augmented. Give the training set without augmentation (evaluation transforms only)."
                )


def _read_image(path: str, data: AuditData, argument: str, resize: bool) -> Tensor:
    """Reads an image file as a model input, normalised; resized to the training images' size, or refused when
    ``resize`` is off and its size or channels differ from theirs."""
    if not Path(path).is_file():
        raise AuditError(f"{argument}={path!r} is not a file.")
    if data.mean is None or data.std is None:
        raise AuditError(f"{argument} needs the normalisation: give the datamodule `mean` and `std` attributes.")
    channels, height, width = data.train_set[0][0].shape
    if resize:
        image = torchvision.io.decode_image(path, mode=ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB)
        image = torchvision.transforms.v2.functional.resize(image, [height, width], antialias=True)
    else:
        image = torchvision.io.decode_image(path)
        if tuple(image.shape) != (channels, height, width):
            raise AuditError(
                f"{argument} holds {path!r} of shape {tuple(image.shape)} (channels, height, width); the training "
                f"images are {(channels, height, width)}. Give clean images of the training images' size and channels."
            )
    image = image.float() / 255
    return (image - torch.as_tensor(data.mean).view(-1, 1, 1)) / torch.as_tensor(data.std).view(-1, 1, 1)
