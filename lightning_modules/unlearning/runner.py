"""The corrective fit: forget a set of training samples with a method, measure before and after, save the result.

``CorrectiveFit.of(datamodule, trainer, out_dir)`` takes everything from a data module and the victim's trainer in one
step; the callback, ``unlearn.py`` and the benchmarks all call it. ``correct_in_rounds`` audits the corrected model
again while it still misbehaves on the audit's query (the callback and the benchmarks).
"""

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import Dataset, Subset

from delta_influence.detectors import Detector
from delta_influence.devices import accelerator_of, device_of
from delta_influence.examples import predictions
from delta_influence.files import write_new
from delta_influence.pipeline import AuditResult, eval_train_set_of, misbehaves, run_audit
from delta_influence.unlearning import retained_indices
from lightning_modules.unlearning.methods import FitSettings, Unlearning, UnlearningData, UnlearningError


@dataclass
class CorrectiveFit:
    """Where and how corrective fits run: the training set (as trained on, and in evaluation form), the clean and
    attack test sets they are measured on, the folder the corrected models and reports go to, and the fit settings
    (the victim's batch size, length and validation loaders; the device and strategy).

    With ``strategy="ddp"`` and several ``devices`` (or nodes) in the settings, every process of an already launched
    distributed run calls ``run`` with the same arguments: the methods that train do so under that strategy, each
    process evaluates on its own, and only the process with ``save=True`` (global rank 0) writes the model and the
    report.
    """

    train_set: Dataset
    eval_train_set: Dataset
    test_set: Optional[Dataset]
    attack_test_set: Optional[Dataset]
    out_dir: Path
    settings: FitSettings
    save: bool = True

    @classmethod
    def of(
        cls, datamodule: Any, trainer: pl.Trainer, out_dir: str | Path, distributed: bool = False
    ) -> "CorrectiveFit":
        """Everything from the victim's data module (its training loader, ``eval_train_set``, ``test_set``,
        ``attack_test_set`` and validation loaders) and its trainer (length, device, progress bar; its processes
        when ``distributed``)."""
        loader = datamodule.train_dataloader()
        return cls(
            train_set=loader.dataset,
            eval_train_set=eval_train_set_of(datamodule),
            test_set=getattr(datamodule, "test_set", None),
            attack_test_set=getattr(datamodule, "attack_test_set", None),
            out_dir=Path(out_dir),
            settings=FitSettings(
                batch_size=loader.batch_size,
                max_epochs=trainer.max_epochs,
                max_steps=trainer.max_steps,
                val_dataloaders=datamodule.val_dataloader() if is_overridden("val_dataloader", datamodule) else None,
                check_val_every_n_epoch=trainer.check_val_every_n_epoch,
                accelerator=accelerator_of(trainer.strategy.root_device),
                strategy="ddp" if distributed else "auto",
                devices=trainer.num_devices if distributed else 1,
                num_nodes=trainer.num_nodes if distributed else 1,
                progress_bar=trainer.progress_bar_callback is not None,
            ),
            save=trainer.is_global_zero,
        )

    def run(
        self, victim: pl.LightningModule, method: Unlearning, flagged: Tensor, notes: Optional[dict] = None
    ) -> Optional[dict]:
        """Forgets the ``flagged`` training samples with ``method`` and measures, before and after, clean accuracy,
        ASR and the clean accuracy on the attacker's label (``label_acc``). The report also gives the share of test
        predictions that changed, what that did to the attack (``verdict``, see ``verdict``; anything but "attack
        weakened" is also a warning on the console) and what the method measured about itself (``details``: SSD's
        and Potion's dampened share and importance-ratio quantiles).

        The corrected model is saved as ``out_dir/<method>.ckpt`` (``<method>-2.ckpt``, ... when taken), in
        Lightning's checkpoint layout (``state_dict`` and ``hyper_parameters``), and the report next to it as
        ``<method>.json`` (the first free name); the victim is neither modified nor overwritten. ``notes`` are added
        to the report as they are (``correct_in_rounds``: the earlier rounds).

        Returns:
            The report (on the saving process) with the absolute paths of the checkpoint and the report (the file
            itself names the checkpoint beside it), or ``None``: nothing flagged (said on the console), or not the
            saving process.
        """
        flagged = torch.as_tensor(flagged, dtype=torch.long)
        if len(flagged) == 0:
            rank_zero_info("Corrective fit skipped: no training sample was flagged, so there is nothing to forget.")
            return None
        if len(self.train_set) != len(self.eval_train_set):
            raise UnlearningError(
                f"the training set has {len(self.train_set)} samples but its evaluation form "
                f"{len(self.eval_train_set)}; index i must mean the same sample in both."
            )
        retained = retained_indices(len(self.train_set), flagged)
        if not retained:
            raise UnlearningError(
                f"all {len(self.train_set)} training samples are flagged, so nothing would be left to train on. Lower "
                "the audit's tolerance or threshold, or check the query."
            )
        data = UnlearningData(
            Subset(self.train_set, retained), Subset(self.eval_train_set, flagged.tolist()), self.eval_train_set,
            self.settings, kept=Subset(self.eval_train_set, retained),
        )  # fmt: skip
        device = device_of(self.settings.accelerator)
        before = self._evaluate(victim, device)
        rank_zero_info(f"Corrective fit: {method.name}, forgetting {len(flagged)} and keeping {len(retained)} samples.")
        start = time.perf_counter()
        method.details = {}
        corrected = method.run(victim, data)
        seconds = time.perf_counter() - start
        if not self.save:
            return None
        after = self._evaluate(corrected, device)
        report = {
            "method": method.name,
            "forgotten": len(flagged),
            "retained": len(retained),
            **{
                f"before_{key}": value
                for key, value in before.items()
                if key not in ("predicted", "label", "attack_size")
            },
            **{key: value for key, value in after.items() if key != "predicted"},
            "changed_predictions": _changed(before["predicted"], after["predicted"]),
            "time_s": seconds,
            "processes": self.settings.devices * self.settings.num_nodes,
        }
        report["verdict"] = verdict(report)
        report["details"] = dict(getattr(method, "details", {}))
        report |= notes or {}
        if report["verdict"] != "attack weakened":
            rank_zero_warn(f"Corrective fit {method.name}: {report['verdict']} ({_numbers(report)}).")
        checkpoint = {
            "state_dict": corrected.state_dict(),
            "hyper_parameters": dict(getattr(victim, "hparams", {})),
            "pytorch-lightning_version": pl.__version__,
            "unlearning": report,
        }
        saved = write_new(self.out_dir / f"{method.name}.ckpt", lambda path: torch.save(checkpoint, path))
        stored = report | {"checkpoint": saved.name}  # beside the report: the folder stays valid when moved
        try:
            written = write_new(saved.with_suffix(".json"), lambda path: path.write_text(json.dumps(stored, indent=2)))
        except BaseException:  # a signal or a failure between the two: no checkpoint without its report
            saved.unlink(missing_ok=True)
            raise
        return report | {"checkpoint": str(saved.resolve()), "report": str(written.resolve())}

    def _evaluate(self, model: torch.nn.Module, device: torch.device) -> dict:
        """Clean accuracy, ASR, the attacker's label and the clean accuracy on it, and the predictions on both test
        sets (to count what a method changed)."""
        clean = predictions(model, self.test_set, device) if self.test_set is not None else None
        attack = predictions(model, self.attack_test_set, device) if self.attack_test_set is not None else None
        result = {"acc": _share(clean), "asr": _share(attack), "attack_size": len(attack[1]) if attack else 0}
        result |= {"label": None, "label_acc": None}
        if attack is not None and len(attack[1]):
            label = int(attack[1].mode().values)  # what the attacker wants (a backdoor: its target class)
            result["label"] = label
            if clean is not None:
                result["label_acc"] = _share(clean, clean[1] == label)
        result["predicted"] = torch.cat([pair[0] for pair in (clean, attack) if pair is not None] or [torch.zeros(0)])
        return result


