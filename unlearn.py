"""Corrective fit without the audit: forget a file of training indices from a victim checkpoint.

    python unlearn.py --run runs/delta-influence/<run> --unlearning lightning_modules.unlearning.SCRUB

takes everything from the run's folder: its saved config.yaml, its checkpoint, its audit's flagged.json and the
corrective fit its config names (Retrain when none; any of them can still be given: --config, --victim, --indices,
--unlearning). It finishes a corrective fit that was interrupted. Without a run folder:

    python unlearn.py --config configs/digits_badnets.yaml \\
        --victim runs/delta-influence/<run>/checkpoints/<epoch>.ckpt \\
        --indices runs/delta-influence/<run>/delta_influence/flagged.json \\
        --unlearning lightning_modules.unlearning.SCRUB --unlearning.alpha 0.001

The config must describe the victim's data and model (the one it was trained with). Indices come as JSON (a list,
or {"flagged": [...]}), a tensor file (.pt) or text (one index per line).
"""

import json
import sys
from pathlib import Path
from typing import Optional

import torch
import yaml

from datamodules import PoisonedDataModule
from delta_influence.errors import ConfigError
from delta_influence.quiet import hide_harmless_warnings
from delta_influence.stages import run_stage
from lightning_modules import PoisonClassifier
from lightning_modules.unlearning import CorrectiveFit, Unlearning, UnlearningError
from lightning_modules.weights import load_weights
from train import AUDIT, DeltaInfluenceCLI, run_command, run_folder_of, use_wandb_offline_without_account


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
        # a run's saved config.yaml holds the `fit` command's own options too; they play no part here
        parser.add_argument("--ckpt_path", type=Optional[str], default=None, help="ignored (from a saved fit config)")
        parser.add_argument("--weights_only", type=Optional[bool], default=None, help="ignored (as --ckpt_path)")


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
    """Loads the victim checkpoint's weights into ``model``, refusing one made for another architecture or data set."""
    try:
        load_weights(model, path, "--victim")
    except ConfigError as error:
        raise UnlearningError(str(error)) from None


def from_run_folder(args: list[str]) -> list[str]:
    """``args`` with ``--run <folder>`` replaced by the folder's saved config, victim checkpoint and audit's flagged
    indices; options given explicitly win (they come later on the command line)."""
    if "--run" not in args and not any(arg.startswith("--run=") for arg in args):
        return args
    rest, folder = [], None
    iterator = iter(args)
    for arg in iterator:
        if arg == "--run":
            folder = next(iterator, None)
        elif arg.startswith("--run="):
            folder = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if folder is None or not Path(folder).is_dir():
        raise UnlearningError(f"--run={folder!r} is not a folder; give a run's folder, e.g. runs/delta-influence/<id>.")
    run = Path(folder)
    found = ["--config", str(_one(run, "config.yaml", "its saved config"))]
    if "--victim" not in rest:
        found += ["--victim", str(_one(run, "checkpoints/*.ckpt", "the victim's checkpoint", "--victim"))]
    if "--indices" not in rest:
        audits = sorted(run.glob("delta_influence*/flagged.json"), key=lambda p: _version(p.parent.name))
        if not audits:
            raise UnlearningError(f"--run={folder!r} holds no audit (delta_influence/flagged.json); pass --indices.")
        found += ["--indices", str(audits[-1])]  # the latest audit
    given = any(arg == "--unlearning" or arg.startswith("--unlearning=") for arg in rest)
    if not given and (configured := _configured_unlearning(run / "config.yaml")) is not None:
        found += ["--unlearning", configured]  # the run's own corrective fit, as its config says
    return found + rest


def _configured_unlearning(config: Path) -> Optional[str]:
    """The corrective fit a run's saved config names in its audit section (as a YAML string), if any."""
    audit = (yaml.safe_load(config.read_text()) or {}).get(AUDIT) or {}
    unlearning = (audit.get("init_args") or audit).get("unlearning")
    return yaml.safe_dump(unlearning, default_flow_style=True).strip() if unlearning else None


def _one(run: Path, pattern: str, what: str, option: str = "--config") -> Path:
    """The single file matching ``pattern`` in the run folder."""
    matches = sorted(run.glob(pattern))
    if len(matches) != 1:
        names = ", ".join(p.name for p in matches) or "nothing"
        raise UnlearningError(
            f"--run={str(run)!r}: expected one file for {what} ({pattern}), found {names}; pass {option} explicitly."
        )
    return matches[0]


def _version(name: str) -> int:
    """2 for ``delta_influence-2``, 1 for ``delta_influence``."""
    suffix = name.rsplit("-", 1)[-1]
    return int(suffix) if "-" in name and suffix.isdigit() else 1


def main(args: Optional[list[str]] = None) -> Optional[dict]:
    use_wandb_offline_without_account()
    hide_harmless_warnings()
    args = from_run_folder(sys.argv[1:] if args is None else list(args))
    cli = UnlearnCLI(
        PoisonClassifier, PoisonedDataModule, args=args, run=False, parser_kwargs={"parser_mode": "omegaconf"}
    )
    config = cli.config_init
    load_victim(cli.model, config.victim)
    data = cli.datamodule
    data.prepare_data()
    data.setup("fit")
    victim = Path(config.victim).resolve()
    run = run_folder_of(config.victim)  # a run folder of this project, whose stages.json records the fit
    out_dir = Path(config.out_dir) if config.out_dir else victim.parent.parent / "unlearn"
    fit = CorrectiveFit.of(data, cli.trainer, out_dir)
    with run_stage(run, "corrective fit", "Run the same command again to finish it."):
        report = fit.run(cli.model, config.unlearning, read_indices(config.indices))
    if report is not None:
        print(Path(report["report"]).read_text())  # as stored: the checkpoint named beside the report
    return report


def _command_line() -> list[str]:
    """The command line's arguments, taken over (LightningCLI warns when it gets both ``args`` and sys.argv)."""
    args, sys.argv[1:] = sys.argv[1:], []
    return args


if __name__ == "__main__":
    run_command(lambda: main(_command_line()))
