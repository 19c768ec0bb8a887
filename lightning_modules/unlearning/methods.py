"""The unlearning methods of the corrective fit: retrain from scratch, fine-tune, SSD, Potion, SCRUB and Bad Teacher.

Each method is a small configuration object (YAML: ``class_path: delta_influence.lightning.SCRUB``) whose ``run``
returns a corrected copy of the victim and what the method measured about itself; the victim itself is never
modified. Every training run uses its own fresh ``Trainer``. Why each default is what it is: docs/decisions/.
"""

import copy
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from torchmetrics import Metric

from delta_influence.correction import CorrectionError
from delta_influence.devices import device_of
from delta_influence.errors import ConfigError
from delta_influence.examples import accuracy
from delta_influence.lightning_modules.progress import EpochLines, NamedProgressBar
from delta_influence.lightning_modules.unlearning.distillation import BadTeacherModule, ScrubModule
from delta_influence.unlearning import (
    IMPORTANCES,
    dampen,
    importance_ratios,
    importances,
    potion_search,
    ratio_quantiles,
)


@dataclass
class FitSettings:
    """How the victim was trained and where a corrective fit trains: the batch size, the length (``max_epochs`` and
    ``max_steps``, as Lightning's Trainer takes them), the validation loaders and how often the victim validated on
    them (the methods that train the victim's own module validate as the victim did), the accelerator, strategy and
    processes, and whether to show progress bars (named ``label``: what the console calls this fit)."""

    batch_size: int
    max_epochs: Optional[int] = None
    max_steps: int = -1
    val_dataloaders: Any = None
    check_val_every_n_epoch: Optional[int] = 1
    accelerator: str = "cpu"
    strategy: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    progress_bar: bool = True
    label: str = "Corrective fit"


@dataclass
class UnlearningData:
    """What a method works on: the retained set (augmented, for training), the forget set and the full training set
    (evaluation form), the fit settings, and the retained set in evaluation form (``kept``; ``None``: use
    ``retain``)."""

    retain: Dataset
    forget: Dataset
    full: Dataset
    settings: FitSettings
    kept: Optional[Dataset] = None


class Unlearning(ABC):
    """An unlearning method of the corrective fit."""

    name: str

    @abstractmethod
    def run(self, victim: pl.LightningModule, data: UnlearningData) -> tuple[nn.Module, dict]:
        """A corrected copy of ``victim``, and what the method measured about itself (e.g. the share of parameters
        SSD dampened) for the corrective fit's report."""


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
            raise CorrectionError(f"max_epochs={max_epochs} must be at least 1, or null for the victim's length.")
        self.max_epochs = max_epochs
        self.seed = seed

    def run(self, victim: pl.LightningModule, data: UnlearningData) -> tuple[nn.Module, dict]:
        return _fit(_reinitialised(victim, self.seed), data, self.max_epochs), {}


class FineTune(Unlearning):
    """Catastrophic forgetting, the corrective-unlearning benchmark's baseline (Goel et al., 2024): the victim trained
    further on the retained set with its own ``configure_optimizers`` (learning rate and schedule) for a quarter of
    its length. The benchmark fine-tunes for a quarter of the victim's iterations at its peak learning rate with a
    linear decay; here the victim's own schedule is compressed into that quarter, so the recipe stays the victim's.

    Args:
        max_epochs: Epochs; ``None``: a quarter of the victim's ``max_epochs`` (or ``max_steps``), rounded up.
    """

    name = "finetune"

    def __init__(self, max_epochs: Optional[int] = None) -> None:
        if max_epochs is not None and max_epochs < 1:
            raise CorrectionError(f"max_epochs={max_epochs} must be at least 1, or null for a quarter of the victim's.")
        self.max_epochs = max_epochs

    def run(self, victim: pl.LightningModule, data: UnlearningData) -> tuple[nn.Module, dict]:
        try:
            return _fit(_copy(victim), data, self.max_epochs, share=0.25), {}
        except ConfigError as error:  # e.g. milestones in whole epochs beyond the quarter
            raise CorrectionError(
                f"FineTune trains the victim's recipe for a quarter of its length (or max_epochs), which the recipe "
                f"refuses: {error} Give FineTune a max_epochs the recipe accepts, or milestones as fractions."
            ) from None


