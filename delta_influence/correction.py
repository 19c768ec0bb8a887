"""The correction loop: a corrective fit without an audit's flagged samples and, while the corrected model still
misbehaves on the audit's query, an audit of that model on the samples it kept and another fit of the victim without
everything flagged so far.

``CorrectiveFit`` is one fit: it measures the victim, has a method forget the flagged samples (``_forget``, which a
subclass writes: the Lightning layer's ``LightningCorrectiveFit`` runs the methods of
``delta_influence.lightning_modules.unlearning``), measures the corrected copy and saves it with its report.
``Correction`` runs the loop and returns every round, each with its audit, what its fit forgot and the corrected model
in memory, and why no further round ran. Nothing here imports Lightning.
"""

import json
import math
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from delta_influence.audit import AuditResult, misbehaves, run_audit
from delta_influence.datasets import retained_indices
from delta_influence.detectors.base import Detector
from delta_influence.errors import ConfigError, DeltaInfluenceWarning
from delta_influence.examples import predictions
from delta_influence.files import shown, write_new
from delta_influence.second_opinion import Opinion, SecondOpinion, give_back, plot_opinion


class CorrectionError(ConfigError):
    """The corrective fit cannot run on what it was given."""


@dataclass
class FitReport:
    """What a corrective fit did: the samples it forgot and kept, clean accuracy, ASR and the clean accuracy on the
    attacker's label (``label``) before (``before_*``) and after, the share of test predictions it changed, its
    ``verdict`` (see ``verdict``), what the method measured about itself (``details``), its time and processes, its
    round of the correction loop, what flagged the samples (``flagged_by``: an audit folder's name, or an index
    file) and the corrected model's file (beside the report)."""

    method: str
    forgotten: int
    retained: int
    before_acc: Optional[float]
    before_asr: Optional[float]
    before_label_acc: Optional[float]
    acc: Optional[float]
    asr: Optional[float]
    label: Optional[int]
    label_acc: Optional[float]
    attack_size: int
    changed_predictions: Optional[float]
    verdict: str
    time_s: float
    processes: int = 1
    round: int = 1
    flagged_by: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    checkpoint: str = ""

    def numbers(self) -> dict[str, float]:
        """Every number of the report, the method's details as ``details/<key>`` (what the loggers log)."""
        flat = {key: value for key, value in asdict(self).items() if key != "details"}
        flat |= {f"details/{key}": value for key, value in self.details.items()}
        return {key: value for key, value in flat.items() if _is_number(value) and key not in ("label", "round")}


@dataclass
class Corrected:
    """A corrective fit's result: the corrected model, its report, and where both were saved."""

    model: nn.Module
    report: FitReport
    checkpoint: Path
    report_path: Path