def correct_in_rounds(
    fit: CorrectiveFit,
    victim: pl.LightningModule,
    method: Unlearning,
    audit: AuditResult,
    detector: Detector,
    factors_dir: str | Path,
    rounds: int,
    log: Callable[[str], object] = rank_zero_info,
    on_audit: Optional[Callable[[int, AuditResult], object]] = None,
    later: Optional[CorrectiveFit] = None,
) -> Optional[dict]:
    """The corrective fit on ``audit``'s flagged samples; then, while the corrected model still predicts the attacker's
    label for the audit's query, ``detector`` audits it again on the samples it kept (with the same query), and the
    fit runs again on the victim without everything flagged so far; at most ``rounds`` fits in all.

    Made for retraining: the retrained model has learnt from the kept samples alone, so its audit asks which of them
    still carry the attack, and the poisons the first audit missed now carry it alone (on the Witches' Brew pair whose
    target stayed flipped, the second audit found the poisons that kept it so; see the benchmarks' README). It runs
    after any method (the corrected model is audited as it is). Each round's audit is published next to the first
    one as ``<audit folder>_round<k>`` (flagged indices into the whole training set), each fit's model and report
    in ``fit.out_dir``; the last report lists the earlier rounds under ``earlier_rounds`` (their checkpoints' names
    in ``fit.out_dir``, the next round's audit folder's name). A round stops the loop when the query is put right,
    when its audit flags nothing new, or after ``rounds`` fits; a detector that traces no query runs one round.
    ``on_audit(k, result)`` is called with each new audit (the callback logs it). ``later``: the fit of the rounds
    after the first (default ``fit``): where ``fit`` is distributed, one that runs on this process alone, since the
    other processes are done after the first round (their ``fit.run`` returns ``None``) while this one audits.

    Returns:
        The last fit's report, with ``round`` (how many fits ran) and ``earlier_rounds``; ``None`` where ``fit.run``
        returns it (nothing flagged, or not the saving process).
    """
    if rounds < 1:
        raise UnlearningError(f"rounds={rounds}: give 1 (one corrective fit) or more (audits again in between).")
    if audit.data.indices is not None:
        raise UnlearningError("correct_in_rounds starts from an audit of the whole training set, not of a part of it.")
    flagged = audit.flagged
    earlier: list[dict] = []
    report = fit.run(victim, method, flagged, {"round": 1, "earlier_rounds": []})
    for number in range(2, rounds + 1):
        if report is None:
            return None
        if audit.query is None:  # a detector that traces no query (spectral signatures, ...): one round
            break
        # after Lightning's teardown the victim lies on the CPU: the round's audit goes where the fits run
        device = device_of((later or fit).settings.accelerator)
        corrected = copy.deepcopy(victim).to(device)
        corrected.load_state_dict(
            torch.load(report["checkpoint"], map_location=device, weights_only=False)["state_dict"]
        )
        if not misbehaves(corrected, audit.data, audit.query, device):
            break
        log(
            f"Corrective round {number}: the corrected model still predicts the attacker's label for the query "
            f"({audit.summary.get('query')}); auditing it on the {len(fit.train_set) - len(flagged)} samples it kept."
        )
        kept = torch.tensor(retained_indices(len(audit.data.train_set), flagged), dtype=torch.long)
        again = run_audit(
            corrected, audit.data.subset(kept), detector, f"{audit.output_dir}_round{number}", factors_dir,
            audit.query, device, log=log,
        )  # fmt: skip
        if on_audit is not None:
            on_audit(number, again)
        new = again.flagged
        if not len(new):
            log(f"Corrective round {number}: its audit flagged nothing more; the last corrected model stands.")
            break
        earlier.append(
            {key: report[key] for key in ("round", "forgotten", "acc", "asr", "label_acc")}
            | {"checkpoint": Path(report["checkpoint"]).name, "next_audit": again.output_dir.name,
               "next_flagged": len(new)}
        )  # names: the checkpoint lies beside the report, the audit beside the first one  # fmt: skip
        flagged = torch.cat([flagged, new]).unique()
        report = (later or fit).run(victim, method, flagged, {"round": number, "earlier_rounds": list(earlier)})
    return report