class SSD(Unlearning):
    """Selective synaptic dampening (Foster et al., 2024): no training; parameters whose forget-set importance
    exceeds ``alpha`` times their full-training-set importance are scaled by ``min(1, lam * I_D / I_F)``.

    Unlike the reference, the default importance is Potion's label-free one (``"logit_norm"``: the absolute gradient
    of the mean logit norm); the reference's (``"cross_entropy"``: the squared gradient of each batch's mean
    cross-entropy) vanishes on poisons the victim fits to near-zero loss (docs/decisions/unlearning-methods.md).

    Args:
        alpha: Selection ratio (the reference: 10).
        lam: Dampening strength (the reference: 1).
        importance: ``"logit_norm"`` (Potion's) or ``"cross_entropy"`` (SSD's reference).
        batch_size: Batch size of the importance passes (the reference: 128).
    """

    name = "ssd"

    def __init__(
        self, alpha: float = 10.0, lam: float = 1.0, importance: str = "logit_norm", batch_size: int = 128
    ) -> None:
        if alpha <= 0 or lam <= 0:
            raise CorrectionError(f"SSD needs alpha > 0 and lam > 0; got alpha={alpha}, lam={lam}.")
        if importance not in IMPORTANCES:
            raise CorrectionError(f"SSD's importance={importance!r} is not one of {', '.join(IMPORTANCES)}.")
        self.alpha, self.lam, self.importance, self.batch_size = alpha, lam, importance, batch_size

    def run(self, victim: pl.LightningModule, data: UnlearningData) -> tuple[nn.Module, dict]:
        device = device_of(data.settings.accelerator)
        model = _copy(victim).to(device)
        forget = importances(model, DataLoader(data.forget, batch_size=self.batch_size), device, self.importance)
        full = importances(model, DataLoader(data.full, batch_size=self.batch_size), device, self.importance)
        fraction = dampen(model, forget, full, self.alpha, self.lam)
        rank_zero_info(f"SSD dampened {100 * fraction:.3f} % of the parameters (alpha={self.alpha}, lam={self.lam}).")
        details = {"dampened_fraction": fraction, "alpha": self.alpha, "lam": self.lam,
                   **ratio_quantiles(importance_ratios(forget, full))}  # fmt: skip
        return model.cpu(), details


class Potion(Unlearning):
    """Potion (Schoepf et al., 2024, "Potion: Towards Poison Unlearning"): outlier-resistant SSD with its own search
    for how much to dampen, which needs no knowledge of how many poisons were missed.

    Importances are label-free (the absolute gradient of the mean logit norm: they do not vanish on fitted poisons),
    on the forget set and on the retained set (as Potion's code; poisons left there count as kept). The selection
    ratio is a percentile of all parameters' ``I_F / I_D``, ``100 - ln(1 + 100 s)``; the share ``s`` starts at
    ``|forget| / (|forget| + |retained|) / 25`` and grows by ``step`` until the model's accuracy on the forget set's
    own labels (the attacker's) is at most ``rho`` times the victim's; selected parameters are scaled by
    ``min(1, I_D / I_F)``. Unlike Potion, a start that already reaches the target shrinks the share instead, to the
    least dampening that still does. ``rho`` is 0.1 rather than 0, because a flagged set holds clean samples of the
    attacker's label too (docs/decisions/unlearning-methods.md).

    Args:
        rho: Stop once the forget set's accuracy on its labels is at most ``rho`` times the victim's.
        step: Factor between successive shares.
        max_tries: Most shares tried.
        batch_size: Batch size of the importance passes (the reference: 512).
    """

    name = "potion"

    def __init__(self, rho: float = 0.1, step: float = 1.1, max_tries: int = 500, batch_size: int = 512) -> None:
        if not 0.0 <= rho < 1.0 or step <= 1.0 or max_tries < 1 or batch_size < 1:
            raise CorrectionError(
                f"Potion needs 0 <= rho < 1, step > 1, max_tries >= 1 and batch_size >= 1; got rho={rho}, "
                f"step={step}, max_tries={max_tries}, batch_size={batch_size}."
            )
        self.rho, self.step, self.max_tries, self.batch_size = rho, step, max_tries, batch_size

    def run(self, victim: pl.LightningModule, data: UnlearningData) -> tuple[nn.Module, dict]:
        device = device_of(data.settings.accelerator)
        model = _copy(victim).to(device)
        forget = importances(model, DataLoader(data.forget, batch_size=self.batch_size), device, "logit_norm")
        retained = data.kept if data.kept is not None else data.retain  # evaluation form, as the forget set
        kept = importances(model, DataLoader(retained, batch_size=self.batch_size), device, "logit_norm")
        start = len(data.forget) / (len(data.forget) + len(data.retain)) / 25
        found = potion_search(
            model, forget, kept, lambda candidate: accuracy(candidate, data.forget, device), start, self.step,
            self.rho, self.max_tries,
        )  # fmt: skip
        rank_zero_info(
            f"Potion dampened {100 * found.dampened_fraction:.3f} % of the parameters after {found.tries} tries "
            f"(share {found.share:.4g}, alpha {found.alpha:.4g}); the forget set's accuracy on its labels went from "
            f"{found.forget_acc_before:.3f} to {found.forget_acc:.3f}"
            + ("." if found.reached else f", short of rho={self.rho} x the victim's.")
        )
        details = {
            "dampened_fraction": found.dampened_fraction, "share": found.share, "percentile": found.percentile,
            "alpha": found.alpha, "tries": found.tries, "forget_acc_before": found.forget_acc_before,
            "forget_acc": found.forget_acc, "reached": found.reached, **found.quantiles,
        }  # fmt: skip
        return found.model.cpu(), details


