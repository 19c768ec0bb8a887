"""EpochLines: one console line per training epoch, where progress bars would leave their control characters."""

import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info
from typing_extensions import override


class EpochLines(Callback):
    """Writes ``Epoch k/N (s): metric value, ...`` after every training epoch, with the metrics logged so far under
    ``train/`` and ``val/``: progress for output that is not a terminal (a log file, a scheduler's output), where the
    command line turns the progress bars off."""

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
        seconds = time.perf_counter() - self._start
        rank_zero_info(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs} ({seconds:.1f} s): {shown}")
