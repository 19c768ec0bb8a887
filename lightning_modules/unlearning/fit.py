"""The corrective fit of a Lightning run: one of the unlearning methods, on the victim's data, with its trainer's
settings."""

import dataclasses
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from delta_influence.audit import eval_train_set_of
from delta_influence.correction import CorrectionError, CorrectiveFit, FitReport
from delta_influence.devices import accelerator_of, device_of
from delta_influence.lightning_modules.unlearning.methods import FitSettings, Unlearning, UnlearningData
from delta_influence.quiet import lightning_info_hidden


class LightningCorrectiveFit(CorrectiveFit):
    """A ``CorrectiveFit`` by an unlearning ``method`` (``Retrain``, ``SCRUB``, ...): the training set as trained on
    (augmented) and in evaluation form, the test sets it is measured on, and the fit settings (the victim's batch
    size, length and validation loaders; the device, strategy and processes).

    With ``strategy="ddp"`` and several devices (or nodes) in the settings, every process of an already launched
    distributed run calls ``run`` with the same arguments: the methods that train do so under that strategy, and only
    the process with ``save=True`` (global rank 0) measures and writes. A fit with ``alone=True`` (the correction
    loop's later rounds) runs in the calling process on one device.
    """

    def __init__(
        self,
        method: Unlearning,
        train_set: Dataset,
        eval_train_set: Dataset,
        test_set: Dataset | None,
        attack_test_set: Dataset | None,
        out_dir: str | Path,
        settings: FitSettings,
        save: bool = True,
        log: Callable[[str], object] = rank_zero_info,
    ) -> None:
        if len(train_set) != len(eval_train_set):
            raise CorrectionError(
                f"the training set has {len(train_set)} samples but its evaluation form {len(eval_train_set)}; index "
                "i must mean the same sample in both."
            )
        processes = settings.devices * settings.num_nodes
        super().__init__(
            len(train_set), test_set, attack_test_set, out_dir, device_of(settings.accelerator), save, processes, log
        )
        self.unlearning, self.train_set, self.eval_train_set, self.settings = (
            method,
            train_set,
            eval_train_set,
            settings,
        )

    @classmethod
    def of(
        cls, datamodule: Any, trainer: pl.Trainer, out_dir: str | Path, method: Unlearning, distributed: bool = False
    ) -> "LightningCorrectiveFit":
        """Everything from the victim's data module (its training loader, ``eval_train_set``, ``test_set``,
        ``attack_test_set`` and validation loaders) and its trainer (length, device, progress bar; its processes
        when ``distributed``)."""
        loader = datamodule.train_dataloader()
        settings = FitSettings(
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
        )
        return cls(
            method, loader.dataset, eval_train_set_of(datamodule), getattr(datamodule, "test_set", None),
            getattr(datamodule, "attack_test_set", None), out_dir, settings, save=trainer.is_global_zero,
        )  # fmt: skip

    @property
    def method(self) -> str:
        return self.unlearning.name

    def _forget(self, victim: nn.Module, flagged: Tensor, retained: list[int], alone: bool) -> tuple[nn.Module, dict]:
        settings = dataclasses.replace(self.settings, label=f"Corrective fit ({self.method})")
        if alone:
            settings = dataclasses.replace(settings, strategy="auto", devices=1, num_nodes=1)
        data = UnlearningData(
            Subset(self.train_set, retained), Subset(self.eval_train_set, flagged.tolist()), self.eval_train_set,
            settings, kept=Subset(self.eval_train_set, retained),
        )  # fmt: skip
        with lightning_info_hidden():  # its own lines announce and sum up the fit, not the Trainer's device lines
            return self.unlearning.run(victim, data)

    def _checkpoint(self, victim: nn.Module, corrected: nn.Module, report: FitReport) -> dict[str, Any]:
        """Lightning's checkpoint layout: ``Classifier.load_from_checkpoint`` reads the corrected model."""
        return super()._checkpoint(victim, corrected, report) | {"pytorch-lightning_version": pl.__version__}
