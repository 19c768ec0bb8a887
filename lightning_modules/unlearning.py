"""Corrective fits after an audit: retrain from scratch, fine-tune, SSD, SCRUB and Bad Teacher.

Each method is a small configuration object (YAML: ``class_path: lightning_modules.unlearning.SCRUB``) whose
``run`` returns a corrected copy of the victim; the victim itself is never modified. Every training run uses its
own fresh ``Trainer``.
"""

import copy
import json
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import CombinedLoader, rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from delta_influence.errors import ConfigError
from delta_influence.examples import evaluating
from delta_influence.files import publish
from delta_influence.unlearning import (
    bad_teacher_loss,
    dampen,
    diagonal_fisher,
    retained_indices,
    scrub_forget_loss,
    scrub_retain_loss,
)


@dataclass
class UnlearningData:
    """What a corrective fit works on: the retained set (augmented, for training), the forget set and the full
    training set (evaluation form), the victim's training batch size, epochs and validation loaders (the methods that
    train the victim's own module validate on them after each epoch, as the victim did), where to compute, and
    whether to show progress bars."""

    retain: Dataset
    forget: Dataset
    full: Dataset
    batch_size: int
    max_epochs: int
    accelerator: str = "cpu"
    seed: int = 0
    val_dataloaders: Any = None
    progress_bar: bool = True
    strategy: str = "auto"
    devices: int = 1
    num_nodes: int = 1


class Unlearning(ABC):
    """A corrective-fit method."""

    name: str

    @abstractmethod
    def run(self, victim: pl.LightningModule, data: UnlearningData) -> nn.Module:
        """Returns a corrected copy of ``victim``."""


class Retrain(Unlearning):
    """Exact unlearning: a freshly initialised copy of the victim trained on the retained set with the victim's own
    recipe (its ``configure_optimizers``, batch size and epochs).

    Args:
        max_epochs: Epochs; ``None`` uses the victim's.
    """

    name = "retrain"

    def __init__(self, max_epochs: Optional[int] = None) -> None:
        self.max_epochs = max_epochs

    def run(self, victim: pl.LightningModule, data: UnlearningData) -> nn.Module:
        return _fit(_reinitialised(victim, data.seed), data, self.max_epochs or data.max_epochs)


class FineTune(Retrain):
    """Catastrophic forgetting: the victim, trained further on the retained set with its own recipe.

    Args:
        max_epochs: Epochs; ``None`` uses the victim's.
    """

    name = "finetune"

    def run(self, victim: pl.LightningModule, data: UnlearningData) -> nn.Module:
        return _fit(_copy(victim), data, self.max_epochs or data.max_epochs)


class SSD(Unlearning):
    """Selective synaptic dampening: no training; parameters whose forget-set importance exceeds ``alpha`` times
    their full-training-set importance are scaled by ``min(1, lam * I_D / I_F)``.

    Args:
        alpha: Selection ratio.
        lam: Dampening strength.
        batch_size: Batch size of the importance passes.
    """

    name = "ssd"

    def __init__(self, alpha: float = 10.0, lam: float = 1.0, batch_size: int = 512) -> None:
        if alpha <= 0 or lam <= 0:
            raise ConfigError(f"SSD needs alpha > 0 and lam > 0; got alpha={alpha}, lam={lam}.")
        self.alpha = alpha
        self.lam = lam
        self.batch_size = batch_size

    def run(self, victim: pl.LightningModule, data: UnlearningData) -> nn.Module:
        device = _device(data.accelerator)
        model = _copy(victim).to(device)
        forget = diagonal_fisher(model, DataLoader(data.forget, batch_size=self.batch_size), device)
        full = diagonal_fisher(model, DataLoader(data.full, batch_size=self.batch_size), device)
        fraction = dampen(model, forget, full, self.alpha, self.lam)
        rank_zero_info(f"SSD dampened {100 * fraction:.3f} % of the parameters (alpha={self.alpha}, lam={self.lam}).")
        return model.cpu()


