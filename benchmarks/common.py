"""Shared set-up of the CPU CIFAR-10 benchmarks: each runs a config of configs/benchmarks/ through train.py.

The victim, its data, the attack and the audit are the config's (``--attack`` picks BadNets or the Smooth Trigger);
a flag given here becomes the matching command-line override, so every table is
``python train.py fit --config configs/benchmarks/<attack>.yaml`` plus the overrides the script prints.
"""

import argparse
import copy
import dataclasses
import json
import sys
import tarfile
import time
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch

from delta_influence.audit import AuditData, AuditResult, run_audit
from delta_influence.callbacks import InfluenceCollapseCallback
from delta_influence.cli import train
from delta_influence.correction import CorrectionResult, FitReport
from delta_influence.examples import accuracy
from delta_influence.lightning_modules.unlearning import LightningCorrectiveFit, Unlearning

ROOT = Path(__file__).resolve().parents[1]
ATTACKS = ("badnets", "smooth")
SCALES = {"cpu": "a seeded 1,000 images per class, 250 poisons", "full": "all 50,000 images, 500 poisons"}


def config_of(args: argparse.Namespace) -> Path:
    """The benchmark config of ``--attack`` at ``--scale``: configs/benchmarks/cifar10_<attack>_<scale>.yaml."""
    return ROOT / "configs" / "benchmarks" / f"cifar10_{args.attack}_{args.scale}.yaml"


ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
RESULTS = ROOT / "benchmarks" / "results"
# the audit's stages as its metrics name them (``<stage>_s``, ``<stage>_epochs``)
AUDIT_STAGES = ("covariance", "eigendecomposition", "lambda", "scores", "verify")
CACHE = RESULTS / "cache"
# flag -> the config key it overrides (None: keep the config's value)
OVERRIDES = {
    "per_class": "data.per_class",
    "poisons": "data.attack.init_args.num_poisons",
    "magnitude": "data.attack.init_args.magnitude",
    "epochs": "trainer.max_epochs",
    "crop_padding": "data.crop_padding",
}


def parse_args(description: str, extra: list[tuple] = ()) -> argparse.Namespace:
    """The shared options, plus ``extra`` (flag, type, default, help) ones."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=ARCHIVE, help="cifar10-jpeg.tar.gz (image-folder tree)")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the tree is extracted once")
    parser.add_argument("--attack", choices=ATTACKS, default="badnets", help="the config's attack: ship -> dog")
    parser.add_argument(
        "--scale", choices=sorted(SCALES), default="cpu", help=", ".join(f"{k}: {v}" for k, v in SCALES.items())
    )
    parser.add_argument("--seed", type=int, default=0, help="seed_everything and data.seed")
    parser.add_argument("--per-class", type=int, help="training images per class (the config's)")
    parser.add_argument("--poisons", type=int, help="poisons, ships relabelled as dogs (the config's)")
    parser.add_argument("--magnitude", type=float, help="smooth trigger's range in [0, 1] pixel units (config: 0.2)")
    parser.add_argument("--epochs", type=int, help="victim's epochs (the config's)")
    parser.add_argument("--crop-padding", type=int, help="random-crop padding (the config's)")
    parser.add_argument("--flip", action="store_true", help="random horizontal flips (the config's otherwise)")
    for flag, kind, default, text in extra:
        parser.add_argument(flag, type=kind, default=default, help=text)
    args = parser.parse_args()
    sys.argv[1:] = []  # train.py's LightningCLI gets its arguments as ``args``, not from the command line too
    return args


def config_args(args: argparse.Namespace, config: Optional[str] = None) -> list[str]:
    """The benchmark's config (``--attack``'s, or ``config``) and the overrides ``args`` asks for, as train.py's
    command line."""
    config = config or config_of(args).relative_to(ROOT)
    command = ["--config", str(ROOT / config), "--data.root", str(extract(args.archive, args.cache))]
    command += ["--data.cache_dir", str(RESULTS / "attack_cache"), "--trainer.default_root_dir", str(RESULTS / "runs")]
    command += ["--seed_everything", str(args.seed), "--data.seed", str(args.seed)]
    for flag, key in OVERRIDES.items():
        if getattr(args, flag) is not None:
            command += [f"--{key}", str(getattr(args, flag))]
    return command + (["--data.flip", "true"] if args.flip else [])


def extract(archive: Path, cache: Path) -> Path:
    """Extracts the archive once; returns the tree's root (holding train/ and test/)."""
    root = cache / "cifar10"
    if not (root / "train").is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(cache, filter="data")
    return root


def run_tag(args: argparse.Namespace) -> str:
    """What keeps a run's results (victim, audit folder, tables) apart: nothing for the CPU-scale config as it is with
    seed 0, else its scale, overrides and seed, e.g. ``_s1``, ``_full_s1`` or ``_epochs4_s1``."""
    parts = [args.scale] if args.scale != "cpu" else []
    parts += [f"{flag}{getattr(args, flag)}" for flag in OVERRIDES if getattr(args, flag) is not None]
    parts += (["flip"] if args.flip else []) + ([f"s{args.seed}"] if args.seed else [])
    return "".join(f"_{part}" for part in parts)


