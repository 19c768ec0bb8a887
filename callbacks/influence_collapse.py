"""InfluenceCollapseCallback: Δ-Influence after fit, then the corrective fit. Lightning glue over the audit pipeline
(``delta_influence.pipeline``) and ``CorrectiveFit``."""

import contextlib
import time
from pathlib import Path
from typing import Any, Literal, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import Tensor
from typing_extensions import override

from callbacks import media
from callbacks.run_folder import RunConfigCallback, run_dir
from delta_influence.audit import DeltaInfluence
from delta_influence.collapse import SUPPORT_FLOOR
from delta_influence.detectors import Detector
from delta_influence.errors import ConfigError
from delta_influence.files import shown
from delta_influence.influence import DataPartitions, Strategy, finish, serve
from delta_influence.pipeline import AuditData, AuditResult, QueryChoice, run_audit
from delta_influence.stages import read_stages, record, run_stage
from delta_influence.verification import Verification
from lightning_modules.unlearning import CorrectiveFit, Unlearning, correct_in_rounds


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
        contrast_statistic: A sample's contrast score: the ``mean`` of its scores on the contrast images, or the
            largest magnitude (``max``).
        support_floor: With ``same_label``, also flag a collapsed sample of the query's label whose contrast score
            is below this share of its label's median (of the scores at or above the floor: it supports the clean
            class far less than its classmates, clean-label poisons); ``None``: the ratio alone.
        contrast_images: Image files of clean samples of the query's label to use as the contrast, instead of
            the test set; they must have the training images' size and channels.
        strategy: kronfluence's Hessian approximation.
        space: Apply transformations to the ``normalized`` input (as the reference) or in ``pixel`` space.
        seed: Seed of the transformations and their labels.
        train_batch_size: Batch size of kronfluence's passes over the training set.
        num_workers: Data loader workers for kronfluence.
        factor_examples: How many training samples the EK-FAC factor fits see (a seeded random sample); ``None``: all.
        score_all: Score every training sample; ``False``: only those of the query's label when the rule can flag no
            other (``same_label`` with the contrast), the others' columns of ``scores.pt`` NaN.
        verify: Test the rule's flagged set by unlearning its parts and recover the poisons the model no longer
            feels (``delta_influence.verification``); ``None``: on whenever the contrast is (``num_contrast > 0``).
        verification: The verification stage's settings.
        output_dir: Where audits are written; default ``<run folder>/delta_influence``.
        factors_dir: Where kronfluence's factors are cached; default ``<default_root_dir>/influence_cache``.
        top_k: Rows of the table of top flagged samples.
        detector: Another detector to run instead of Δ-Influence (e.g.
            ``delta_influence.detectors.SpectralSignatures``); ``None`` runs Δ-Influence with the settings above.
        unlearning: The corrective fit launched once the victim's fit has ended (e.g.
            ``lightning_modules.unlearning.Retrain``); ``None`` stops after the audit.
        corrective_rounds: At most this many corrective fits: while the corrected model still predicts the attacker's
            label for the query, audit it again on the samples it kept and fit again without everything flagged so
            far (``correct_in_rounds``); 1: one fit. Under DDP the rounds after the first run on process 0 alone.
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
        contrast_statistic: Literal["mean", "max"] = "mean",
        support_floor: Optional[float] = SUPPORT_FLOOR,
        contrast_images: Optional[list[str]] = None,
        strategy: Strategy = "ekfac",
        space: Literal["normalized", "pixel"] = "normalized",
        seed: int = 0,
        train_batch_size: int = 128,
        num_workers: int = 0,
        factor_examples: Optional[int] = None,
        score_all: bool = False,
        verify: Optional[bool] = None,
        verification: Verification = Verification(),
        output_dir: Optional[str] = None,
        factors_dir: Optional[str] = None,
        top_k: int = 32,
        unlearning: Optional[Unlearning] = None,
        detector: Optional[Detector] = None,
        corrective_rounds: int = 2,
    ) -> None:
        if corrective_rounds < 1:
            raise ConfigError(
                f"corrective_rounds={corrective_rounds}: give 1 (one corrective fit) or more (the corrected model is "
                "audited again while it still misbehaves on the query)."
            )
        if contrast_images is not None and num_contrast == 0:
            raise ConfigError(
                f"contrast_images={contrast_images!r} with num_contrast=0: leave num_contrast above 0 (the number of "
                "files sets it), or drop contrast_images."
            )
        if verify and num_contrast == 0:
            raise ConfigError(
                "verify=true with num_contrast=0: the verification stage measures the query against the clean "
                "contrast, which num_contrast=0 turns off; set verify=false with the reference rule, or num_contrast "
                "above 0."
            )
        self.delta_influence = DeltaInfluence(
            num_transforms=num_transforms,
            threshold=threshold,
            tolerance=tolerance,
            num_contrast=len(contrast_images) if contrast_images else num_contrast,
            contrast_ratio=contrast_ratio,
            same_label=same_label,
            contrast_statistic=contrast_statistic,
            support_floor=support_floor,
            strategy=strategy,
            space=space,
            seed=seed,
            train_batch_size=train_batch_size,
            num_workers=num_workers,
            factor_examples=factor_examples,
            score_all=score_all,
            verification=verification if (num_contrast > 0 if verify is None else verify) else None,
        )
        contrast = tuple(contrast_images) if contrast_images is not None else None
        self.choice = QueryChoice(query_index, query_image, query_label, require_misclassified, contrast)
        self.output_dir = output_dir
        self.factors_dir = factors_dir
        self.top_k = top_k
        self.unlearning = unlearning
        self.corrective_rounds = corrective_rounds
        self.detector: Detector = detector if detector is not None else self.delta_influence
        self.result: Optional[AuditResult] = None
        self.corrective: Optional[dict] = None
        self._flagged: Optional[Tensor] = None  # the audit's flagged indices, on every process
        self.run_folder: Optional[Path] = None  # set by `train.py audit`: the audited checkpoint's run folder
        self._epoch_seconds: list[float] = []  # the fit's epochs, to state the audit's cost in epochs

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.fast_dev_run:
            record(self._run_folder(trainer), "fit", "running")
        self._epoch_seconds = []

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_seconds.append(time.perf_counter() - self._epoch_start)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # training that stops early is recorded as such (the audit and the corrective fit record themselves)
        folder = self._run_folder(trainer)
        if trainer.is_global_zero and read_stages(folder).get("fit", {}).get("status") == "running":
            stopped = isinstance(exception, (SIGTERMException, KeyboardInterrupt))
            record(folder, "fit", "interrupted" if stopped else "failed", error=f"{type(exception).__name__}")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        _close_epoch_bar(trainer, pl_module)  # the audit's own bars follow, not under the last epoch's
        # process 0 audits; under DDP the others take their share of its influence passes (kronfluence's data
        # partitions), then get its flagged set
        partitions = DataPartitions() if _partitionable(trainer) else None
        if partitions is not None:
            partitions.align(pl_module)  # process 0's batch-norm statistics everywhere: one model audited
        flagged = None
        try:
            if trainer.is_global_zero:
                folder = self._run_folder(trainer)
                record(folder, "fit", "finished")
                with run_stage(folder, "audit", _finish_audit(trainer, folder)):
                    self.result = self.audit(trainer, pl_module, partitions=partitions)
                flagged = self.result.flagged
            elif partitions is not None:
                # a signal ends this process's part as process 0's (Lightning's handler would broadcast instead)
                with run_stage(None, "audit", "Process 0 says how to finish it."):
                    train_set = AuditData.of(trainer.datamodule).train_set  # as process 0 reads it
                    flagged = serve(pl_module, train_set, self._factors_dir(trainer), pl_module.device, partitions)
        except BaseException:
            with contextlib.suppress(Exception):  # an audit that fails still releases the waiting processes,
                _release(trainer, partitions, None)  # and its own error is the one reported
            raise
        self._flagged = _release(trainer, partitions, flagged)

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
        with run_stage(run_folder, "audit", "Run the same command again to finish it."):
            self.result = self.audit(trainer, pl_module, data)
        self._flagged = self.result.flagged
        if self.unlearning is not None:
            self.corrective = self.correct(trainer, pl_module, distributed=False, data=data)
        return self.result

    def audit(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        data: Any = None,
        partitions: Optional[DataPartitions] = None,
    ) -> AuditResult:
        """Runs the detector (Δ-Influence by default) on the trained ``pl_module`` through the audit pipeline; logs
        and returns what it found. ``data``: the data module, when the trainer has none attached; ``partitions``: the
        processes of a DDP run that share the influence passes."""
        detector = self.detector
        result = run_audit(
            pl_module,
            AuditData.of(data if data is not None else trainer.datamodule),
            detector,
            output_dir=Path(self.output_dir) if self.output_dir else self._run_folder(trainer) / detector.name,
            factors_dir=self._factors_dir(trainer),
            choice=self.choice,
            log=rank_zero_info,
            epoch_seconds=sum(self._epoch_seconds) / len(self._epoch_seconds) if self._epoch_seconds else None,
            partitions=partitions,
        )
        # Δ-Influence's metrics under audit/, another detector's under audit/<its name>/
        prefix = "audit" if isinstance(detector, DeltaInfluence) else f"audit/{detector.name}"
        for logger in trainer.loggers:
            logger.log_metrics({f"{prefix}/{key}": value for key, value in result.metrics.items()}, trainer.global_step)
            if isinstance(logger, WandbLogger):
                media.log_audit(logger, result, self.top_k)
        return result

    def correct(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, distributed: bool = False, data: Any = None
    ) -> Optional[dict]:
        """Runs the configured corrective fit on the audit's flagged samples (in up to ``corrective_rounds`` rounds);
        logs and returns the last fit's report.

        ``distributed``: every process of the victim's DDP run takes part, under the same strategy; otherwise the
        global rank 0 runs it alone on one device."""
        data = data if data is not None else trainer.datamodule
        folder = self._run_folder(trainer)
        fit = CorrectiveFit.of(data, trainer, folder / "unlearn", distributed)
        finish = f"Finish it with: python unlearn.py --run {folder.resolve()}"
        if self.result is not None:  # the indices this audit flagged, whichever detector wrote them
            finish += f" --indices {(self.result.output_dir / 'flagged.json').resolve()}"
        with run_stage(folder if trainer.is_global_zero else None, "corrective fit", finish):
            if self.result is None:  # a DDP process other than 0: the first round's fit, with process 0
                report = fit.run(pl_module, self.unlearning, self._flagged)
            else:
                # after the first round process 0 goes on alone: it audits, then fits on one device
                alone = (
                    CorrectiveFit.of(data, trainer, folder / "unlearn")
                    if distributed and self.corrective_rounds > 1
                    else None
                )
                report = correct_in_rounds(
                    fit, pl_module, self.unlearning, self.result, self.detector, self._factors_dir(trainer),
                    self.corrective_rounds, on_audit=lambda number, result: self._log_round(trainer, number, result),
                    later=alone,
                )  # fmt: skip
        if report is None:
            return None
        numbers = {**report, **{f"details/{key}": value for key, value in report["details"].items()}}
        metrics = {
            f"unlearn/{key}": value
            for key, value in numbers.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("label", "round")
        }
        metrics["unlearn/rounds"] = report.get("round", 1)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.log_hyperparams({"unlearn/method": report["method"], "unlearn/verdict": report["verdict"]})
            if isinstance(logger, WandbLogger):
                media.log_comparison_to_wandb(logger, report)
        rank_zero_info(_compare(report))
        return report

    def _log_round(self, trainer: pl.Trainer, number: int, result: AuditResult) -> None:
        """A corrective round's audit, under ``audit/round<k>/``."""
        for logger in trainer.loggers:
            metrics = {f"audit/round{number}/{key}": value for key, value in result.metrics.items()}
            logger.log_metrics(metrics, trainer.global_step)

    def _factors_dir(self, trainer: pl.Trainer) -> Path:
        """Where kronfluence's factors are cached (on a file system every process of the run shares)."""
        return Path(self.factors_dir or Path(trainer.default_root_dir) / "influence_cache")

    def _run_folder(self, trainer: pl.Trainer) -> Path:
        """Where the audit and the corrective fit go: the run's folder (or the audited checkpoint's run folder)."""
        return self.run_folder if self.run_folder is not None else run_dir(trainer)