class CorrectiveFit(ABC):
    """Forgets flagged training samples with one method: the victim and the corrected copy are measured on the clean
    and attack test sets, and the copy is saved as ``out_dir/<method>.ckpt`` (``<method>_round<k>.ckpt`` in round k
    of the loop; ``-2``, ``-3``, ... when the name is taken), with its report beside it as JSON. The victim is neither
    modified nor overwritten.

    Args:
        num_train: The training set's size (flagged indices point into it).
        test_set: Clean test samples (clean accuracy); ``None``: not measured.
        attack_test_set: The attack's test set, labelled with what the attacker wants (ASR); ``None``: not measured.
        out_dir: Where the corrected models and reports go.
        device: Where models are measured (and audited, in the loop).
        save: Whether this process measures and saves (under DDP every process fits and only global rank 0 saves).
        processes: How many processes a fit runs in.
        log: Where the console lines go.
    """

    def __init__(
        self,
        num_train: int,
        test_set: Optional[Dataset],
        attack_test_set: Optional[Dataset],
        out_dir: str | Path,
        device: torch.device | str = "cpu",
        save: bool = True,
        processes: int = 1,
        log: Callable[[str], object] = print,
    ) -> None:
        self.num_train = num_train
        self.test_set, self.attack_test_set = test_set, attack_test_set
        self.out_dir = Path(out_dir)
        self.device = torch.device(device)
        self.save, self.processes, self.log = save, processes, log

    @property
    @abstractmethod
    def method(self) -> str:
        """The method's name (``retrain``, ``scrub``, ...)."""

    @abstractmethod
    def _forget(self, victim: nn.Module, flagged: Tensor, retained: list[int], alone: bool) -> tuple[nn.Module, dict]:
        """A corrected copy of ``victim`` that forgot the ``flagged`` samples and kept the ``retained`` ones, and what
        the method measured about itself; ``alone``: in this process only, whatever the fit's processes."""

    def run(
        self,
        victim: nn.Module,
        flagged: Tensor,
        flagged_by: str = "",
        round: int = 1,
        alone: bool = False,
        name: Optional[str] = None,
    ) -> Optional[Corrected]:
        """Forgets the ``flagged`` training samples (``flagged_by`` says what flagged them, for the report); the files
        are named ``name`` (default: the method's, with ``_round<k>`` after the first round).

        Returns:
            The corrected model with its report and files, or ``None``: nothing flagged (said on the console), or not
            the saving process.
        """
        flagged = torch.as_tensor(flagged, dtype=torch.long)
        if len(flagged) == 0:
            self.log("Corrective fit skipped: no training sample was flagged, so there is nothing to forget.")
            return None
        retained = retained_indices(self.num_train, flagged)
        if not retained:
            raise CorrectionError(
                f"all {self.num_train} training samples are flagged, so nothing would be left to train on. Lower the "
                "audit's tolerance or threshold, or check the query."
            )
        saves = self.save or alone
        before = self._measure(victim) if saves else None
        self.log(
            f"Corrective fit ({self.method}, round {round}): a new fit of the victim that forgets {len(flagged)} "
            f"samples and keeps {len(retained)}."
        )
        start = time.perf_counter()
        corrected, details = self._forget(victim, flagged, retained, alone)
        seconds = time.perf_counter() - start
        if not saves:
            return None
        after = self._measure(corrected)
        report = FitReport(
            method=self.method, forgotten=len(flagged), retained=len(retained), before_acc=before["acc"],
            before_asr=before["asr"], before_label_acc=before["label_acc"], acc=after["acc"], asr=after["asr"],
            label=after["label"], label_acc=after["label_acc"], attack_size=after["attack_size"],
            changed_predictions=_changed(before["predicted"], after["predicted"]), verdict="", time_s=seconds,
            processes=1 if alone else self.processes, round=round, flagged_by=flagged_by, details=details,
        )  # fmt: skip
        report.verdict = verdict(report)
        if report.verdict != "attack weakened":
            message = f"Corrective fit {self.method}: {report.verdict} ({_before_after(report)})."
            warnings.warn(message, DeltaInfluenceWarning, stacklevel=2)
        saved = self._save(victim, corrected, report, name)
        self.log(describe(report, saved.checkpoint))
        return saved

    def _checkpoint(self, victim: nn.Module, corrected: nn.Module, report: FitReport) -> dict[str, Any]:
        """What the corrected model's file holds: its weights, the victim's hyperparameters and the report."""
        hyper_parameters = dict(getattr(victim, "hparams", {}))
        return {
            "state_dict": corrected.state_dict(),
            "hyper_parameters": hyper_parameters,
            "unlearning": asdict(report),
        }

    def _save(self, victim: nn.Module, corrected: nn.Module, report: FitReport, name: Optional[str]) -> Corrected:
        """The corrected model and its report, published together (neither without the other)."""
        name = name or (self.method if report.round == 1 else f"{self.method}_round{report.round}")
        checkpoint = self._checkpoint(victim, corrected, report)
        saved = write_new(self.out_dir / f"{name}.ckpt", lambda path: torch.save(checkpoint, path))
        report.checkpoint = saved.name  # beside the report: the folder stays valid when moved
        try:
            text = json.dumps(asdict(report), indent=2)
            written = write_new(saved.with_suffix(".json"), lambda path: path.write_text(text))
        except BaseException:  # a signal or a failure between the two: no checkpoint without its report
            saved.unlink(missing_ok=True)
            raise
        return Corrected(corrected, report, saved.resolve(), written.resolve())

    def _measure(self, model: nn.Module) -> dict[str, Any]:
        """Clean accuracy, ASR, the attacker's label and the clean accuracy on it, and the predictions on both test
        sets (to count what a method changed)."""
        clean = predictions(model, self.test_set, self.device) if self.test_set is not None else None
        attack = predictions(model, self.attack_test_set, self.device) if self.attack_test_set is not None else None
        result = {"acc": _share(clean), "asr": _share(attack), "attack_size": len(attack[1]) if attack else 0}
        result |= {"label": None, "label_acc": None}
        if attack is not None and len(attack[1]):
            label = int(attack[1].mode().values)  # what the attacker wants (a backdoor: its target class)
            result["label"] = label
            if clean is not None:
                result["label_acc"] = _share(clean, clean[1] == label)
        result["predicted"] = torch.cat([pair[0] for pair in (clean, attack) if pair is not None] or [torch.zeros(0)])
        return result


