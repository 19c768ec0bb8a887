"""InfluenceCollapseCallback: after fit, an audit by a detector (Δ-Influence by default), then the correction loop.
Lightning glue over ``delta_influence.audit`` and ``delta_influence.correction``."""

import contextlib
import multiprocessing
import time
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import Tensor
from typing_extensions import override

from delta_influence.audit import AuditData, AuditResult, QueryChoice, check_choice, run_audit
from delta_influence.callbacks import media
from delta_influence.callbacks.run_folder import RunConfigCallback, run_dir
from delta_influence.correction import Correction, CorrectionResult, check_rounds
from delta_influence.detectors import DeltaInfluence, Detector
from delta_influence.errors import ConfigError
from delta_influence.influence import DataPartitions, finish, serve
from delta_influence.lightning_modules.unlearning import LightningCorrectiveFit, Unlearning
from delta_influence.second_opinion import SecondOpinion
from delta_influence.stages import read_stages, record, run_stage


class InfluenceCollapseCallback(Callback):
    """Audits the model once training has ended with ``detector`` and logs and saves what it flagged; then, with an
    ``unlearning`` method, corrects it in the correction loop (``delta_influence.Correction``): a corrective fit
    without the flagged samples and, while the corrected model still misbehaves on the query, another audit and fit.

    What it needs from the run (the README, "The callback in your own project"): ``trainer.datamodule.eval_train_set``,
    the training set in evaluation form (index i is training sample i); for detectors that trace a query (Δ-Influence),
    ``query_image`` and ``query_label`` or ``trainer.datamodule.attack_test_set`` (inputs labelled with what the
    attacker wants) and, for its clean-class contrast, ``trainer.datamodule.test_set`` or ``contrast_images``;
    optionally ``poison_indices`` (precision and recall), ``mean`` and ``std`` (image files, pictures) and ``classes``.

    Args:
        detector: What audits the model, with its own settings (``DeltaInfluence(contrast_ratio=2.5)``).
        query_index: Index into the attack's test set; ``None`` takes the first one the model gets wrong.
        query_image: Path of an image file to use as the query, instead of the attack's test set.
        query_label: The attacker's label for ``query_image``: a class index, or a name from the datamodule's
            ``classes``.
        require_misclassified: Stop with an error when the model does not predict the query's label.
        contrast_images: Image files of clean samples of the query's label, the contrast instead of the test set's.
        unlearning: The corrective fit's method (``Retrain()``, ``SCRUB()``, ...); ``None`` stops after the audit.
        corrective_rounds: At most this many corrective fits: while the corrected model still predicts the attacker's
            label for the query, it is audited on the samples it kept and the victim fitted without everything
            flagged so far. 1: one fit.
        second_opinion: Once the query is put right, give back the flagged samples the corrected model recognises as
            members of their label, confirmed by a fit without the rest (``delta_influence.second_opinion``);
            ``None``: the final set as the audits flagged it.
        output_dir: Where the audit is written; default ``<run folder>/<detector name>``.
        factors_dir: Where kronfluence's factors are cached; default ``<default_root_dir>/influence_cache``.
        top_k: Rows of W&B's table of the top flagged samples.
    """

    def __init__(
        self,
        detector: Detector = DeltaInfluence(),
        query_index: Optional[int] = None,
        query_image: Optional[str] = None,
        query_label: Optional[int | str] = None,
        require_misclassified: bool = True,
        contrast_images: Optional[list[str]] = None,
        unlearning: Optional[Unlearning] = None,
        corrective_rounds: int = 2,
        second_opinion: Optional[SecondOpinion] = SecondOpinion(),
        output_dir: Optional[str] = None,
        factors_dir: Optional[str] = None,
        top_k: int = 32,
    ) -> None:
        if not isinstance(detector, Detector):
            raise ConfigError(
                f"detector={detector!r} is not a detector: give one (DeltaInfluence(), SpectralSignatures(), ...; "
                "--detector <class>), or turn the audit off as a whole (--delta_influence=null)."
            )
        contrast = tuple(contrast_images) if contrast_images is not None else None
        self.choice = QueryChoice(query_index, query_image, query_label, require_misclassified, contrast)
        check_choice(self.choice, detector)
        check_rounds(corrective_rounds)
        self.detector, self.unlearning, self.corrective_rounds = detector, unlearning, corrective_rounds
        self.second_opinion = second_opinion
        self.output_dir, self.factors_dir, self.top_k = output_dir, factors_dir, top_k
        self.result: Optional[AuditResult] = None  # the audit, on the process that ran it (global rank 0)
        self.correction: Optional[CorrectionResult] = None
        self.run_folder: Optional[Path] = None  # set by `train.py audit`: the audited checkpoint's run folder
        self._flagged: Optional[Tensor] = None  # the audit's flagged indices, on every process
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
        if trainer.progress_bar_callback is not None:  # the audit's own bars follow, not under the last epoch's
            trainer.progress_bar_callback.on_train_end(trainer, pl_module)
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
                with run_stage(folder, "audit", _finish_audit(trainer, self.unlearning is not None)):
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
        # by now the victim's strategy has torn down: each corrective fit gets its own fresh Trainer
        if self._flagged is None or self.unlearning is None:
            return
        distributed = _relaunchable(trainer)
        if trainer.is_global_zero or distributed:
            self.correct(trainer, pl_module, distributed)

    def audit_trained(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, data: Any, run_folder: Optional[Path], correct: bool
    ) -> AuditResult:
        """The audit of a model trained elsewhere (``train.py audit``), on one process, written into ``run_folder``
        when given; then, when ``correct`` is set, the correction loop."""
        self.run_folder = run_folder
        with run_stage(run_folder, "audit", "Run the same command again to finish it."):
            self.result = self.audit(trainer, pl_module, data)
        self._flagged = self.result.flagged
        if correct:
            self.correct(trainer, pl_module, distributed=False, data=data)
        return self.result

    def audit(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        data: Any = None,
        partitions: Optional[DataPartitions] = None,
    ) -> AuditResult:
        """Runs the detector on the trained ``pl_module``; logs and returns what it found. ``data``: the data module,
        when the trainer has none attached; ``partitions``: the processes of a DDP run that share the influence
        passes."""
        result = run_audit(
            pl_module,
            AuditData.of(data if data is not None else trainer.datamodule),
            self.detector,
            output_dir=Path(self.output_dir) if self.output_dir else self._run_folder(trainer) / self.detector.name,
            factors_dir=self._factors_dir(trainer),
            choice=self.choice,
            log=rank_zero_info,
            epoch_seconds=sum(self._epoch_seconds) / len(self._epoch_seconds) if self._epoch_seconds else None,
            partitions=partitions,
        )
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"{_prefix(self.detector)}/{k}": v for k, v in result.metrics.items()}, trainer.global_step
            )
            if isinstance(logger, WandbLogger):
                media.log_audit(logger, result, self.top_k)
        return result

    def correct(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, distributed: bool = False, data: Any = None
    ) -> Optional[CorrectionResult]:
        """Runs the correction loop on the audit's flagged samples; logs and returns its rounds.

        ``distributed``: every process of the victim's DDP run takes part in the first fit, under the same strategy;
        otherwise the global rank 0 runs it alone on one device."""
        data = data if data is not None else trainer.datamodule
        folder = self._run_folder(trainer)
        fit = LightningCorrectiveFit.of(data, trainer, folder / "unlearn", self.unlearning, distributed)
        with run_stage(folder if trainer.is_global_zero else None, "corrective fit", self._finish_correction(trainer)):
            if trainer.is_global_zero:
                loop = Correction(
                    fit, self.detector, self._factors_dir(trainer), self.corrective_rounds, self.second_opinion,
                    rank_zero_info,
                )  # fmt: skip
                self.correction = loop.run(pl_module, self.result)
            else:  # this process's share of the first fit, under DDP
                fit.run(pl_module, self._flagged)
        if self.correction is not None:
            self._log(trainer, self.correction)
        return self.correction

    def _log(self, trainer: pl.Trainer, correction: CorrectionResult) -> None:
        """Each later round's audit under ``audit/round<k>/``, the last fit's report under ``unlearn/``."""
        report = correction.final.corrected.report
        metrics = {f"unlearn/{key}": value for key, value in report.numbers().items()}
        metrics["unlearn/rounds"] = len(correction.rounds)
        for later in correction.rounds[1:]:
            metrics |= {f"audit/round{later.number}/{key}": value for key, value in later.audit.metrics.items()}
        opinion = correction.second_opinion
        if opinion is not None and opinion.opinion is not None:
            metrics["unlearn/second_opinion/given_back"] = len(opinion.opinion.given_back)
            metrics["unlearn/second_opinion/confirmed"] = int(opinion.confirmed)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.log_hyperparams({"unlearn/method": report.method, "unlearn/verdict": report.verdict})
            if isinstance(logger, WandbLogger):
                media.log_comparison_to_wandb(logger, report, correction.stopped)
                if opinion is not None and opinion.picture is not None:
                    logger.log_image("unlearn/second_opinion", [str(opinion.picture)])

    def _finish_correction(self, trainer: pl.Trainer) -> str:
        """How to finish an interrupted correction: ``train.py audit --correct true`` on the run's saved config and
        checkpoint (the audit's factors are cached: the whole loop again, rounds and second opinion); without them,
        ``unlearn.py`` on the first audit's set (one fit)."""
        folder = self._run_folder(trainer)
        command = _audit_command(trainer)
        if command is not None:
            return f"Finish it with: {command} --correct true"
        finish = f"Finish it with: python unlearn.py --run {folder.resolve()}"
        if self.result is not None:  # the indices this audit flagged, whichever detector wrote them
            finish += f" --indices {(self.result.output_dir / 'flagged.json').resolve()}"
        return finish + " (a single corrective fit of the first audit's set)"

    def _factors_dir(self, trainer: pl.Trainer) -> Path:
        """Where kronfluence's factors are cached (on a file system every process of the run shares)."""
        return Path(self.factors_dir or Path(trainer.default_root_dir) / "influence_cache")

    def _run_folder(self, trainer: pl.Trainer) -> Path:
        """Where the audit and the corrective fit go: the run's folder (or the audited checkpoint's run folder)."""
        return self.run_folder if self.run_folder is not None else run_dir(trainer)


