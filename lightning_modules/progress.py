"""What a fit shows of its progress: Lightning's bar named for the fit, or one console line per epoch where bars would
leave their control characters (a log file, a pipe)."""

import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, TQDMProgressBar
from pytorch_lightning.utilities import rank_zero_info
from typing_extensions import override


class NamedProgressBar(TQDMProgressBar):
    """Lightning's progress bar with ``<label>, epoch <n>`` where it says ``Epoch <n>``: a corrective fit's bars do not
    read as a second training of the victim."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *_: object) -> None:
        super().on_train_epoch_start(trainer)
        self.train_progress_bar.set_description(f"{self.label}, epoch {trainer.current_epoch}")


class EpochLines(Callback):
    """Writes ``<label> k/N (s): metric value, ...`` after every training epoch, with the metrics logged so far under
    ``train/`` and ``val/``: progress for output that is not a terminal, where the command line turns the bars off."""

    def __init__(self, label: str = "Epoch") -> None:
        self.label = label

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {
            key: float(value)
            for key, value in sorted(trainer.callback_metrics.items())
            if key.startswith(("train/", "val/")) and value.numel() == 1
        }
        shown = ", ".join(f"{key} {value:.4g}" for key, value in metrics.items())
        total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        seconds = time.perf_counter() - self._start
        rank_zero_info(f"{self.label} {trainer.current_epoch + 1}{total} ({seconds:.1f} s): {shown}")