class SCRUB(Unlearning):
    """SCRUB (Kurmanji et al., 2023): every epoch is a pass over the retained set minimising cross-entropy plus
    ``alpha`` times KL(original || student); the first ``forget_epochs`` epochs start with a pass over the forget set
    maximising that KL (the max steps stop after them, as in the reference, so that the model settles on the retained
    set). Both KL terms carry the distillation factor ``T^2``. One SGD optimiser with momentum and weight decay for
    both kinds of step, as the reference: the momentum the max-steps leave carries their direction into the first
    min-steps. Under DDP every process runs the whole forget pass (its gradients averaged across processes like the
    rest). Where the defaults differ from the reference (``lr`` decaying linearly from 0.01, the max-steps at their
    own rate ``forget_lr``, ``alpha`` 0): docs/decisions/unlearning-methods.md.

    Args:
        alpha: Weight of the KL term on the retained set (0: cross-entropy alone, without the teacher's pass).
        temperature: Distillation temperature.
        epochs: Passes over the retained set.
        forget_epochs: How many of them begin with a pass over the forget set (the reference's ``msteps``; all of
            them when it exceeds ``epochs``).
        lr, momentum, weight_decay: SGD settings.
        forget_lr: The max-steps' rate (``None``: ``lr``, as the reference), decayed with ``lr``.
        decay: ``True`` lowers the learning rate linearly to zero over the min-steps; ``False``: a constant rate, as
            SCRUB's own code.
        batch_size: Retained-set batches.
        forget_batch_size: Forget-set batches.
    """

    name = "scrub"

    def __init__(self, alpha: float = 0.0, temperature: float = 4.0, epochs: int = 2, forget_epochs: int = 1,
                 lr: float = 0.01, forget_lr: Optional[float] = 0.002, momentum: float = 0.9,
                 weight_decay: float = 5e-4, decay: bool = True, batch_size: int = 256,
                 forget_batch_size: int = 128) -> None:  # fmt: skip
        forget_lr = lr if forget_lr is None else forget_lr
        if (
            epochs < 1
            or forget_epochs < 0
            or min(batch_size, forget_batch_size) < 1
            or min(lr, forget_lr) <= 0
            or alpha < 0
        ):
            raise CorrectionError(
                f"SCRUB needs epochs >= 1, forget_epochs >= 0, lr > 0, forget_lr > 0, alpha >= 0 and batch sizes "
                f">= 1; got epochs={epochs}, forget_epochs={forget_epochs}, lr={lr}, forget_lr={forget_lr}, "
                f"alpha={alpha}, batch_size={batch_size}, forget_batch_size={forget_batch_size}."
            )
        self.alpha, self.temperature, self.epochs, self.forget_epochs = alpha, temperature, epochs, forget_epochs
        self.lr, self.forget_lr, self.momentum, self.weight_decay = lr, forget_lr, momentum, weight_decay
        self.decay, self.batch_size, self.forget_batch_size = decay, batch_size, forget_batch_size

    def run(self, victim: pl.LightningModule, data: UnlearningData) -> tuple[nn.Module, dict]:
        forget = DataLoader(data.forget, batch_size=self.forget_batch_size, shuffle=True)
        module = ScrubModule(
            _copy(victim), _copy(victim), forget, alpha=self.alpha, temperature=self.temperature,
            forget_epochs=self.forget_epochs, lr=self.lr, forget_lr=self.forget_lr, momentum=self.momentum,
            weight_decay=self.weight_decay, decay=self.decay,
        )  # fmt: skip
        module.student.train()  # the victim may come back from evaluation in eval mode
        _trainer(data.settings, max_epochs=self.epochs).fit(module, retain_loader(data.retain, self.batch_size))
        return module.student, {}