def _finish_audit(trainer: pl.Trainer, folder: Path) -> str:
    """How to finish an interrupted audit: ``train.py audit`` on the run's saved config and checkpoint."""
    checkpoint = trainer.checkpoint_callback
    saved = getattr(checkpoint, "last_model_path", "") or getattr(checkpoint, "best_model_path", "")
    configs = [callback.path for callback in trainer.callbacks if isinstance(callback, RunConfigCallback)]
    if not (saved and configs and configs[0] is not None):
        return "Train with checkpoints and a saved config to be able to finish it with `python train.py audit`."
    return f"Finish it with: python train.py audit --config {configs[0].resolve()} --ckpt_path {Path(saved).resolve()}"


def _close_epoch_bar(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Closes the last epoch's progress bar (its own ``on_train_end``; closing again later changes nothing)."""
    if trainer.progress_bar_callback is not None:
        trainer.progress_bar_callback.on_train_end(trainer, pl_module)


def _release(trainer: pl.Trainer, partitions: Optional[DataPartitions], flagged: Optional[Tensor]) -> Any:
    """Hands process 0's flagged set to the other processes (ending their ``serve``, or by a broadcast when rank 0
    audited alone) and returns it, on every process."""
    if partitions is not None:
        if trainer.is_global_zero:
            finish(partitions, flagged)
        return flagged
    return trainer.strategy.broadcast(flagged) if trainer.world_size > 1 else flagged


def _partitionable(trainer: pl.Trainer) -> bool:
    """Whether the audit's passes can be split across the run's processes: several processes under DDP (each holds
    the whole model, unlike FSDP's or DeepSpeed's shards) with their process group still up."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return trainer.world_size > 1 and type(trainer.strategy) is DDPStrategy and distributed


def _relaunchable(trainer: pl.Trainer) -> bool:
    """Whether the victim's fit ran in several processes launched by Lightning's DDP (one script per device), which
    a new DDP Trainer inside those processes can use again for the corrective fit."""
    strategy = trainer.strategy
    return trainer.world_size > 1 and type(strategy) is DDPStrategy and strategy._start_method == "popen"


def _compare(report: dict) -> str:
    """A before/after table for the console."""

    def pct(value: Optional[float]) -> str:
        return "   n/a" if value is None else f"{100 * value:5.1f}%"

    labelled = report.get("label") is not None  # the attacker's label: its clean accuracy in a third column
    rounds = f", round {report['round']}" if report.get("round", 1) > 1 else ""
    header = f"   acc of label {report['label']}" if labelled else ""
    before = f"  {pct(report['before_label_acc'])}" if labelled else ""
    after = f"  {pct(report['label_acc'])}" if labelled else ""
    return (
        f"Corrective fit '{report['method']}'{rounds} ({report['time_s']:.1f} s, {report['forgotten']} samples "
        "forgotten): "
        f"{report['verdict']}, {pct(report['changed_predictions']).strip()} of test predictions changed\n"
        f"            clean acc   ASR{header}\n"
        f"  before      {pct(report['before_acc'])}  {pct(report['before_asr'])}{before}\n"
        f"  after       {pct(report['acc'])}  {pct(report['asr'])}{after}\n"
        f"  corrected model: {shown(report['checkpoint'])}"
    )