class _Distillation(Unlearning):
    """Shared settings of the distillation methods: SGD, ``steps`` steps of ``batch_size`` retained and
    ``batch_size`` forget samples."""

    def __init__(
        self, lr: float = 0.025, momentum: float = 0.9, batch_size: int = 512, steps: int = 40, temperature: float = 4.0
    ) -> None:
        if steps < 1 or batch_size < 1:
            raise ConfigError(f"{type(self).__name__} needs steps >= 1 and batch_size >= 1; got {steps}, {batch_size}.")
        self.lr = lr
        self.momentum = momentum
        self.batch_size = batch_size
        self.steps = steps
        self.temperature = temperature

    def _train(self, module: pl.LightningModule, data: UnlearningData) -> None:
        loaders = {
            "retain": DataLoader(data.retain, batch_size=self.batch_size, shuffle=True),
            "forget": DataLoader(data.forget, batch_size=self.batch_size, shuffle=True),
        }
        module.student.train()  # the victim may come back from evaluation in eval mode
        trainer = _trainer(data, max_steps=self.steps)
        trainer.fit(module, CombinedLoader(loaders, mode="max_size_cycle"))


class SCRUB(_Distillation):
    """SCRUB: each step first maximises KL(student || original) on a forget batch, then minimises cross-entropy
    plus ``alpha`` times that KL on a retained batch.

    Args:
        alpha: Weight of the KL term on the retained set.
        temperature: Distillation temperature.
        lr, momentum, batch_size, steps: SGD settings (the reference: 0.025, 0.9, 512, 40).
    """

    name = "scrub"

    def __init__(self, alpha: float = 0.001, temperature: float = 4.0, lr: float = 0.025, momentum: float = 0.9,
                 batch_size: int = 512, steps: int = 40) -> None:  # fmt: skip
        super().__init__(lr, momentum, batch_size, steps, temperature)
        self.alpha = alpha

    def run(self, victim: pl.LightningModule, data: UnlearningData) -> nn.Module:
        module = _ScrubModule(_copy(victim), _copy(victim), self)
        self._train(module, data)
        return module.student


class BadTeacher(_Distillation):
    """Bad Teacher: distil from the original model on retained samples and from a randomly initialised copy on
    forget samples.

    Args:
        temperature: Distillation temperature.
        lr, momentum, batch_size, steps: SGD settings (the reference: 0.025, 0.9, 512, 40).
    """

    name = "bad_teacher"

    def __init__(self, temperature: float = 1.0, lr: float = 0.025, momentum: float = 0.9, batch_size: int = 512,
                 steps: int = 40) -> None:  # fmt: skip
        super().__init__(lr, momentum, batch_size, steps, temperature)

    def run(self, victim: pl.LightningModule, data: UnlearningData) -> nn.Module:
        module = _BadTeacherModule(_copy(victim), _copy(victim), _reinitialised(victim, data.seed), self)
        self._train(module, data)
        return module.student