def train_victim(args: argparse.Namespace, overrides: list[str] = ()) -> train.DeltaInfluenceCLI:
    """``train.py fit`` on the benchmark's config (the audit included, with ``overrides``); saves the victim under
    results/ so that the other benchmarks read the same model, and returns the finished CLI with
    ``cli.victim_metrics`` (clean accuracy, ASR, epochs, training seconds, attack preparation seconds)."""
    command = ["fit", *config_args(args), *overrides]
    print("train.py", " ".join(command), flush=True)
    start = time.perf_counter()
    cli = train.main(command)
    data, model = cli.datamodule, cli.model
    audit = audit_callback(cli)
    total = time.perf_counter() - start
    audit_s = audit.result.metrics["total_s"] if audit is not None and audit.result is not None else 0.0
    correction_s = correction_seconds(audit.correction) if audit is not None else 0.0
    train_s = total - audit_s - correction_s
    cli.victim_metrics = {**evaluate(model, data), "epochs": cli.trainer.max_epochs, "train_s": train_s}
    torch.save({"state_dict": model.state_dict(), "metrics": cli.victim_metrics}, victim_path(args))
    return cli


def load_victim(args: argparse.Namespace) -> train.DeltaInfluenceCLI:
    """The victim an earlier benchmark saved for the same settings (its model, data and trainer as configured), else
    a newly trained one."""
    path = victim_path(args)
    if not path.exists():
        return train_victim(args)
    cli = configured(args)
    saved = torch.load(path)
    cli.model.load_state_dict(saved["state_dict"])
    cli.victim_metrics = saved["metrics"]
    return cli


def configured(args: argparse.Namespace) -> train.DeltaInfluenceCLI:
    """The benchmark's config as set (model, data, trainer, audit), without training; its data prepared."""
    cli = train.main(config_args(args), run=False)
    cli.datamodule.prepare_data()
    cli.datamodule.setup("fit")
    return cli


def corrective_fit(cli: train.DeltaInfluenceCLI, out_dir: Path, method: Unlearning) -> LightningCorrectiveFit:
    """The config's corrective fit by ``method``, without validation passes or progress bars (a table needs
    neither)."""
    fit = LightningCorrectiveFit.of(cli.datamodule, cli.trainer, out_dir, method)
    fit.settings = dataclasses.replace(fit.settings, val_dataloaders=None, progress_bar=False)
    return fit


def corrective_reports(correction: Optional[CorrectionResult]) -> list[FitReport]:
    """Every corrective fit's report of a correction (its rounds, and the second opinion's fit when there was one)."""
    if correction is None:
        return []
    fits = [r.corrected.report for r in correction.rounds]
    opinion = correction.second_opinion
    return fits + ([opinion.fit.corrected.report] if opinion is not None and opinion.fit is not None else [])


def correction_seconds(correction: Optional[CorrectionResult]) -> float:
    """What a correction took: its fits, and the audits of its later rounds."""
    if correction is None:
        return 0.0
    later = sum(r.audit.metrics["total_s"] for r in correction.rounds[1:])
    return later + sum(fit.time_s for fit in corrective_reports(correction))


def audit_callback(cli: train.DeltaInfluenceCLI) -> Optional[InfluenceCollapseCallback]:
    """The config's audit callback."""
    return next((c for c in cli.trainer.callbacks if isinstance(c, InfluenceCollapseCallback)), None)


def evaluate(model: torch.nn.Module, data) -> dict[str, float]:
    """Clean accuracy and ASR of ``model`` on the data module's test sets."""
    return {"clean_acc": accuracy(model, data.test_set), "asr": accuracy(model, data.attack_test_set)}


def epoch_seconds(cli: train.DeltaInfluenceCLI) -> float:
    """One training epoch of the victim's recipe on this machine, now: a copy of the configured model trained for one
    epoch's steps with the config's data loader and optimiser, without validation, logging or checkpoints. The unit
    in which the audit's cost is given, measured in the same run as the audit rather than read from the victim's
    training, which ran at another time and load."""
    model = copy.deepcopy(cli.model)
    data = cli.datamodule
    trainer = pl.Trainer(
        accelerator="auto", devices=1, max_epochs=cli.trainer.max_epochs, max_steps=len(data.train_dataloader()),
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=data.train_dataloader())
    return time.perf_counter() - start


def every_sample_audit(model, data, settings, output: Path, factors: str, choice) -> AuditResult:
    """The audit's rule (``settings``, without its verification) on every training sample's scores (``score_all``), on
    the same factors, published as ``<output>_every_sample``: the paper's rule's answer (collapse alone) and the raw
    influence ranking."""
    every = dataclasses.replace(settings, score_all=True, verification=None)
    return run_audit(model, AuditData.of(data), every, f"{output}_every_sample", factors, choice)


def newest(name: str, first: str) -> Path:
    """The newest published ``results/<name>`` (a rerun publishes ``<name>-2``, ... beside it, never over it); else
    stops, naming the command to run ``first``."""
    saved = sorted([*RESULTS.glob(name), *RESULTS.glob(f"{name}-*")], key=lambda path: path.stat().st_mtime)
    if not saved:
        raise SystemExit(f"No {RESULTS / name}: run {first} first.")
    return saved[-1]


def victim_path(args: argparse.Namespace) -> Path:
    """Where the victim of these settings is saved: named by the config, its overrides and seed."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"victim_{config_of(args).stem}{run_tag(args)}.pt"


def report(name: str, rows: list[dict], columns: list[str]) -> None:
    """Prints ``rows`` as a table and writes them to ``results/<name>.json``."""
    print_table(rows, columns)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"device": _device(), "rows": rows}, indent=2))
    print(f"\nwritten to {path}")


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Prints ``rows`` as a plain-text table of ``columns`` (a list value as its items)."""
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-|-".join("-" * widths[c] for c in columns))
    for row in rows:
        print(" | ".join(_fmt(row.get(c)).ljust(widths[c]) for c in columns))


def _fmt(value) -> str:
    if isinstance(value, list):
        return " ".join(f"{item:.3g}" for item in value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _device() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
