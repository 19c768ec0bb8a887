"""Corrective fit without the audit: forget a file of training indices from a victim checkpoint.

    python unlearn.py --config configs/digits_badnets.yaml \\
        --victim runs/delta-influence/<run>/checkpoints/<epoch>.ckpt \\
        --indices runs/delta-influence/<run>/delta_influence/flagged.json \\
        --unlearning lightning_modules.unlearning.SCRUB --unlearning.alpha 0.001

The config must describe the victim's data and model (the one it was trained with). Indices come as JSON (a list,
or {"flagged": [...]}), a tensor file (.pt) or text (one index per line).
"""

import json
from pathlib import Path
from typing import Optional

import torch

from datamodules import PoisonedDataModule
from lightning_modules import PoisonClassifier
from lightning_modules.unlearning import Unlearning, UnlearningError, run_corrective_fit
from train import DeltaInfluenceCLI, use_wandb_offline_without_account


class UnlearnCLI(DeltaInfluenceCLI):
    """The training CLI's model and data, plus the victim checkpoint, the indices and the method."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--victim", type=str, required=True, help="checkpoint of the trained victim")
        parser.add_argument("--indices", type=str, required=True, help="training indices to forget")
        parser.add_argument(
            "--unlearning",
            type=Unlearning,
            default={"class_path": "lightning_modules.unlearning.Retrain"},
            help="the method",
        )
        parser.add_argument("--out_dir", type=Optional[str], default=None, help="default: <victim run>/unlearn")


def read_indices(path: str) -> torch.Tensor:
    """Training indices from a .json, .pt or text file."""
    file = Path(path)
    if not file.is_file():
        raise UnlearningError(f"--indices={path!r} is not a file; give the audit's flagged.json or flagged.pt.")
    if file.suffix == ".pt":
        return torch.as_tensor(torch.load(file), dtype=torch.long)
    if file.suffix == ".json":
        content = json.loads(file.read_text())
        return torch.as_tensor(content["flagged"] if isinstance(content, dict) else content, dtype=torch.long)
    return torch.tensor([int(line) for line in file.read_text().split()], dtype=torch.long)


def load_victim(model: torch.nn.Module, path: str) -> None:
    """Loads the checkpoint's weights into ``model``, refusing one made for another architecture or data set."""
    if not Path(path).is_file():
        raise UnlearningError(f"--victim={path!r} is not a file; give the victim's .ckpt from its run's checkpoints/.")
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        details = (missing or unexpected or mismatched)[:3]
        raise UnlearningError(
            f"--victim={path!r} does not match the configured model ({len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(mismatched)} differently shaped weights, e.g. {details}); pass the config the victim "
            "was trained with (model.arch, data.dataset)."
        )
    model.load_state_dict(state)


def main(args: Optional[list[str]] = None) -> Optional[dict]:
    use_wandb_offline_without_account()
    cli = UnlearnCLI(
        PoisonClassifier, PoisonedDataModule, args=args, run=False, parser_kwargs={"parser_mode": "omegaconf"}
    )
    config = cli.config_init
    load_victim(cli.model, config.victim)
    data = cli.datamodule
    data.prepare_data()
    data.setup("fit")
    accelerator = "gpu" if cli.trainer.strategy.root_device.type == "cuda" else "cpu"
    report = run_corrective_fit(
        cli.model,
        config.unlearning,
        read_indices(config.indices),
        train_set=data.train_set,
        eval_train_set=data.eval_train_set,
        test_set=data.test_set,
        attack_test_set=data.attack_test_set,
        batch_size=data.batch_size,
        max_epochs=cli.trainer.max_epochs,
        out_dir=Path(config.out_dir) if config.out_dir else Path(config.victim).resolve().parent.parent / "unlearn",
        accelerator=accelerator,
        seed=config.seed_everything or 0,
    )
    if report is not None:
        print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
