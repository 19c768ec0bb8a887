"""InfluenceCollapseCallback: Δ-Influence after fit, then the corrective fit. Glue over ``delta_influence``."""

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import pytorch_lightning as pl
import torch
import torchvision
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision.io import ImageReadMode
from typing_extensions import override

from callbacks import media
from callbacks.run_folder import run_dir
from delta_influence import detection_metrics
from delta_influence.attacks.base import class_index
from delta_influence.audit import DeltaInfluence, DeltaInfluenceAudit
from delta_influence.collapse import topk_recall
from delta_influence.detectors import Detection, DetectionInput, Detector, InfluenceThreshold
from delta_influence.errors import ConfigError
from delta_influence.examples import evaluating, first_attacked, select_contrast
from delta_influence.files import publish
from delta_influence.influence import Strategy, check_trackable
from lightning_modules.unlearning import Unlearning, run_corrective_fit


class AuditError(ConfigError):
    """The audit cannot run on what it was given."""


@dataclass
class AuditResult:
    """What an audit found, and where it wrote it."""

    flagged: Tensor  # sorted indices into the training set
    counts: Optional[Tensor]  # Δ-Influence: per-sample collapse counts
    scores: Optional[Tensor]  # Δ-Influence: [1 + n + k, N] (query, copies, contrast); others: per-sample suspicion
    metrics: dict[str, float]
    output_dir: Path
    audit: Optional[DeltaInfluenceAudit]  # Δ-Influence: everything it computed, the decision's evidence included


