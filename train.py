"""Entry point: ``python train.py fit --config configs/cifar10_badnets.yaml``.

Poisons a data set, trains a classifier on it, audits the trained model with Δ-Influence (the ``delta_influence``
section: ``InfluenceCollapseCallback``, on unless ``--delta_influence=null``) and runs the corrective fit it names.
Any option can be overridden on the command line (``--trainer.max_epochs 2``); ``--print_config`` prints the full
configuration.

``python train.py audit --config <config> --ckpt_path <model.ckpt>`` audits an existing model instead: the
configured detector, then the corrective fit when one is configured, written into the checkpoint's run folder.

The audit's options are the ``delta_influence`` section (``--delta_influence.detector ...``,
``--delta_influence.contrast_ratio 2.5``); ``--delta_influence=null`` trains without it.
"""

import inspect
import netrc
import os
import re
import signal
import sys
from pathlib import Path
from typing import Callable, Optional

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException

from callbacks import InfluenceCollapseCallback
from callbacks.run_folder import RunConfigCallback
from datamodules import PoisonedDataModule
from delta_influence.errors import ConfigError, DeltaInfluenceError
from delta_influence.quiet import hide_harmless_warnings, without_unused_wandb_settings
from delta_influence.stages import StageInterrupted
from lightning_modules import PoisonClassifier
from lightning_modules.weights import load_weights

TRACEBACK_VARIABLE = "DELTA_INFLUENCE_TRACEBACK"
AUDIT = "delta_influence"  # the config section of the audit callback (`audit` is the subcommand)


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
                f"`audit` needs a data module and the audit callback (the `{AUDIT}` section); the config has "
                f"{len(audits)} InfluenceCollapseCallback. Leave `{AUDIT}` set (not null), as the configs of configs/."
            )
        (callback,) = audits
        load_weights(model, ckpt_path, "--ckpt_path")
        run_folder = run_folder_of(ckpt_path)  # the audit goes next to the checkpoint, into its run's W&B run
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
        # the audit is a section of its own (--delta_influence.detector ..., `delta_influence:` in a config), wherever
        # the callbacks are; `delta_influence: null` (--delta_influence=null) trains without it
        parser.add_lightning_class_args(InfluenceCollapseCallback, AUDIT, subclass_mode=True, required=False)
        parser.set_defaults({AUDIT: {"class_path": "callbacks.InfluenceCollapseCallback"}})

    def before_instantiate_classes(self) -> None:
        # `audit` of a checkpoint in a run folder logs into that run's W&B run (the folder's name is its id)
        if self.subcommand != "audit":
            return
        config = self.config[self.subcommand]
        run = run_folder_of(config.ckpt_path)
        logger = config.trainer.logger
        if run is not None and getattr(logger, "class_path", "").endswith("WandbLogger"):
            logger.init_args.id = run.name
            logger.init_args.resume = "allow"

    def _instantiate_trainer(self, config: dict, callbacks: list) -> pl.Trainer:
        # `delta_influence: null` leaves None among the sections' callbacks: no callback, not a None one
        return super()._instantiate_trainer(config, [callback for callback in callbacks if callback is not None])

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        audits = [callback for callback in self.trainer.callbacks if isinstance(callback, InfluenceCollapseCallback)]
        if len(audits) > 1:
            raise ConfigError(
                f"the config has an InfluenceCollapseCallback in trainer.callbacks as well as the `{AUDIT}` section: "
                f"the audit would run twice. Move its options to the top-level `{AUDIT}:` section and drop it from "
                f"trainer.callbacks (or set `{AUDIT}: null` to keep the one in the list)."
            )
        data, model = self.datamodule, self.model
        if getattr(data, "attack", None) is not None and isinstance(model, PoisonClassifier):
            # an attack's surrogate trained "as the victim" gets this run's recipe
            recipe = model.recipe(self.trainer.max_epochs, data.batch_size, data.flip, data.crop_padding)
            data.attack = data.attack.with_victim_recipe(recipe)
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                # W&B looks for a git repository in its folder as it starts: the folder must exist by then
                Path(logger.save_dir or self.trainer.default_root_dir).mkdir(parents=True, exist_ok=True)
                logger._wandb_init = without_unused_wandb_settings(logger._wandb_init)


def run_folder_of(checkpoint: Optional[str]) -> Optional[Path]:
    """The run folder of a checkpoint saved by this project (``<run>/checkpoints/<file>``), else ``None``."""
    if not checkpoint:
        return None
    path = Path(checkpoint).resolve()
    return path.parent.parent if path.parent.name == "checkpoints" else None


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
    refuse_old_audit_options(sys.argv[1:] if args is None else args)
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


def refuse_old_audit_options(args: list[str]) -> None:
    """The audit's options moved from ``--trainer.callbacks.init_args.<option>`` to ``--delta_influence.<option>``:
    the old form is refused with the new one named, rather than edited into whichever callback comes last."""
    options = set(inspect.signature(InfluenceCollapseCallback).parameters)
    for arg in args:
        match = re.fullmatch(r"--trainer\.callbacks(?:\.\d+)?\.init_args\.(\w+)(?:[.=].*)?", arg)
        if match and match.group(1) in options:
            raise ConfigError(
                f"{arg.split('=', 1)[0]}: the audit's options have a section of their own: use "
                f"--{AUDIT}.{match.group(1)} (in a config: the top-level `{AUDIT}:` section)."
            )


def run_command(main: Callable[[], object]) -> None:
    """Runs a command-line entry point. An error the project raises on purpose (a bad setting, missing data, a
    model that does not fit) ends it with the message alone and exit status 2; set DELTA_INFLUENCE_TRACEBACK=1 to
    see the traceback. Unexpected errors keep theirs. A stage stopped by a signal ends with status 128 + the signal's
    number and a line saying how to finish it, and so does training stopped by SIGTERM (which Lightning would end
    with status 0, as if it had finished)."""
    try:
        main()
    except DeltaInfluenceError as error:
        if os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
            raise
        print(f"error: {error}\n(set {TRACEBACK_VARIABLE}=1 to see where it was raised)", file=sys.stderr)
        sys.exit(2)
    except StageInterrupted as interrupted:
        print(f"error: {interrupted}", file=sys.stderr)
        sys.exit(interrupted.exit_status)
    except SIGTERMException:
        print(
            "error: training was interrupted (SIGTERM) before it finished. Resume it from its last checkpoint with "
            "the same command and --ckpt_path <run folder>/checkpoints/<checkpoint>.",
            file=sys.stderr,
        )
        sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
    run_command(main)