def verdict(report: FitReport) -> str:
    """What a corrective fit did to the attack: ``"changed nothing"`` (no prediction on the clean or attack test set
    moved), ``"attack weakened"`` (the ASR fell by more than twice its standard error on the attack test set,
    ``sqrt(p (1 - p) / n)`` at the victim's ASR ``p``: a smaller fall is what another seed could give) or ``"attack
    not weakened"``; without an attack test set, whether any prediction changed."""
    if report.changed_predictions is None:
        return "not measured (no test set)"
    if report.changed_predictions == 0:
        return "changed nothing"
    before, after, size = report.before_asr, report.asr, report.attack_size
    if before is None or after is None:
        return "predictions changed"
    return "attack weakened" if _beyond_noise(before - after, before, size=size) else "attack not weakened"


@dataclass
class Round:
    """One round of the loop: the audit whose flagged samples it added, everything its fit forgot (indices into the
    whole training set: this audit's and the earlier rounds') and the fit's result."""

    number: int
    audit: AuditResult
    forgotten: Tensor
    corrected: Corrected


@dataclass
class GiveBack:
    """The second opinion on the final forgotten set: what the corrected model recognised, the fit without the rest
    that confirmed it (``None``: nothing given back, or the opinion was not asked), whether it stands, and why."""

    opinion: Optional[Opinion]
    fit: Optional[Round]
    confirmed: bool
    reason: str
    picture: Optional[Path] = None  # the decision as a picture (``second_opinion.png`` beside the fits)


@dataclass
class CorrectionResult:
    """Every round of the correction loop, why no further round ran, and the second opinion on its final set."""

    rounds: list[Round]
    stopped: str
    second_opinion: Optional[GiveBack] = None

    @property
    def final(self) -> Round:
        """The round whose model the correction ends with: the second opinion's fit when it stands, else the last."""
        opinion = self.second_opinion
        return opinion.fit if opinion is not None and opinion.confirmed else self.rounds[-1]

    def summary(self, poisons: Optional[Tensor] = None) -> dict[str, Any]:
        """The rounds in brief, for ``correction.json``: each round's audit, what its fit forgot and did, its files; the
        second opinion's decision; precision and recall of each forgotten set when the ``poisons`` are known."""

        def entry(r: Round) -> dict[str, Any]:
            report = r.corrected.report
            return {"round": r.number, "audit": r.audit.output_dir.name, "forgotten": len(r.forgotten),
                    "acc": report.acc, "asr": report.asr, "label_acc": report.label_acc, "verdict": report.verdict,
                    "checkpoint": r.corrected.checkpoint.name, "report": r.corrected.report_path.name,
                    **_detection(r.forgotten, poisons)}  # fmt: skip

        summary: dict[str, Any] = {"rounds": [entry(r) for r in self.rounds], "stopped": self.stopped}
        opinion = self.second_opinion
        if opinion is not None:
            summary["second_opinion"] = {
                "confirmed": opinion.confirmed,
                "reason": opinion.reason,
                **(opinion.opinion.summary() if opinion.opinion is not None else {}),
                **({"fit": entry(opinion.fit)} if opinion.fit is not None else {}),
            }
        summary["final"] = {"checkpoint": self.final.corrected.checkpoint.name, "forgotten": len(self.final.forgotten),
                            **_detection(self.final.forgotten, poisons)}  # fmt: skip
        return summary


