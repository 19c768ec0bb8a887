"""A run's own folder: its resolved config, checkpoints, audit and corrective fit side by side, never overwritten."""

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml
from pytorch_lightning.cli import SaveConfigCallback
from typing_extensions import override

from delta_influence.files import write_new

CONFIG_FILE = "config.yaml"


def run_dir(trainer: pl.Trainer) -> Path:
    """The run's folder: the parent of its checkpoint folder, by Lightning's rule (``<logger save_dir>/<name>/
    <version>`` with a logger, else the trainer's root folder)."""
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and getattr(checkpoint, "dirpath", None):
        return Path(checkpoint.dirpath).parent
    logger = trainer.logger
    if logger is None:
        return Path(trainer.default_root_dir)
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version


class RunConfigCallback(SaveConfigCallback):
    """Saves the run's full resolved config (what ``--print_config`` prints: trainer, model, data and attack) as
    ``config.yaml`` in the run's own folder, puts it in every checkpoint (``checkpoint["config"]``) and in the config
    of each logger (the W&B run's config). A later run never overwrites it: without a logger, runs share the root
    folder and a taken name becomes ``config-2.yaml``, ...

    ``train.py`` passes it to LightningCLI as ``save_config_callback``.
    """

    def __init__(self, parser, config, config_filename: str = CONFIG_FILE, **kwargs: Any) -> None:
        kwargs["save_to_log_dir"] = False  # the run's folder, not the logger's root, which every run shares
        super().__init__(parser, config, config_filename, **kwargs)
        self.path: Path | None = None

    @override
    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.path = write_new(
            run_dir(trainer) / self.config_filename,
            lambda staging: self.parser.save(self.config, staging, skip_none=False, overwrite=True, multifile=False),
        )
        settings = self.settings()
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": settings, "run_config": str(self.path)})

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint["config"] = self.settings()

    def settings(self) -> dict:
        """The resolved config as plain data, exactly as saved in ``config.yaml``."""
        return yaml.safe_load(self.parser.dump(self.config, skip_none=False))
