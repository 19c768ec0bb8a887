"""The training command: ``python train.py fit --config configs/cifar10_badnets.yaml`` (or ``delta-influence fit``).

Poisons a data set, trains a classifier on it, audits the trained model (the ``delta_influence`` section:
``InfluenceCollapseCallback``, on unless ``--delta_influence=null``) with the ``detector`` section's detector
(Δ-Influence by default) and runs the corrective fit the ``delta_influence`` section names. Any option can be
overridden on the command line (``--trainer.max_epochs 2``, ``--detector.contrast_ratio 2.5``,
``--delta_influence.unlearning SCRUB``); ``--print_config`` prints the full configuration.

``python train.py audit --config <config> --ckpt_path <model.ckpt>`` audits an existing model instead, written into
the checkpoint's run folder; ``--correct true`` also runs the correction loop.
"""

import inspect
import netrc
import os
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import yaml
from jsonargparse import lazy_instance
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_info

from delta_influence.callbacks import InfluenceCollapseCallback
from delta_influence.callbacks.run_folder import RunConfigCallback
from delta_influence.datamodules import PoisonedDataModule
from delta_influence.detectors import DeltaInfluence, Detector
from delta_influence.errors import ConfigError
from delta_influence.lightning_modules import PoisonClassifier
from delta_influence.lightning_modules.progress import EpochLines
from delta_influence.lightning_modules.weights import load_weights
from delta_influence.quiet import hide_harmless_warnings, interactive, quiet_wandb_logger

AUDIT = "delta_influence"  # the config section of the audit callback (`audit` is the subcommand)
DETECTOR = "detector"  # the config section of the detector the audit runs
JSONARGPARSE_KEYS = {"class_path", "init_args", "dict_kwargs", "help"}  # a section's own keys, not options


class AuditingTrainer(pl.Trainer):
    """Lightning's Trainer plus ``audit``, the subcommand that audits a model that was trained already."""

    def audit(
        self,
        model: pl.LightningModule,
        ckpt_path: str,
        datamodule: Optional[pl.LightningDataModule] = None,
        correct: bool = False,
        weights_only: Optional[bool] = None,
    ) -> InfluenceCollapseCallback:
        """Loads ``ckpt_path`` into ``model``, audits it with the configured detector (the audit callback's settings)
        and returns the callback.

        Args:
            model: The model, as configured; the checkpoint must fit it.
            ckpt_path: The trained model's checkpoint.
            datamodule: The data the model was trained on, as configured.
            correct: Also run the correction loop with the audit section's ``unlearning`` method.
            weights_only: Unused; accepted so that a run's saved ``fit`` config (which has it) works as it is.
        """
        audits = [callback for callback in self.callbacks if isinstance(callback, InfluenceCollapseCallback)]
        if len(audits) != 1 or datamodule is None:
            raise ConfigError(
                f"`audit` needs a data module and the audit callback (the `{AUDIT}` section); the config has "
                f"{len(audits)} InfluenceCollapseCallback. Leave `{AUDIT}` set (not null), as the configs of configs/."
            )
        (callback,) = audits
        if correct and callback.unlearning is None:
            raise ConfigError(
                f"--correct true needs a corrective fit: give one with --{AUDIT}.unlearning (e.g. Retrain), or leave "
                "--correct out to audit only."
            )
        load_weights(model, ckpt_path, "--ckpt_path")
        run_folder = run_folder_of(ckpt_path)  # the audit goes next to the checkpoint, into its run's W&B run
        datamodule.prepare_data()
        datamodule.setup("fit")
        model.to(self.strategy.root_device).eval()
        callback.audit_trained(self, model, datamodule, run_folder, correct)
        if not correct and callback.unlearning is not None:
            rank_zero_info(
                f"An audit alone: the corrective fit the config names ({callback.unlearning.name}) runs with "
                "--correct true."
            )
        return callback