class InfluenceCollapseCallback(Callback):
    """Runs Δ-Influence once training has ended, flags the training samples whose influence on a misbehaving test
    example collapses under transformations, and logs and saves what it found.

    What it needs from the run (see the README, "Add the callback to your own project"):

    - ``trainer.datamodule.eval_train_set``: the training set in evaluation form, ``(input, label)`` pairs, no
      augmentation, fixed order (index i is training sample i);
    - a query: ``query_image`` and ``query_label``, or ``trainer.datamodule.attack_test_set`` (the inputs the
      attack targets, labelled with what the attacker wants) from which it takes ``query_index`` or the first sample
      that the model classifies as the attacker wants;
    - for the clean-class contrast (on by default): ``trainer.datamodule.test_set``, clean test samples from which
      it takes the first ``num_contrast`` of the query's label that the model classifies correctly, or
      ``contrast_images``;
    - optional: ``poison_indices`` (ground truth, for precision and recall), ``mean`` and ``std`` of the
      normalisation (for ``query_image``, ``contrast_images``, ``space="pixel"`` and pictures), ``classes``.

    Args:
        query_index: Index into the attack's test set; ``None`` takes the first one the model gets wrong.
        query_image: Path of an image file to use as the query, instead of the attack's test set.
        query_label: The attacker's label for ``query_image``: a class index, or a name from the datamodule's
            ``classes``.
        require_misclassified: Stop with an error when the model does not predict the query's label; ``False``
            proceeds anyway.
        num_transforms: Number of transformed copies of the query.
        threshold: A copy counts as a collapse when it changes the sample's score by less than this.
        tolerance: How many copies may fail to collapse a flagged sample.
        num_contrast: Clean test samples of the query's label scored as contrast; a collapsed sample stays flagged
            only when it supports the query ``contrast_ratio`` times more than them. 0: the reference rule.
        contrast_ratio: How many times more a flagged sample must support the query than the clean class.
        same_label: With the contrast, keep only samples labelled with the query's label (the poisons of dirty- and
            clean-label attacks carry it); ``False`` keeps any label.
        contrast_images: Image files of clean samples of the query's label to use as the contrast, instead of
            the test set; they must have the training images' size and channels.
        strategy: kronfluence's Hessian approximation.
        space: Apply transformations to the ``normalized`` input (as the reference) or in ``pixel`` space.
        seed: Seed of the transformations and their labels.
        train_batch_size: Batch size of kronfluence's passes over the training set.
        num_workers: Data loader workers for kronfluence.
        output_dir: Where audits are written; default ``<run folder>/delta_influence``.
        factors_dir: Where kronfluence's factors are cached; default ``<default_root_dir>/influence_cache``.
        top_k: Rows of the table of top flagged samples.
        detector: Another detector to run instead of Δ-Influence (e.g.
            ``delta_influence.detectors.SpectralSignatures``); ``None`` runs Δ-Influence with the settings above.
        unlearning: The corrective fit launched once the victim's fit has ended (e.g.
            ``lightning_modules.unlearning.Retrain``); ``None`` stops after the audit.
    """

    def __init__(
        self,
        query_index: Optional[int] = None,
        query_image: Optional[str] = None,
        query_label: Optional[int | str] = None,
        require_misclassified: bool = True,
        num_transforms: int = 50,
        threshold: float = 0.0,
        tolerance: int = 2,
        num_contrast: int = 5,
        contrast_ratio: float = 2.0,
        same_label: bool = True,
        contrast_images: Optional[list[str]] = None,
        strategy: Strategy = "ekfac",
        space: Literal["normalized", "pixel"] = "normalized",
        seed: int = 0,
        train_batch_size: int = 128,
        num_workers: int = 0,
        output_dir: Optional[str] = None,
        factors_dir: Optional[str] = None,
        top_k: int = 32,
        unlearning: Optional[Unlearning] = None,
        detector: Optional[Detector] = None,
    ) -> None:
        self.delta_influence = DeltaInfluence(
            num_transforms=num_transforms,
            threshold=threshold,
            tolerance=tolerance,
            num_contrast=len(contrast_images) if contrast_images else num_contrast,
            contrast_ratio=contrast_ratio,
            same_label=same_label,
            strategy=strategy,
            space=space,
            seed=seed,
            train_batch_size=train_batch_size,
            num_workers=num_workers,
        )
        if contrast_images is not None and not (contrast_images and num_contrast):
            raise ConfigError(
                f"contrast_images={contrast_images!r} with num_contrast={num_contrast}: give at least one file and "
                "leave num_contrast above 0 (the number of files sets it), or drop contrast_images."
            )
        if (query_image is None) != (query_label is None):
            raise ConfigError("query_image and query_label go together: give both or neither.")
        if query_image is not None and query_index is not None:
            raise ConfigError("give query_index or query_image, not both.")
        if query_index is not None and query_index < 0:
            raise ConfigError(f"query_index={query_index} must be 0 or more.")
        self.query_index = query_index
        self.query_image = query_image
        self.query_label = query_label
        self.require_misclassified = require_misclassified
        self.contrast_images = contrast_images
        self.output_dir = output_dir
        self.factors_dir = factors_dir
        self.top_k = top_k
        self.unlearning = unlearning
        self.detector: Detector = detector if detector is not None else self.delta_influence
        self.result: Optional[AuditResult] = None
        self.corrective: Optional[dict] = None
        self._flagged: Optional[Tensor] = None  # the audit's flagged indices, on every process
        self.run_folder: Optional[Path] = None  # set by `train.py audit`: the audited checkpoint's run folder
        self._accelerator = "cpu"

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        self._accelerator = _accelerator(pl_module)
        # one process audits (the same answer as a single-process run of these weights); the others wait here
        flagged = None
        try:
            if trainer.is_global_zero:
                self.result = self.audit(trainer, pl_module)
                flagged = self.result.flagged
        finally:  # an audit that fails still releases the waiting processes, which then stop with it
            if trainer.world_size > 1:
                flagged = trainer.strategy.broadcast(flagged)
        self._flagged = flagged

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # by now the victim's strategy has torn down: the corrective fit gets its own fresh Trainer
        if self._flagged is None or self.unlearning is None:
            return
        distributed = _relaunchable(trainer)
        if trainer.is_global_zero or distributed:
            self.corrective = self.correct(trainer, pl_module, distributed)

    def audit_trained(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, data: Any, run_folder: Optional[Path] = None
    ) -> AuditResult:
        """The audit and, when one is configured, the corrective fit of a model trained elsewhere (``train.py
        audit``), on one process; written into ``run_folder`` when given."""
        self.run_folder = run_folder
        self._accelerator = _accelerator(pl_module)
        self.result = self.audit(trainer, pl_module, data)
        self._flagged = self.result.flagged
        if self.unlearning is not None:
            self.corrective = self.correct(trainer, pl_module, distributed=False, data=data)
        return self.result

    def correct(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, distributed: bool = False, data: Any = None
    ) -> Optional[dict]:
        """Runs the configured corrective fit on the audit's flagged samples; logs and returns its report.

        ``distributed``: every process of the victim's DDP run takes part, under the same strategy; otherwise the
        global rank 0 runs it alone on one device."""
        data = data if data is not None else trainer.datamodule
        loader = data.train_dataloader()
        report = run_corrective_fit(
            pl_module,
            self.unlearning,
            self._flagged,
            train_set=loader.dataset,
            eval_train_set=_eval_train_set(data),
            test_set=getattr(data, "test_set", None),
            attack_test_set=getattr(data, "attack_test_set", None),
            batch_size=loader.batch_size,
            max_epochs=trainer.max_epochs,
            out_dir=self._run_folder(trainer) / "unlearn",
            accelerator=self._accelerator,
            seed=self.delta_influence.seed,
            val_dataloaders=data.val_dataloader() if is_overridden("val_dataloader", data) else None,
            progress_bar=trainer.progress_bar_callback is not None,
            strategy="ddp" if distributed else "auto",
            devices=trainer.num_devices if distributed else 1,
            num_nodes=trainer.num_nodes if distributed else 1,
            save=trainer.is_global_zero,
        )
        if report is None:
            return None
        metrics = {f"unlearn/{key}": value for key, value in report.items() if isinstance(value, (int, float))}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.log_hyperparams({"unlearn/method": report["method"]})
            if isinstance(logger, WandbLogger):
                media.log_comparison_to_wandb(logger, report)
        rank_zero_info(_compare(report))
        return report

    def audit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, data: Any = None) -> AuditResult:
        """Runs the detector (Δ-Influence by default) on the trained ``pl_module``; writes, logs and returns what
        it found. ``data``: the data module, when the trainer has none attached (an audit without a fit)."""
        data = data if data is not None else trainer.datamodule
        train_set = _eval_train_set(data)
        detector = self.detector
        inputs = DetectionInput(
            model=pl_module,
            train_set=train_set,
            num_classes=0,
            factors_dir=Path(self.factors_dir or Path(trainer.default_root_dir) / "influence_cache"),
            clean_set=getattr(data, "test_set", None),
            poison_indices=_poisons(data),
            device=pl_module.device,
            mean=getattr(data, "mean", None),
            std=getattr(data, "std", None),
        )
        where, sources = None, []
        if isinstance(detector, (DeltaInfluence, InfluenceThreshold)):  # the influence detectors start from a query
            check_trackable(pl_module)
            image, label, where = self._query(data, train_set, pl_module)
            inputs.num_classes = self._check_query(pl_module, image, label, where)
            inputs.query = (image, label)
            if isinstance(detector, DeltaInfluence):
                inputs.contrast, sources = self._contrast(data, train_set, pl_module, label)
        else:
            with torch.no_grad(), evaluating(pl_module):
                inputs.num_classes = pl_module(train_set[0][0][None].to(pl_module.device)).shape[-1]
        rank_zero_info(_announce(detector, where, sources))
        detection = detector.detect(inputs)
        if isinstance(detection.evidence, DeltaInfluenceAudit):
            return self._finish_delta_influence(trainer, data, train_set, detection.evidence, where, sources)
        return self._finish(trainer, data, train_set, detection)

    def _finish_delta_influence(
        self, trainer, data, train_set, audit: DeltaInfluenceAudit, where: str, sources: list[str]
    ) -> AuditResult:
        """Δ-Influence's metrics, files (the decision's evidence included), pictures and logs."""
        settings = self.detector
        decision = audit.decision
        poisons = _poisons(data)
        metrics = detection_metrics(decision.flagged, len(train_set), poisons)
        metrics["collapsed"] = float(len(decision.collapsed))
        if poisons is not None:
            metrics["raw_topk_recall"] = topk_recall(audit.scores[0], poisons)
        metrics |= audit.timings
        summary = {
            "detector": settings.name,
            "query": where,
            "query_label": int(audit.queries.labels[0]),
            "contrast": sources,
            **asdict(settings),
            "num_contrast": len(sources),
            "num_train": len(train_set),
            "factors": audit.factors_name,
            "factors_reused": audit.factors_reused,
            "score_rows": {
                "original": 0,
                "transformed": [1, settings.num_transforms],
                "contrast": _contrast_rows(audit),
            },
            "metrics": metrics,
        }
        out = _write_atomically(
            Path(self.output_dir) if self.output_dir else self._run_folder(trainer) / "delta_influence",
            lambda folder: self._write(folder, summary, audit, data, poisons),
        )
        self._log(trainer, metrics, out, audit, train_set, data, poisons)
        rank_zero_info(_describe(metrics, out))
        return AuditResult(decision.flagged, decision.counts, audit.scores, metrics, out, audit)

    def _finish(self, trainer, data, train_set, detection: Detection) -> AuditResult:
        """Another detector's metrics, files and logs: ``<detector name>/`` in the run folder, metrics under
        ``audit/<detector name>/``."""
        poisons = _poisons(data)
        metrics = detection_metrics(detection.flagged, len(train_set), poisons)
        metrics["total_s"] = detection.seconds
        metrics |= {key: float(value) for key, value in detection.info.items()}
        settings = asdict(self.detector) if is_dataclass(self.detector) else {}
        summary = {"detector": detection.detector, **settings, "num_train": len(train_set), "metrics": metrics}

        def write(folder: Path) -> None:
            _write_flagged(folder, detection.flagged)
            if detection.scores is not None:
                torch.save(detection.scores, folder / "scores.pt")
            (folder / "summary.json").write_text(json.dumps(summary, indent=2))

        out = _write_atomically(
            Path(self.output_dir) if self.output_dir else self._run_folder(trainer) / detection.detector, write
        )
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"audit/{detection.detector}/{name}": value for name, value in metrics.items()},
                step=trainer.global_step,
            )
        rank_zero_info(_describe(metrics, out, detection.detector))
        return AuditResult(detection.flagged, None, detection.scores, metrics, out, None)

    def _run_folder(self, trainer: pl.Trainer) -> Path:
        """Where the audit and the corrective fit go: the run's folder (or the audited checkpoint's run folder)."""
        return self.run_folder if self.run_folder is not None else run_dir(trainer)

    def _contrast(
        self, data: Any, train_set: Dataset, pl_module: pl.LightningModule, label: int
    ) -> tuple[Optional[Tensor], list[str]]:
        """The clean contrast images of the query's label (``None`` when the contrast is off), and where they came
        from (files or test indices)."""
        if self.detector.num_contrast == 0:
            return None, []
        if self.contrast_images:
            images = [
                _read_image(path, train_set, data, "contrast_images", resize=False) for path in self.contrast_images
            ]
            return torch.stack(images), list(self.contrast_images)
        test_set = getattr(data, "test_set", None)
        if test_set is None:
            raise AuditError(
                "the clean-class contrast needs clean test samples of the query's label, and the datamodule has no "
                "`test_set`. Give one, pass contrast_images (image files of that class), or set num_contrast=0 for "
                "the reference rule."
            )
        indices = select_contrast(pl_module, test_set, label, self.detector.num_contrast)
        return torch.stack([torch.as_tensor(test_set[i][0]) for i in indices]), [f"test_set[{i}]" for i in indices]

    def _query(self, data: Any, train_set: Dataset, pl_module: pl.LightningModule) -> tuple[Tensor, int, str]:
        """The misbehaving example: a user's image file, or a sample of the attack's test set."""
        if self.query_image is not None:
            image = _read_image(self.query_image, train_set, data, "query_image", resize=True)
            label = class_index(self.query_label, getattr(data, "classes", None) or (), "query_label")
            return image, int(label), self.query_image
        attacked = getattr(data, "attack_test_set", None)
        if attacked is None:
            raise AuditError(
                "no query: the datamodule has no `attack_test_set`; pass query_image and query_label to "
                "InfluenceCollapseCallback, or give the datamodule an attack_test_set."
            )
        if self.query_index is not None:
            if self.query_index >= len(attacked):
                raise AuditError(
                    f"query_index={self.query_index} is out of range: the attack's test set has {len(attacked)} "
                    f"samples, so use 0..{len(attacked) - 1}, or leave query_index empty to pick one."
                )
            image, label = attacked[self.query_index]
            return image, int(label), f"attack_test_set[{self.query_index}]"
        index = first_attacked(pl_module, attacked)
        if index is None:
            raise AuditError(
                f"the model classifies none of the {len(attacked)} samples of the attack's test set as the attack's "
                "label, so there is no misbehaviour to trace. Train longer or check the attack; or pass query_index "
                "and require_misclassified=false to audit anyway."
            )
        image, label = attacked[index]
        return image, int(label), f"attack_test_set[{index}]"

    def _check_query(self, pl_module: pl.LightningModule, image: Tensor, label: int, where: str) -> int:
        """Checks the label is a class and, unless told otherwise, that the model predicts it; returns #classes."""
        with torch.no_grad(), evaluating(pl_module):
            logits = pl_module(image[None].to(pl_module.device))
        num_classes = logits.shape[-1]
        if not 0 <= label < num_classes:
            raise AuditError(f"query_label={label} is out of range for a model with {num_classes} classes.")
        predicted = int(logits.argmax(-1))
        if predicted != label and self.require_misclassified:
            raise AuditError(
                f"the model predicts class {predicted} for the query {where}, not the attack's label {label}: it does "
                "not show the bad behaviour, so Δ-Influence has nothing to trace. Choose another query, or set "
                "require_misclassified=false to proceed anyway."
            )
        return num_classes

    def _write(self, folder: Path, summary: dict, audit: DeltaInfluenceAudit, data: Any, poisons) -> None:
        """Writes every file of an audit into ``folder``."""
        decision, queries = audit.decision, audit.queries
        _write_flagged(folder, decision.flagged)
        torch.save(audit.scores, folder / "scores.pt")
        torch.save(decision.counts, folder / "counts.pt")
        torch.save(
            {
                "images": queries.images,
                "labels": queries.labels,
                "transforms": queries.transforms,
                "contrast_images": audit.contrast,
            },
            folder / "queries.pt",
        )
        if decision.contrast is not None:
            torch.save(
                {
                    "collapsed": decision.collapsed,
                    "contrast": decision.contrast,
                    "ratio": decision.contrast_ratio,
                    "same_label": decision.same_label,
                },
                folder / "contrast.pt",
            )
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
        mean, std, classes = getattr(data, "mean", None), getattr(data, "std", None), getattr(data, "classes", None)
        media.plot_queries(queries, folder / "queries.png", mean, std, classes)
        media.plot_collapse_counts(
            decision.counts, decision.num_transforms, decision.tolerance, folder / "collapse_counts.png", poisons
        )
        if decision.contrast is not None:
            media.plot_contrast(audit.scores[0], decision, folder / "contrast.png", poisons)

    def _log(self, trainer, metrics, out, audit: DeltaInfluenceAudit, train_set, data, poisons) -> None:
        """Sends the metrics to every logger and the pictures to W&B."""
        for logger in trainer.loggers:
            logger.log_metrics({f"audit/{name}": value for name, value in metrics.items()}, step=trainer.global_step)
        wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not wandb_loggers:
            return
        decision, scores = audit.decision, audit.scores
        order = scores[0, decision.flagged].argsort(descending=True)[: self.top_k]
        top_indices = decision.flagged[order].tolist()
        poison_set = set(poisons.tolist()) if poisons is not None else set()
        rows, images = [], []
        for rank, index in enumerate(top_indices):
            image, label = train_set[index]
            images.append(image)
            rows.append(
                {
                    "rank": rank,
                    "index": index,
                    "label": int(label),
                    "score": float(scores[0, index]),
                    "contrast": float(decision.contrast[index]) if decision.contrast is not None else None,
                    "count": int(decision.counts[index]),
                    "poison": index in poison_set if poisons is not None else None,
                }
            )
        mean, std = getattr(data, "mean", None), getattr(data, "std", None)
        thumbnails = media.to_displayable(torch.stack(images), mean, std) if images else torch.zeros(0)
        for logger in wandb_loggers:
            media.log_to_wandb(logger, out, rows, thumbnails, out / "flagged.json")