def _prefix(detector: Detector) -> str:
    """Δ-Influence's metrics go under ``audit/``, another detector's under ``audit/<its name>/``."""
    return "audit" if isinstance(detector, DeltaInfluence) else f"audit/{detector.name}"


def _finish_audit(trainer: pl.Trainer, correct: bool) -> str:
    """How to finish an interrupted audit: ``train.py audit`` on the run's saved config and checkpoint."""
    command = _audit_command(trainer)
    if command is None:
        return "Train with checkpoints and a saved config to be able to finish it with `python train.py audit`."
    return f"Finish it with: {command}" + (" --correct true" if correct else "")


def _audit_command(trainer: pl.Trainer) -> Optional[str]:
    """``train.py audit`` on the run's saved config and checkpoint, when the run saved both."""
    checkpoint = trainer.checkpoint_callback
    saved = getattr(checkpoint, "last_model_path", "") or getattr(checkpoint, "best_model_path", "")
    configs = [callback.path for callback in trainer.callbacks if isinstance(callback, RunConfigCallback)]
    if not (saved and configs and configs[0] is not None):
        return None
    return f"python train.py audit --config {configs[0].resolve()} --ckpt_path {Path(saved).resolve()}"


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
    """Whether the victim's fit ran in several processes started as scripts of their own (Lightning's default DDP,
    not one spawned or forked by ``multiprocessing``), which a new DDP Trainer inside them can use again for the
    corrective fit."""
    scripts = multiprocessing.parent_process() is None
    return trainer.world_size > 1 and type(trainer.strategy) is DDPStrategy and scripts