class DeltaInfluenceCLI(LightningCLI):
    """LightningCLI with the detector and the audit as sections of their own; it takes the number of classes and image
    channels from the data module and saves each run's resolved config in the run's own folder."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "audit": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.in_channels", apply_on="instantiate")
        # the detector is a section of its own (--detector.contrast_ratio 2.5, --detector SpectralSignatures), handed
        # to the audit callback, another section (--delta_influence.unlearning SCRUB; `delta_influence: null` trains
        # without it)
        parser.add_subclass_arguments(Detector, DETECTOR, default=lazy_instance(DeltaInfluence), required=False)
        parser.add_lightning_class_args(InfluenceCollapseCallback, AUDIT, subclass_mode=True, required=False)
        parser.set_defaults({AUDIT: {"class_path": "delta_influence.callbacks.InfluenceCollapseCallback"}})
        parser.link_arguments(DETECTOR, f"{AUDIT}.init_args.detector", apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        refuse_old_forms(sys.argv[1:] if args is None else list(args))
        super().parse_arguments(parser, args)

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
        if not interactive():  # a log file or a pipe: a line per epoch instead of bars redrawn with control characters
            bars = [callback for callback in self.trainer.callbacks if isinstance(callback, ProgressBar)]
            self.trainer.callbacks = [callback for callback in self.trainer.callbacks if callback not in bars]
            self.trainer.callbacks.append(EpochLines())
        data, model = self.datamodule, self.model
        if getattr(data, "attack", None) is not None and isinstance(model, PoisonClassifier):
            # an attack's surrogate trained "as the victim" gets this run's recipe
            recipe = model.recipe(self.trainer.max_epochs, data.batch_size, data.flip, data.crop_padding)
            data.attack = data.attack.with_victim_recipe(recipe)
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                # W&B looks for a git repository in its folder as it starts: the folder must exist by then
                Path(logger.save_dir or self.trainer.default_root_dir).mkdir(parents=True, exist_ok=True)
                quiet_wandb_logger(logger)


def refuse_old_forms(args: list[str]) -> None:
    """Refuses the audit's old options and config forms, naming the new one: the detector's settings moved from the
    audit callback's section (``--delta_influence.contrast_ratio``, earlier ``--trainer.callbacks.init_args.*``) to
    the ``detector`` section (``--detector.contrast_ratio``); a setting given to the callback's ``detector`` argument
    directly would be overwritten by that section, so it is refused too."""
    for arg in args:
        name = arg.split("=", 1)[0]
        section = re.fullmatch(rf"--{AUDIT}(?:\.init_args)?\.(\w+)(?:\..*)?", name)
        if section and section.group(1) not in _callback_options() | JSONARGPARSE_KEYS:
            raise ConfigError(f"{name}: {_new_form(section.group(1))}")
        listed = re.fullmatch(r"--trainer\.callbacks(?:\.\d+)?\.init_args\.(\w+)(?:\..*)?", name)
        if listed and listed.group(1) in _callback_options() | _detector_options():
            raise ConfigError(f"{name}: {_new_form(listed.group(1))}")
    for config in _config_files(args):
        settings = yaml.safe_load(Path(config).read_text()) if Path(config).is_file() else None
        section = settings.get(AUDIT) if isinstance(settings, dict) else None
        options = (section.get("init_args", section) or {}) if isinstance(section, dict) else {}
        moved = sorted(option for option in options if option not in _callback_options() | JSONARGPARSE_KEYS)
        if moved:
            settings_moved = [option for option in moved if option in _detector_options()]
            others = [f"{option}: {_new_form(option)}" for option in moved if option not in _detector_options()]
            raise ConfigError(
                f"{config}: the detector's settings have a section of their own now: move "
                f"{', '.join(settings_moved) or 'them'} from `{AUDIT}:` to a top-level `{DETECTOR}:` section (on the "
                f"command line: --{DETECTOR}.<setting>); `{AUDIT}:` keeps the audit callback's own options "
                f"({', '.join(sorted(_callback_options()))}). " + " ".join(others)
            )


def _new_form(option: str) -> str:
    """Where an option of the audit callback's section went."""
    if option in _detector_options():
        return f"a setting of the detector: --{DETECTOR}.{option} (config: `{DETECTOR}: {{{option}: ...}}`)."
    if option == "detector":
        return (
            f"the detector is a section of its own: --{DETECTOR} <class> and --{DETECTOR}.<setting> (config: a "
            f"top-level `{DETECTOR}:`)."
        )
    if option == "verify":
        return f"the verification stage is the detector's setting: --{DETECTOR}.verification null turns it off."
    if option in _callback_options():
        return f"an option of the audit callback: --{AUDIT}.{option}."
    return f"no longer exists (the detector's settings: `python train.py fit --print_config`, section `{DETECTOR}`)."


def _detector_options() -> set[str]:
    return {field.name for field in fields(DeltaInfluence)}


def _callback_options() -> set[str]:
    return set(inspect.signature(InfluenceCollapseCallback).parameters) - {"detector"}


def _config_files(args: list[str]) -> list[str]:
    """The files given with ``--config`` (or ``-c``)."""
    found = []
    for index, arg in enumerate(args):
        if arg in ("--config", "-c") and index + 1 < len(args):
            found.append(args[index + 1])
        elif arg.startswith("--config="):
            found.append(arg.split("=", 1)[1])
    return found


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
    """Runs the training CLI on ``args`` (default: the command line) and returns it."""
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