def _relaunchable(trainer: pl.Trainer) -> bool:
    """Whether the victim's fit ran in several processes launched by Lightning's DDP (one script per device), which
    a new DDP Trainer inside those processes can use again for the corrective fit."""
    strategy = trainer.strategy
    return trainer.world_size > 1 and type(strategy) is DDPStrategy and strategy._start_method == "popen"


def _accelerator(pl_module: pl.LightningModule) -> str:
    """The Lightning accelerator name of the module's device."""
    return "gpu" if pl_module.device.type == "cuda" else pl_module.device.type


def _write_flagged(folder: Path, flagged: Tensor) -> None:
    """The flagged indices as ``flagged.json`` and ``flagged.pt``."""
    (folder / "flagged.json").write_text(json.dumps({"flagged": flagged.tolist(), "count": len(flagged)}))
    torch.save(flagged, folder / "flagged.pt")


def _poisons(data: Any) -> Optional[Tensor]:
    """The data module's ground-truth poison indices, when it knows them."""
    poisons = getattr(data, "poison_indices", None)
    return torch.as_tensor(poisons) if poisons is not None and len(poisons) else None


def _announce(detector: Detector, where: Optional[str], sources: list[str]) -> str:
    """One line saying what the audit is about to do."""
    if isinstance(detector, DeltaInfluence):
        return (
            f"Δ-Influence: query {where}, {detector.num_transforms} transformed copies, {len(sources)} clean "
            "contrast images."
        )
    return f"{detector.name}: auditing the training set" + (f" on the query {where}." if where else ".")


