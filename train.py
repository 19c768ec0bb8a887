"""Entry point: ``python train.py fit --config configs/cifar10_badnets.yaml``.

Poisons a data set, trains a classifier on it and, when the config adds ``InfluenceCollapseCallback``, audits the
trained model with Δ-Influence and runs the corrective fit. Any option can be overridden on the command line
(``--trainer.max_epochs 2``); ``--print_config`` prints the full configuration.
"""

import netrc
import os
from typing import Optional

from pytorch_lightning.cli import LightningCLI

from datamodules import PoisonedDataModule
from lightning_modules import PoisonClassifier


class DeltaInfluenceCLI(LightningCLI):
    """LightningCLI that takes the number of classes and image channels from the data module."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.in_channels", apply_on="instantiate")


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
    return DeltaInfluenceCLI(
        PoisonClassifier,
        PoisonedDataModule,
        args=args,
        run=run,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