class Correction:
    """The correction loop (see the module's description) of one corrective fit and one detector.

    Made for retraining: a retrained model has learnt from the kept samples alone, so its audit asks which of them
    still carry the attack, and the poisons the first audit missed now carry it alone. It runs after any method (the
    corrected model is audited as it is). Round k's audit is published beside the first one as
    ``<audit folder>_round<k>`` (flagged indices into the whole training set); the fits' models and reports go to
    ``fit.out_dir``, and ``correction.json`` there lists the rounds and why the loop stopped: the query is put right,
    an audit flags nothing new, ``rounds`` fits have run, or the detector traces no query (one round).

    Under DDP every process takes part in the first fit (the others call ``fit.run`` themselves); the rounds after it
    run in this process alone.

    Args:
        fit: The corrective fit.
        detector: What audits a corrected model that still misbehaves (the first audit's detector).
        factors_dir: Where kronfluence's factors are cached.
        rounds: At most this many fits; 1: one fit, no further audit.
        second_opinion: Once the query is put right, give back the flagged samples the corrected model recognises as
            members of their label, and confirm with a fit without the rest (``delta_influence.second_opinion``);
            ``None``: the final set as the audits flagged it.
        log: Where the console lines go.
    """

    def __init__(
        self,
        fit: CorrectiveFit,
        detector: Detector,
        factors_dir: str | Path,
        rounds: int = 2,
        second_opinion: Optional[SecondOpinion] = SecondOpinion(),
        log: Callable[[str], object] = print,
    ) -> None:
        check_rounds(rounds)
        self.fit, self.detector, self.factors_dir, self.rounds, self.log = fit, detector, factors_dir, rounds, log
        self.second_opinion = second_opinion

    def run(self, victim: nn.Module, audit: AuditResult) -> Optional[CorrectionResult]:
        """Corrects ``victim`` for ``audit``'s flagged samples, in rounds.

        Returns:
            The rounds and why the loop stopped; ``None`` when there was nothing to forget or this process does not
            save (DDP processes other than global rank 0).
        """
        if audit.data.indices is not None:
            raise CorrectionError(
                "the correction loop starts from an audit of the whole training set, not of a part of it."
            )
        forgotten = audit.flagged
        corrected = self.fit.run(victim, forgotten, audit.output_dir.name)
        if corrected is None:
            return None
        rounds = [Round(1, audit, forgotten, corrected)]
        while True:
            stopped = self._stop(audit, rounds)
            if stopped is not None:
                break
            number = len(rounds) + 1
            self.log(
                f"Corrective round {number}: the corrected model still predicts the attacker's label for the query "
                f"({audit.summary.get('query')}); auditing it on the {self.fit.num_train - len(forgotten)} samples it "
                "kept."
            )
            kept = torch.tensor(retained_indices(self.fit.num_train, forgotten), dtype=torch.long)
            again = run_audit(
                corrected.model, audit.data.subset(kept), self.detector, f"{audit.output_dir}_round{number}",
                self.factors_dir, audit.query, self.fit.device, log=self.log,
            )  # fmt: skip
            if not len(again.flagged):
                stopped = f"the audit of round {number} flagged nothing more, so the last corrected model stands"
                break
            forgotten = torch.cat([forgotten, again.flagged]).unique()
            corrected = self.fit.run(victim, forgotten, again.output_dir.name, number, alone=True)
            rounds.append(Round(number, again, forgotten, corrected))
        self.log(f"Correction: {len(rounds)} corrective fit{'s' if len(rounds) > 1 else ''}; {stopped}.")
        result = CorrectionResult(rounds, stopped)
        if self.second_opinion is not None:
            result.second_opinion = self._give_back(victim, audit, rounds[-1])
            self.log(f"Second opinion: {result.second_opinion.reason}.")
        poisons = audit.data.poison_indices
        text = json.dumps(result.summary(poisons), indent=2)
        write_new(self.fit.out_dir / "correction.json", lambda path: path.write_text(text))
        return result

    def _give_back(self, victim: nn.Module, audit: AuditResult, last: Round) -> GiveBack:
        """The second opinion on the last round's forgotten set, confirmed by a fit without what it keeps: the give-back
        stands unless the query misbehaves again or the attack's success rate rises beyond its noise."""
        if audit.query is not None and misbehaves(last.corrected.model, audit.data, audit.query, self.fit.device):
            return GiveBack(None, None, False, "not asked: the corrected model still misbehaves on the query")
        if self.fit.test_set is None:
            return GiveBack(None, None, False, "not asked: there is no clean test set to read its thresholds from")
        opinion = give_back(
            last.corrected.model, audit.data.train_set, last.forgotten, self.fit.test_set, self.second_opinion,
            self.fit.device,
        )  # fmt: skip
        poisons = audit.data.poison_indices
        picture = write_new(self.fit.out_dir / "second_opinion.png", lambda path: plot_opinion(opinion, path, poisons))
        if not len(opinion.given_back):
            return GiveBack(opinion, None, False, "the corrected model recognises none of the flagged samples", picture)
        if not len(opinion.kept):  # a fit that keeps everything trains the victim again, which misbehaved
            return GiveBack(
                opinion, None, False,
                "undone: the corrected model recognises every flagged sample, and a fit that kept them all would be "
                "the victim's own training", picture,
            )  # fmt: skip
        self.log(
            f"Second opinion: the corrected model recognises {len(opinion.given_back)} of the {len(last.forgotten)} "
            "flagged samples as members of their label; confirming with a fit that keeps them."
        )
        corrected = self.fit.run(
            victim, opinion.kept, f"{last.corrected.report.flagged_by}, second opinion", last.number, alone=True,
            name=f"{self.fit.method}_second_opinion",
        )  # fmt: skip
        fit = Round(last.number, last.audit, opinion.kept, corrected)
        before, after = last.corrected.report, corrected.report
        if audit.query is not None and misbehaves(corrected.model, audit.data, audit.query, self.fit.device):
            reason = "undone: the model that kept them misbehaves on the query again"
            return GiveBack(opinion, fit, False, reason, picture)
        rose = before.asr is not None and after.asr is not None
        if rose and _beyond_noise(after.asr - before.asr, before.asr, after.asr, size=after.attack_size):
            reason = (
                f"undone: keeping them raised the attack's success rate from {_pct(before.asr)} to {_pct(after.asr)}"
            )
            return GiveBack(opinion, fit, False, reason, picture)
        reason = (
            f"{len(opinion.given_back)} flagged samples given back, confirmed by a fit that kept them "
            f"({len(opinion.kept)} forgotten; clean accuracy {_pct(after.acc)}"
            + (f", ASR {_pct(after.asr)})" if after.asr is not None else ")")
        )
        return GiveBack(opinion, fit, True, reason, picture)

    def _stop(self, audit: AuditResult, rounds: list[Round]) -> Optional[str]:
        """Why no further round runs after ``rounds``, or ``None`` to go on."""
        if audit.query is None:
            return f"{audit.title} traces no query, so the corrected model is not audited again"
        where, label = audit.summary.get("query"), audit.summary.get("query_label")
        if not misbehaves(rounds[-1].corrected.model, audit.data, audit.query, self.fit.device):
            return f"the corrected model no longer predicts the attacker's label {label} for the query ({where})"
        if len(rounds) == self.rounds:
            return (
                f"the corrected model still predicts the attacker's label {label} for the query ({where}), but "
                f"corrective_rounds={self.rounds} fits have run"
            )
        return None