def _eval_train_set(data: Any) -> Dataset:
    """The training set in evaluation form, refused when it is shuffled or augmented."""
    train_set = getattr(data, "eval_train_set", None)
    if train_set is None:
        raise AuditError(
            "the datamodule has no `eval_train_set`: InfluenceCollapseCallback needs the training set without "
            "augmentation, in a fixed order, as `datamodule.eval_train_set` (see the README's recipe)."
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
    for index in {0, len(train_set) // 2, len(train_set) - 1}:
        first, second = train_set[index][0], train_set[index][0]
        if not torch.equal(torch.as_tensor(first), torch.as_tensor(second)):
            raise AuditError(
                f"datamodule.eval_train_set returns a different input each time for sample {index}: it is augmented. "
                "Give the training set without augmentation (evaluation transforms only)."
            )
    return train_set


def _read_image(path: str, train_set: Dataset, data: Any, argument: str, resize: bool) -> Tensor:
    """Reads an image file as a model input, normalised; resized to the training images' size, or refused when
    ``resize`` is off and its size or channels differ from theirs."""
    if not Path(path).is_file():
        raise AuditError(f"{argument}={path!r} is not a file.")
    mean, std = getattr(data, "mean", None), getattr(data, "std", None)
    if mean is None or std is None:
        raise AuditError(f"{argument} needs the normalisation: give the datamodule `mean` and `std` attributes.")
    channels, height, width = train_set[0][0].shape
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
    return (image - torch.as_tensor(mean).view(-1, 1, 1)) / torch.as_tensor(std).view(-1, 1, 1)


def _contrast_rows(audit: DeltaInfluenceAudit) -> list[int]:
    """First and last row of the contrast queries in the score matrix (empty without contrast)."""
    first = 1 + audit.decision.num_transforms
    return [first, first + len(audit.contrast) - 1] if len(audit.contrast) else []


def _write_atomically(target: Path, write) -> Path:
    """Writes into a temporary folder, then publishes it as ``target`` (or ``target-2``, ... when taken): a finished
    audit is never overwritten and an interrupted one leaves no folder behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(staging)
        return publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _describe(metrics: dict[str, float], out: Path, who: str = "Δ-Influence") -> str:
    """One paragraph for the console."""
    share = 100 * metrics["removed_fraction"]
    text = f"{who} flagged {int(metrics['flagged'])} samples ({share:.1f} % of the training set)"
    if "precision" in metrics:
        text += f": precision {100 * metrics['precision']:.1f} %, recall {100 * metrics['recall']:.1f} %"
    if "raw_topk_recall" in metrics:
        text += f" (raw influence top-k recall {100 * metrics['raw_topk_recall']:.1f} %)"
    if "factors_s" in metrics:
        text += f". Factors {metrics['factors_s']:.1f} s, scores {metrics['scores_s']:.1f} s"
    else:
        text += f" in {metrics['total_s']:.1f} s"
    return f"{text}. Written to {out}"


def _compare(report: dict) -> str:
    """A before/after table for the console."""

    def pct(value: Optional[float]) -> str:
        return "   n/a" if value is None else f"{100 * value:5.1f}%"

    return (
        f"Corrective fit '{report['method']}' ({report['time_s']:.1f} s, {report['forgotten']} samples forgotten):\n"
        f"            clean acc   ASR\n"
        f"  before      {pct(report['before_acc'])}  {pct(report['before_asr'])}\n"
        f"  after       {pct(report['acc'])}  {pct(report['asr'])}\n"
        f"  corrected model: {report['checkpoint']}"
    )