class BadTeacher(Unlearning):
    """Bad Teacher (Chundawat et al., 2023): one pass over the forget set and a random ``retain_fraction`` of the
    retained set, shuffled together; the student follows the original model on retained samples and a randomly
    initialised copy on forget samples (KL at temperature ``temperature``), with Adam at ten times the reference's
    rate (docs/decisions/unlearning-methods.md).

    Args:
        temperature: Distillation temperature.
        epochs: Passes over that mixture (the reference: 1).
        retain_fraction: Share of the retained set mixed in (the reference: 0.3).
        lr: Adam's learning rate (the reference: 1e-4).
        batch_size: Batch size (the reference: 256).
        seed: Seed of the random teacher's initialisation and of the retained sample.
    """

    name = "bad_teacher"

    def __init__(self, temperature: float = 1.0, epochs: int = 1, retain_fraction: float = 0.3, lr: float = 1e-3,
                 batch_size: int = 256, seed: int = 0) -> None:  # fmt: skip
        if epochs < 1 or not 0.0 < retain_fraction <= 1.0 or lr <= 0 or batch_size < 1:
            raise CorrectionError(
                f"BadTeacher needs epochs >= 1, 0 < retain_fraction <= 1, lr > 0 and batch_size >= 1; got epochs="
                f"{epochs}, retain_fraction={retain_fraction}, lr={lr}, batch_size={batch_size}."
            )
        self.temperature, self.epochs, self.retain_fraction = temperature, epochs, retain_fraction
        self.lr, self.batch_size, self.seed = lr, batch_size, seed

    def run(self, victim: pl.LightningModule, data: UnlearningData) -> tuple[nn.Module, dict]:
        generator = torch.Generator().manual_seed(self.seed)
        count = max(1, round(self.retain_fraction * len(data.retain)))
        retained = Subset(data.retain, torch.randperm(len(data.retain), generator=generator)[:count].tolist())
        mixture = ConcatDataset([_Marked(retained, False), _Marked(data.forget, True)])
        module = BadTeacherModule(
            _copy(victim), _copy(victim), _reinitialised(victim, self.seed), temperature=self.temperature, lr=self.lr
        )
        module.student.train()
        loader = DataLoader(mixture, batch_size=self.batch_size, shuffle=True)
        _trainer(data.settings, max_epochs=self.epochs).fit(module, loader)
        return module.student, {}


class _Marked(Dataset):
    """``dataset``'s samples with a flag: ``(input, label, forget)``."""

    def __init__(self, dataset: Dataset, forget: bool) -> None:
        self.dataset, self.forget = dataset, forget

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, bool]:
        inputs, label = self.dataset[index]
        return inputs, label, self.forget


def _fit(
    model: pl.LightningModule, data: UnlearningData, max_epochs: Optional[int], share: float = 1.0
) -> pl.LightningModule:
    """Trains ``model`` on the retained set with its own ``configure_optimizers``, in a fresh Trainer, for
    ``max_epochs`` or, when ``None``, ``share`` of the victim's length (rounded up)."""
    settings = data.settings
    _synced(model, settings.devices * settings.num_nodes > 1)
    model.train()  # Lightning keeps a module's eval mode; the victim may come back from evaluation
    loader = retain_loader(data.retain, settings.batch_size)
    length = {"max_epochs": max_epochs, "max_steps": -1}
    if max_epochs is None:
        epochs, steps = settings.max_epochs, settings.max_steps
        length = {"max_epochs": math.ceil(share * epochs) if epochs and epochs > 0 else epochs, "max_steps": steps}
        if steps > 0:
            length["max_steps"] = math.ceil(share * steps)
    trainer = _trainer(settings, check_val_every_n_epoch=settings.check_val_every_n_epoch, **length)
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=settings.val_dataloaders)
    return model


def retain_loader(retain: Dataset, batch_size: int) -> DataLoader:
    """The shuffled retained set, without a last batch smaller than half a batch: its size is whatever the audit left,
    and a batch of a few samples would move batch norm's running statistics and the weights on those few at the end of
    every epoch (docs/decisions/unlearning-methods.md)."""
    drop = len(retain) > batch_size and len(retain) % batch_size < batch_size / 2
    return DataLoader(retain, batch_size=batch_size, shuffle=True, drop_last=drop)


def _trainer(settings: FitSettings, **kwargs) -> pl.Trainer:
    """A fresh, quiet Trainer for a corrective fit: no logger, no checkpoints, no sanity check; its progress (a bar, or
    a line per epoch without one) named for the fit, so that it does not read as a second training of the victim."""
    return pl.Trainer(
        accelerator=settings.accelerator,
        strategy=settings.strategy,
        devices=settings.devices,
        num_nodes=settings.num_nodes,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=settings.progress_bar,
        callbacks=[NamedProgressBar(settings.label) if settings.progress_bar else EpochLines(settings.label)],
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
        raise CorrectionError(
            f"cannot re-initialise {type(module).__name__} for a retrain from scratch: {shown} belong to no layer "
            "with reset_parameters(), so they would keep the victim's trained values. Give those modules a "
            "reset_parameters() method, or use another corrective method (FineTune, SSD, Potion, SCRUB, BadTeacher)."
        )
    return clone
