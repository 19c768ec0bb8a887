"""The corrective-fit methods: retrain from scratch, fine-tune, SSD, SCRUB and Bad Teacher.

Each method is a small configuration object (YAML: ``class_path: lightning_modules.unlearning.SCRUB``) whose ``run``
returns a corrected copy of the victim; the victim itself is never modified. Every training run uses its own fresh
``Trainer``.
"""

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import CombinedLoader, rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import Metric

from delta_influence.devices import device_of
from delta_influence.errors import ConfigError
from delta_influence.unlearning import dampen, diagonal_fisher
from lightning_modules.unlearning.distillation import BadTeacherModule, ScrubModule


class UnlearningError(ConfigError):
    """The corrective fit cannot run on what it was given."""


@dataclass
class FitSettings:
    """How the victim was trained and where a corrective fit trains: the batch size, the length (``max_epochs`` and
    ``max_steps``, as Lightning's Trainer takes them), the validation loaders (the methods that train the victim's own
    module validate on them, as the victim did), the accelerator, strategy and processes, and whether to show progress
    bars."""

    batch_size: int
    max_epochs: Optional[int] = None
    max_steps: int = -1
    val_dataloaders: Any = None
    accelerator: str = "cpu"
    strategy: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    progress_bar: bool = True


@dataclass
class UnlearningData:
    """What a method works on: the retained set (augmented, for training), the forget set and the full training set
    (evaluation form), and the fit settings."""

    retain: Dataset
    forget: Dataset
    full: Dataset
    settings: FitSettings


class Unlearning(ABC):
    """A corrective-fit method."""

    name: str

    @abstractmethod
    def run(self, victim: pl.LightningModule, data: UnlearningData) -> nn.Module:
        """Returns a corrected copy of ``victim``."""


class Retrain(Unlearning):
    """Exact unlearning: a freshly initialised copy of the victim trained on the retained set with the victim's own
    recipe (its ``configure_optimizers``, batch size and length).

    Args:
        max_epochs: Epochs; ``None`` trains as long as the victim did (its ``max_epochs`` and ``max_steps``).
        seed: Seed of the fresh initialisation (the caller's random state is left as it was).
    """

    name = "retrain"

    def __init__(self, max_epochs: Optional[int] = None, seed: int = 0) -> None:
        if max_epochs is not None and max_epochs < 1:
            raise UnlearningError(f"max_epochs={max_epochs} must be at least 1, or null for the victim's length.")
        self.max_epochs = max_epochs
        self.seed = seed

    def run(self, victim: pl.LightningModule, data: UnlearningData) -> nn.Module:
        return _fit(_reinitialised(victim, self.seed), data, self.max_epochs)


class FineTune(Retrain):
    """Catastrophic forgetting: the victim, trained further on the retained set with its own recipe.

    Args:
        max_epochs: Epochs; ``None`` trains as long as the victim did.
    """

    name = "finetune"

    def __init__(self, max_epochs: Optional[int] = None) -> None:
        super().__init__(max_epochs)

    def run(self, victim: pl.LightningModule, data: UnlearningData) -> nn.Module:
        return _fit(_copy(victim), data, self.max_epochs)


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
            raise UnlearningError(f"SSD needs alpha > 0 and lam > 0; got alpha={alpha}, lam={lam}.")
        self.alpha = alpha
        self.lam = lam
        self.batch_size = batch_size

    def run(self, victim: pl.LightningModule, data: UnlearningData) -> nn.Module:
        device = device_of(data.settings.accelerator)
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
            raise UnlearningError(
                f"{type(self).__name__} needs steps >= 1 and batch_size >= 1; got {steps}, {batch_size}."
            )
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
        trainer = _trainer(data.settings, max_epochs=-1, max_steps=self.steps)
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
        module = ScrubModule(_copy(victim), _copy(victim), self)
        self._train(module, data)
        return module.student


class BadTeacher(_Distillation):
    """Bad Teacher: distil from the original model on retained samples and from a randomly initialised copy on
    forget samples.

    Args:
        temperature: Distillation temperature.
        lr, momentum, batch_size, steps: SGD settings (the reference: 0.025, 0.9, 512, 40).
        seed: Seed of the random teacher's initialisation.
    """

    name = "bad_teacher"

    def __init__(self, temperature: float = 1.0, lr: float = 0.025, momentum: float = 0.9, batch_size: int = 512,
                 steps: int = 40, seed: int = 0) -> None:  # fmt: skip
        super().__init__(lr, momentum, batch_size, steps, temperature)
        self.seed = seed

    def run(self, victim: pl.LightningModule, data: UnlearningData) -> nn.Module:
        module = BadTeacherModule(_copy(victim), _copy(victim), _reinitialised(victim, self.seed), self)
        self._train(module, data)
        return module.student


def _fit(model: pl.LightningModule, data: UnlearningData, max_epochs: Optional[int]) -> pl.LightningModule:
    """Trains ``model`` on the retained set with its own ``configure_optimizers``, in a fresh Trainer, for
    ``max_epochs`` or, when ``None``, as long as the victim trained."""
    settings = data.settings
    _synced(model, settings.devices * settings.num_nodes > 1)
    model.train()  # Lightning keeps a module's eval mode; the victim may come back from evaluation
    loader = retain_loader(data.retain, settings.batch_size)
    length = {"max_epochs": max_epochs, "max_steps": -1}
    if max_epochs is None:
        length = {"max_epochs": settings.max_epochs, "max_steps": settings.max_steps}
    _trainer(settings, **length).fit(model, train_dataloaders=loader, val_dataloaders=settings.val_dataloaders)
    return model


def retain_loader(retain: Dataset, batch_size: int) -> DataLoader:
    """The shuffled retained set, without a last batch smaller than half a batch: its size is whatever the audit left
    (9,730 = 76 x 128 + 2 in the BadNets benchmark), and a batch of two moves batch norm's running statistics and the
    weights on two samples at the end of every epoch (3.5 points of clean accuracy after a retrain there)."""
    drop = len(retain) > batch_size and len(retain) % batch_size < batch_size / 2
    return DataLoader(retain, batch_size=batch_size, shuffle=True, drop_last=drop)


def _trainer(settings: FitSettings, **kwargs) -> pl.Trainer:
    """A fresh, quiet Trainer for a corrective fit: no logger, no checkpoints, no sanity check."""
    return pl.Trainer(
        accelerator=settings.accelerator,
        strategy=settings.strategy,
        devices=settings.devices,
        num_nodes=settings.num_nodes,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=settings.progress_bar,
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