def check_rounds(rounds: int) -> None:
    """The one check of how many corrective fits the loop may run.

    Example:
        >>> check_rounds(0)
        Traceback (most recent call last):
        ...
        delta_influence.correction.CorrectionError: corrective_rounds=0: give 1 (one corrective fit) or more (the \
corrected model is audited again while it still misbehaves on the query).
    """
    if rounds < 1:
        raise CorrectionError(
            f"corrective_rounds={rounds}: give 1 (one corrective fit) or more (the corrected model is audited again "
            "while it still misbehaves on the query)."
        )


def describe(report: FitReport, checkpoint: Path) -> str:
    """A corrective fit's before/after table, for the console."""

    def pct(value: Optional[float]) -> str:
        return "   n/a" if value is None else f"{100 * value:5.1f}%"

    labelled = report.label is not None  # the attacker's label: its clean accuracy in a third column
    header = f"   acc of label {report.label}" if labelled else ""
    before = f"  {pct(report.before_label_acc)}" if labelled else ""
    after = f"  {pct(report.label_acc)}" if labelled else ""
    return (
        f"Corrective fit '{report.method}' without {report.flagged_by or 'the given indices'} ({report.time_s:.1f} s, "
        f"{report.forgotten} samples forgotten): {report.verdict}, {pct(report.changed_predictions).strip()} of test "
        "predictions changed\n"
        f"            clean acc   ASR{header}\n"
        f"  before      {pct(report.before_acc)}  {pct(report.before_asr)}{before}\n"
        f"  after       {pct(report.acc)}  {pct(report.asr)}{after}\n"
        f"  corrected model: {shown(checkpoint)}"
    )


def _beyond_noise(change: float, *rates: float, size: int) -> bool:
    """Whether a change of an attack's success rate, measured on ``size`` attack images, exceeds twice its standard
    error ``sqrt(p (1 - p) / size)`` at the larger of ``rates``: a smaller change is what another seed could give."""
    rate = max(rates)
    return size > 0 and change > 2 * math.sqrt(rate * (1 - rate) / size)


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _detection(flagged: Tensor, poisons: Optional[Tensor]) -> dict[str, float]:
    """Precision and recall of a forgotten set, when the poisons are known."""
    if poisons is None or not len(flagged):
        return {}
    found = int(torch.isin(flagged, poisons).sum())
    return {"precision": found / len(flagged), "recall": found / len(poisons)}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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


def _before_after(report: FitReport) -> str:
    """Clean accuracy and ASR, before -> after, for the console."""

    parts = [f"clean accuracy {_pct(report.before_acc)} -> {_pct(report.acc)}"]
    if report.asr is not None:
        parts.append(f"ASR {_pct(report.before_asr)} -> {_pct(report.asr)}")
    return ", ".join(parts)