def verdict(report: dict) -> str:
    """What a corrective fit did to the attack: ``"changed nothing"`` (no prediction on the clean or attack test set
    moved), ``"attack weakened"`` (the ASR fell by more than twice its standard error on the attack test set,
    ``sqrt(p (1 - p) / n)`` at the victim's ASR ``p``: a smaller fall is what another seed could give) or ``"attack
    not weakened"``; without an attack test set, whether any prediction changed."""
    if report["changed_predictions"] is None:
        return "not measured (no test set)"
    if report["changed_predictions"] == 0:
        return "changed nothing"
    before, after, size = report["before_asr"], report["asr"], report["attack_size"]
    if before is None or after is None:
        return "predictions changed"
    noise = 2 * math.sqrt(before * (1 - before) / size)
    return "attack weakened" if before - after > noise else "attack not weakened"


def _changed(before: Tensor, after: Tensor) -> Optional[float]:
    """The share of predictions that differ, or ``None`` without any."""
    return (before != after).float().mean().item() if len(before) else None


def _share(predicted: Optional[tuple[Tensor, Tensor]], keep: Optional[Tensor] = None) -> Optional[float]:
    """The share of predictions equal to their labels (among ``keep``), or ``None`` without data."""
    if predicted is None:
        return None
    guesses, labels = predicted
    if keep is not None:
        guesses, labels = guesses[keep], labels[keep]
    return (guesses == labels).float().mean().item() if len(labels) else None


def _numbers(report: dict) -> str:
    """Clean accuracy and ASR, before -> after, for the console."""

    def pct(value: Optional[float]) -> str:
        return "n/a" if value is None else f"{100 * value:.1f} %"

    parts = [f"clean accuracy {pct(report['before_acc'])} -> {pct(report['acc'])}"]
    if report["asr"] is not None:
        parts.append(f"ASR {pct(report['before_asr'])} -> {pct(report['asr'])}")
    return ", ".join(parts)
