"""Entry point: ``python train.py fit --config configs/cifar10_badnets.yaml``.

Poisons a data set, trains a classifier on it and, when the config adds ``InfluenceCollapseCallback``, audits the
trained model with Δ-Influence and runs the corrective fit. Any option can be overridden on the command line
(``--trainer.max_epochs 2``); ``--print_config`` prints the full configuration.

``python train.py audit --config <config> --ckpt_path <model.ckpt>`` audits an existing model instead: the
configured detector, then the corrective fit when one is configured, written into the checkpoint's run folder.
"""

import netrc
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import WandbLogger

from callbacks import InfluenceCollapseCallback
from callbacks.run_folder import RunConfigCallback
from datamodules import PoisonedDataModule
from delta_influence.errors import ConfigError, DeltaInfluenceError
from delta_influence.quiet import hide_harmless_warnings, without_unused_wandb_settings
from lightning_modules import PoisonClassifier
from lightning_modules.weights import load_weights

TRACEBACK_VARIABLE = "DELTA_INFLUENCE_TRACEBACK"


class AuditingTrainer(pl.Trainer):
    """Lightning's Trainer plus ``audit``, the subcommand that audits a model that was trained already."""

    def audit(
        self,
        model: pl.LightningModule,
        ckpt_path: str,
        datamodule: Optional[pl.LightningDataModule] = None,
        weights_only: Optional[bool] = None,
    ):
        """Loads ``ckpt_path`` into ``model``, runs the configured ``InfluenceCollapseCallback`` (its detector, then
        its corrective fit when one is configured) on it and returns the callback.

        Args:
            model: The model, as configured; the checkpoint must fit it.
            ckpt_path: The trained model's checkpoint.
            datamodule: The data the model was trained on, as configured.
            weights_only: Unused; accepted so that a run's saved ``fit`` config (which has it) works as it is.
        """
        audits = [callback for callback in self.callbacks if isinstance(callback, InfluenceCollapseCallback)]
        if len(audits) != 1 or datamodule is None:
            raise ConfigError(
                f"`audit` needs a data module and exactly one InfluenceCollapseCallback in trainer.callbacks; the "
                f"config has {len(audits)}. Use a config of configs/ (they all add one)."
            )
        (callback,) = audits
        load_weights(model, ckpt_path, "--ckpt_path")
        checkpoint = Path(ckpt_path).resolve()
        # a run folder of this project: the audit goes next to the checkpoint
        run_folder = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
        datamodule.prepare_data()
        datamodule.setup("fit")
        model.to(self.strategy.root_device).eval()
        callback.audit_trained(self, model, datamodule, run_folder)
        return callback


class DeltaInfluenceCLI(LightningCLI):
    """LightningCLI that takes the number of classes and image channels from the data module and saves each run's
    resolved config in the run's own folder."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "audit": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.in_channels", apply_on="instantiate")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                # W&B looks for a git repository in its folder as it starts: the folder must exist by then
                Path(logger.save_dir or self.trainer.default_root_dir).mkdir(parents=True, exist_ok=True)
                logger._wandb_init = without_unused_wandb_settings(logger._wandb_init)


def use_wandb_offline_without_account() -> None:
    """W&B runs offline, without a login prompt, unless an API key is configured or WANDB_MODE is set."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY") or _netrc_has_wandb():
        return
    os.environ["WANDB_MODE"] = "offline"
    print("No W&B API key configured: logging offline. `wandb sync <run folder>` uploads a run later.")


def _netrc_has_wandb() -> bool:
    """Whether ``wandb login`` stored a key in ~/.netrc."""
    try:
        return (
            netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1]) is not None
        )
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def main(args: Optional[list[str]] = None, run: bool = True) -> DeltaInfluenceCLI:
    """Runs the CLI on ``args`` (default: the command line)."""
    use_wandb_offline_without_account()
    hide_harmless_warnings()
    return DeltaInfluenceCLI(
        PoisonClassifier,
        PoisonedDataModule,
        args=args,
        run=run,
        trainer_class=AuditingTrainer,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_callback=RunConfigCallback,
    )


def run_command(main: Callable[[], object]) -> None:
    """Runs a command-line entry point. An error the project raises on purpose (a bad setting, missing data, a
    model that does not fit) ends it with the message alone and exit status 2; set DELTA_INFLUENCE_TRACEBACK=1 to
    see the traceback. Unexpected errors keep theirs."""
    try:
        main()
    except DeltaInfluenceError as error:
        if os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
            raise
        print(f"error: {error}\n(set {TRACEBACK_VARIABLE}=1 to see where it was raised)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run_command(main)
