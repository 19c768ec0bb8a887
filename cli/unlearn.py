"""The corrective fit without the audit: forget a file of training indices from a victim checkpoint.

    python unlearn.py --run runs/delta-influence/<run> --unlearning SCRUB

takes everything from the run's folder: its saved config.yaml, its checkpoint, the flagged.json of its newest audit of
the whole training set (never a corrective round's audit, which holds that round's additions only) and the corrective
fit its config names (Retrain when none; any of them can still be given: --config, --victim, --indices,
--unlearning). It finishes a corrective fit that was interrupted. Without a run folder:

    python unlearn.py --config configs/digits_badnets.yaml \\
        --victim runs/delta-influence/<run>/checkpoints/<epoch>.ckpt \\
        --indices runs/delta-influence/<run>/delta_influence/flagged.json \\
        --unlearning SCRUB --unlearning.alpha 0.001

The config must describe the victim's data and model (the one it was trained with). Indices come as JSON (a list,
or {"flagged": [...]}), a tensor file (.pt) or text (one index per line).
"""

import json
from pathlib import Path
from typing import Optional

import torch
import yaml

from delta_influence.cli.train import AUDIT, DeltaInfluenceCLI, run_folder_of, use_wandb_offline_without_account
from delta_influence.correction import Corrected, CorrectionError
from delta_influence.datamodules import PoisonedDataModule
from delta_influence.errors import ConfigError
from delta_influence.lightning_modules import PoisonClassifier
from delta_influence.lightning_modules.unlearning import LightningCorrectiveFit, Unlearning
from delta_influence.lightning_modules.weights import load_weights
from delta_influence.quiet import hide_harmless_warnings
from delta_influence.stages import run_stage


class UnlearnCLI(DeltaInfluenceCLI):
    """The training CLI's model and data, plus the victim checkpoint, the indices and the method."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--victim", type=str, required=True, help="checkpoint of the trained victim")
        parser.add_argument("--indices", type=str, required=True, help="training indices to forget")
        parser.add_argument(
            "--unlearning",
            type=Unlearning,
            default={"class_path": "delta_influence.lightning.Retrain"},
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
        raise CorrectionError(f"--indices={path!r} is not a file; give the audit's flagged.json or flagged.pt.")
    if file.suffix == ".pt":
        return torch.as_tensor(torch.load(file), dtype=torch.long)
    if file.suffix == ".json":
        content = json.loads(file.read_text())
        return torch.as_tensor(content["flagged"] if isinstance(content, dict) else content, dtype=torch.long)
    return torch.tensor([int(line) for line in file.read_text().split()], dtype=torch.long)


def from_run_folder(args: list[str]) -> list[str]:
    """``args`` with ``--run <folder>`` replaced by the folder's saved config, victim checkpoint and newest audit's
    flagged indices; options given explicitly win (they come later on the command line)."""
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
        raise CorrectionError(f"--run={folder!r} is not a folder; give a run's folder, e.g. runs/delta-influence/<id>.")
    run = Path(folder)
    found = ["--config", str(_one(run, "config.yaml", "its saved config"))]
    if "--victim" not in rest:
        found += ["--victim", str(_one(run, "checkpoints/*.ckpt", "the victim's checkpoint", "--victim"))]
    if "--indices" not in rest:
        found += ["--indices", str(newest_audit(run) / "flagged.json")]
    given = any(arg == "--unlearning" or arg.startswith("--unlearning=") for arg in rest)
    if not given and (configured := _configured_unlearning(run / "config.yaml")) is not None:
        found += ["--unlearning", configured]  # the run's own corrective fit, as its config says
    return found + rest


def newest_audit(run: Path) -> Path:
    """The run's newest audit of the whole training set (by the time its summary records); a corrective round's audit,
    of the samples a corrected model kept, is never taken."""
    audits = []
    for summary in run.glob("*/summary.json"):
        content = json.loads(summary.read_text())
        if (
            "detector" in content
            and "part_of_training_set" not in content
            and (summary.parent / "flagged.json").is_file()
        ):
            audits.append((content.get("finished", ""), summary.stat().st_mtime, summary.parent))
    if not audits:
        raise CorrectionError(f"--run={str(run)!r} holds no audit (<detector>/flagged.json); pass --indices.")
    return max(audits)[2]


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
        raise CorrectionError(
            f"--run={str(run)!r}: expected one file for {what} ({pattern}), found {names}; pass {option} explicitly."
        )
    return matches[0]


def main(args: Optional[list[str]] = None) -> Optional[Corrected]:
    """Runs the unlearning command on ``args``; returns the corrected model with its report (``None``: nothing to
    forget)."""
    use_wandb_offline_without_account()
    hide_harmless_warnings()
    args = from_run_folder(list(args or []))
    cli = UnlearnCLI(
        PoisonClassifier, PoisonedDataModule, args=args, run=False, parser_kwargs={"parser_mode": "omegaconf"}
    )
    config = cli.config_init
    try:
        load_weights(cli.model, config.victim, "--victim")
    except ConfigError as error:
        raise CorrectionError(str(error)) from None
    data = cli.datamodule
    data.prepare_data()
    data.setup("fit")
    victim = Path(config.victim).resolve()
    run = run_folder_of(config.victim)  # a run folder of this project, whose stages.json records the fit
    out_dir = Path(config.out_dir) if config.out_dir else victim.parent.parent / "unlearn"
    indices = Path(config.indices).resolve()
    flagged_by = str(indices.relative_to(run)) if run is not None and indices.is_relative_to(run) else str(indices)
    fit = LightningCorrectiveFit.of(data, cli.trainer, out_dir, config.unlearning)
    with run_stage(run, "corrective fit", "Run the same command again to finish it."):
        corrected = fit.run(cli.model, read_indices(config.indices), flagged_by)
    if corrected is not None:
        print(corrected.report_path.read_text())  # as stored: the checkpoint named beside the report
    return corrected