class _ScrubModule(pl.LightningModule):
    """Student and frozen teacher; one max-step and one min-step per training step (manual optimisation)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, method: SCRUB) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.student, self.method = student, method
        self.teachers = _FrozenTeachers(teacher)

    @property
    def teacher(self) -> nn.Module:
        return self.teachers[0]

    @override
    def on_fit_start(self) -> None:
        self.teachers.to(self.device)

    @override
    def training_step(self, batch: dict, batch_idx: int) -> None:
        optimizer = self.optimizers()
        method = self.method
        forget, _ = batch["forget"]
        with torch.no_grad():
            teacher_forget = self.teacher(forget)
        loss = scrub_forget_loss(self.student(forget), teacher_forget, method.temperature)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        retain, labels = batch["retain"]
        with torch.no_grad():
            teacher_retain = self.teacher(retain)
        loss = scrub_retain_loss(self.student(retain), labels, teacher_retain, method.alpha, method.temperature)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.student.parameters(), lr=self.method.lr, momentum=self.method.momentum)


class _BadTeacherModule(pl.LightningModule):
    """Student distilled from the competent teacher on retained and the random teacher on forget samples."""

    def __init__(self, student: nn.Module, good: nn.Module, bad: nn.Module, method: BadTeacher) -> None:
        super().__init__()
        self.student, self.method = student, method
        self.teachers = _FrozenTeachers(good, bad)

    @override
    def on_fit_start(self) -> None:
        self.teachers.to(self.device)

    @override
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        (retain, _), (forget, _) = batch["retain"], batch["forget"]
        inputs = torch.cat([retain, forget])
        is_forget = torch.cat([torch.zeros(len(retain)), torch.ones(len(forget))]).bool().to(inputs.device)
        with torch.no_grad():
            good, bad = self.teachers[0](inputs), self.teachers[1](inputs)
        return bad_teacher_loss(self.student(inputs), good, bad, is_forget, self.method.temperature)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.student.parameters(), lr=self.method.lr, momentum=self.method.momentum)


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Optional[Dataset], accelerator: str = "cpu", batch_size: int = 512
) -> Optional[float]:
    """Accuracy of ``model`` on ``dataset``; on the attack's test set, labelled with what the attacker wants, it is
    the attack success rate."""
    if dataset is None or len(dataset) == 0:
        return None
    device = _device(accelerator)
    metric = None
    with evaluating(model, device):
        for inputs, labels in DataLoader(dataset, batch_size=batch_size):
            logits = model(inputs.to(device))
            # every process evaluates the whole set itself: nothing to gather from others
            metric = metric or MulticlassAccuracy(logits.shape[-1], average="micro", sync_on_compute=False).to(device)
            metric.update(logits, labels.to(device))
    return metric.compute().item()


def _fit(model: pl.LightningModule, data: UnlearningData, max_epochs: int) -> pl.LightningModule:
    """Trains ``model`` on the retained set with its own ``configure_optimizers``, in a fresh Trainer."""
    _synced(model, data.devices * data.num_nodes > 1)
    model.train()  # Lightning keeps a module's eval mode; the victim may come back from evaluation
    loader = retain_loader(data.retain, data.batch_size)
    _trainer(data, max_epochs=max_epochs).fit(model, train_dataloaders=loader, val_dataloaders=data.val_dataloaders)
    return model


def retain_loader(retain: Dataset, batch_size: int) -> DataLoader:
    """The shuffled retained set, without a last batch smaller than half a batch: its size is whatever the audit left
    (9,730 = 76 x 128 + 2 in the BadNets benchmark), and a batch of two moves batch norm's running statistics and the
    weights on two samples at the end of every epoch (3.5 points of clean accuracy after a retrain there)."""
    drop = len(retain) > batch_size and len(retain) % batch_size < batch_size / 2
    return DataLoader(retain, batch_size=batch_size, shuffle=True, drop_last=drop)


def _trainer(data: UnlearningData, **kwargs) -> pl.Trainer:
    """A fresh, quiet Trainer for a corrective fit: no logger, no checkpoints, no sanity check."""
    return pl.Trainer(
        accelerator=data.accelerator,
        strategy=data.strategy,
        devices=data.devices,
        num_nodes=data.num_nodes,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=data.progress_bar,
        num_sanity_val_steps=0,
        **kwargs,
    )


def _copy(module: nn.Module) -> nn.Module:
    """A deep copy that can train in a new Trainer."""
    clone = copy.deepcopy(module)
    # Lightning caches logged metrics by object id; the copy's metrics are new objects
    if isinstance(clone, pl.LightningModule):
        clone._metric_attributes = None
    return clone


def _synced(module: nn.Module, distributed: bool) -> nn.Module:
    """``module`` with its torchmetrics metrics gathering across processes only when its fit is distributed: a
    single-process corrective fit inside a distributed run must not wait for processes that are not training."""
    for metric in module.modules():
        if isinstance(metric, Metric):
            metric.sync_on_compute = distributed
    return module


def _reinitialised(module: nn.Module, seed: int) -> nn.Module:
    """A copy with every parameter drawn afresh by its layer's ``reset_parameters`` (seeded, without touching the
    caller's random state): the same architecture, untrained. A model with parameters that no ``reset_parameters``
    covers is refused rather than retrained in part."""
    clone = _copy(module)
    covered: set[int] = set()
    cuda = sorted({parameter.device.index or 0 for parameter in clone.parameters() if parameter.is_cuda})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for layer in clone.modules():
            if hasattr(layer, "reset_parameters") and layer is not clone:
                layer.reset_parameters()
                covered.update(id(parameter) for parameter in layer.parameters(recurse=False))
    left = [name for name, parameter in clone.named_parameters() if id(parameter) not in covered]
    if left:
        shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
        raise UnlearningError(
            f"cannot re-initialise {type(module).__name__} for a retrain from scratch: {shown} belong to no layer "
            "with reset_parameters(), so they would keep the victim's trained values. Give those modules a "
            "reset_parameters() method, or use another corrective method (FineTune, SSD, SCRUB, BadTeacher)."
        )
    return clone


class _FrozenTeachers(tuple):
    """Frozen teacher models, held outside the student's module tree: they stay in eval mode and out of its
    parameters, state dict and Lightning's check for modules left in eval mode at the start of training."""

    def __new__(cls, *teachers: nn.Module) -> "_FrozenTeachers":
        for teacher in teachers:
            teacher.eval()
            teacher.requires_grad_(False)
        return super().__new__(cls, teachers)

    def to(self, device: torch.device) -> None:
        for teacher in self:
            teacher.to(device)


