"""The corrective fit: forget a set of training samples with a method, measure before and after, save the result.

``CorrectiveFit.of(datamodule, trainer, out_dir)`` takes everything from a data module and the victim's trainer in one
step; the callback, ``unlearn.py`` and the benchmarks all call it.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import Dataset, Subset

from delta_influence.devices import accelerator_of, device_of
from delta_influence.examples import accuracy
from delta_influence.files import write_new
from delta_influence.pipeline import eval_train_set_of
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
                accelerator=accelerator_of(trainer.strategy.root_device),
                strategy="ddp" if distributed else "auto",
                devices=trainer.num_devices if distributed else 1,
                num_nodes=trainer.num_nodes if distributed else 1,
                progress_bar=trainer.progress_bar_callback is not None,
            ),
            save=trainer.is_global_zero,
        )

    def run(self, victim: pl.LightningModule, method: Unlearning, flagged: Tensor) -> Optional[dict]:
        """Forgets the ``flagged`` training samples with ``method`` and measures clean accuracy and ASR before and
        after.

        The corrected model is saved as ``out_dir/<method>.ckpt`` (``<method>-2.ckpt``, ... when taken), in
        Lightning's checkpoint layout (``state_dict`` and ``hyper_parameters``), and the report next to it as
        ``<method>.json`` (the first free name); the victim is neither modified nor overwritten.

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
            self.settings,
        )  # fmt: skip
        device = device_of(self.settings.accelerator)
        before_acc, before_asr = accuracy(victim, self.test_set, device), accuracy(victim, self.attack_test_set, device)
        rank_zero_info(f"Corrective fit: {method.name}, forgetting {len(flagged)} and keeping {len(retained)} samples.")
        start = time.perf_counter()
        corrected = method.run(victim, data)
        seconds = time.perf_counter() - start
        if not self.save:
            return None
        report = {
            "method": method.name,
            "forgotten": len(flagged),
            "retained": len(retained),
            "before_acc": before_acc,
            "before_asr": before_asr,
            "acc": accuracy(corrected, self.test_set, device),
            "asr": accuracy(corrected, self.attack_test_set, device),
            "time_s": seconds,
            "processes": self.settings.devices * self.settings.num_nodes,
        }
        checkpoint = {
            "state_dict": corrected.state_dict(),
            "hyper_parameters": dict(getattr(victim, "hparams", {})),
            "pytorch-lightning_version": pl.__version__,
            "unlearning": report,
        }
        saved = write_new(self.out_dir / f"{method.name}.ckpt", lambda path: torch.save(checkpoint, path))
        stored = report | {"checkpoint": saved.name}  # beside the report: the folder stays valid when moved
        written = write_new(saved.with_suffix(".json"), lambda path: path.write_text(json.dumps(stored, indent=2)))
        return report | {"checkpoint": str(saved.resolve()), "report": str(written.resolve())}