def _device(accelerator: str) -> torch.device:
    return torch.device("cuda" if accelerator in ("gpu", "cuda") else accelerator)


class UnlearningError(ConfigError):
    """The corrective fit cannot run on what it was given."""


def run_corrective_fit(
    victim: pl.LightningModule,
    method: Unlearning,
    flagged: Tensor,
    train_set: Dataset,
    eval_train_set: Dataset,
    test_set: Optional[Dataset],
    attack_test_set: Optional[Dataset],
    batch_size: int,
    max_epochs: int,
    out_dir: Path,
    accelerator: str = "cpu",
    seed: int = 0,
    val_dataloaders: Any = None,
    progress_bar: bool = True,
    strategy: str = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    save: bool = True,
) -> Optional[dict]:
    """Forgets the ``flagged`` training samples with ``method`` and measures clean accuracy and ASR before and after.

    With ``strategy="ddp"`` and several ``devices`` (or nodes), every process of an already launched distributed run
    calls this with the same arguments: the methods that train do so under that strategy, each process evaluates
    on its own, and only the process with ``save=True`` (global rank 0) writes the model and the report.

    The corrected model is saved as ``out_dir/<method>.ckpt`` (``<method>-2.ckpt``, ... when taken), in Lightning's
    checkpoint layout (``state_dict`` and ``hyper_parameters``), and the report next to it as ``<method>.json``
    (the first free name); the victim is neither modified nor overwritten.

    Returns:
        The report, or ``None`` (with a message) when nothing is flagged.
    """
    flagged = torch.as_tensor(flagged, dtype=torch.long)
    if len(flagged) == 0:
        rank_zero_info("Corrective fit skipped: no training sample was flagged, so there is nothing to forget.")
        return None
    if len(train_set) != len(eval_train_set):
        raise UnlearningError(
            f"the training set has {len(train_set)} samples but its evaluation form {len(eval_train_set)}; index i "
            "must mean the same sample in both."
        )
    retained = retained_indices(len(train_set), flagged)
    if not retained:
        raise UnlearningError(
            f"all {len(train_set)} training samples are flagged, so nothing would be left to train on. Lower the "
            "audit's tolerance or threshold, or check the query."
        )
    data = UnlearningData(
        retain=Subset(train_set, retained),
        forget=Subset(eval_train_set, flagged.tolist()),
        full=eval_train_set,
        batch_size=batch_size,
        max_epochs=max_epochs,
        accelerator=accelerator,
        seed=seed,
        val_dataloaders=val_dataloaders,
        progress_bar=progress_bar,
        strategy=strategy,
        devices=devices,
        num_nodes=num_nodes,
    )
    before = {"acc": evaluate(victim, test_set, accelerator), "asr": evaluate(victim, attack_test_set, accelerator)}
    rank_zero_info(f"Corrective fit: {method.name}, forgetting {len(flagged)} and keeping {len(retained)} samples.")
    start = time.perf_counter()
    corrected = method.run(victim, data)
    seconds = time.perf_counter() - start
    if not save:
        return None
    report = {
        "method": method.name,
        "forgotten": len(flagged),
        "retained": len(retained),
        "before_acc": before["acc"],
        "before_asr": before["asr"],
        "acc": evaluate(corrected, test_set, accelerator),
        "asr": evaluate(corrected, attack_test_set, accelerator),
        "time_s": seconds,
        "processes": devices * num_nodes,
    }
    checkpoint = {
        "state_dict": corrected.state_dict(),
        "hyper_parameters": dict(getattr(victim, "hparams", {})),
        "pytorch-lightning_version": pl.__version__,
        "unlearning": report,
    }
    saved = _save_new(lambda path: torch.save(checkpoint, path), Path(out_dir) / f"{method.name}.ckpt")
    report["checkpoint"] = str(saved.resolve())
    written = _save_new(lambda path: path.write_text(json.dumps(report, indent=2)), saved.with_suffix(".json"))
    report["report"] = str(written.resolve())
    return report


def _save_new(write: Callable[[Path], object], target: Path) -> Path:
    """Writes a file through ``write`` and publishes it as ``target`` or the first free ``<stem>-N<suffix>``,
    atomically, never overwriting; returns the name it got."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{os.getpid()}.tmp"
    try:
        write(staging)
        return publish(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
