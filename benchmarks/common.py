"""Shared set-up of the CPU CIFAR-10 benchmarks: extract the JPEG tree, poison it, train the small CNN."""

import argparse
import json
import tarfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from datamodules import PoisonedDataModule
from delta_influence.attacks import Attack, BadNets, SmoothTrigger
from lightning_modules import PoisonClassifier

ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CACHE = Path(__file__).resolve().parent / "results" / "cache"
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(description: str, extra: list[tuple] = ()) -> argparse.Namespace:
    """The shared options, plus ``extra`` (flag, type, default, help) ones."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=ARCHIVE, help="cifar10-jpeg.tar.gz (image-folder tree)")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the tree is extracted once")
    parser.add_argument("--per-class", type=int, default=1000, help="training images per class")
    parser.add_argument("--attack", choices=["badnets", "smooth"], default="badnets", help="the attack, ship -> dog")
    parser.add_argument("--poisons", type=int, default=250, help="poisons (ships relabelled as dogs)")
    parser.add_argument("--magnitude", type=float, default=0.2, help="smooth trigger's range in [0, 1] pixel units")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--crop-padding", type=int, default=0, help="random-crop padding; 0: no cropping")
    parser.add_argument("--flip", action="store_true", help="random horizontal flips")
    parser.add_argument("--seed", type=int, default=0)
    for flag, kind, default, text in extra:
        parser.add_argument(flag, type=kind, default=default, help=text)
    return parser.parse_args()


def extract(archive: Path, cache: Path) -> Path:
    """Extracts the archive once; returns the tree's root (holding train/ and test/)."""
    root = cache / "cifar10"
    if not (root / "train").is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(cache, filter="data")
    return root


def attack(args: argparse.Namespace) -> Attack:
    """The benchmark's attack: ships (8) relabelled as dogs (5)."""
    if args.attack == "smooth":
        return SmoothTrigger(victim=8, target=5, num_poisons=args.poisons, magnitude=args.magnitude)
    return BadNets(victim=8, target=5, num_poisons=args.poisons)


def cifar_datamodule(args: argparse.Namespace) -> PoisonedDataModule:
    """The poisoned CIFAR-10 subset; ``data.prepare_seconds`` is how long the attack's preparation took (a smooth
    trigger's surrogate and perturbation, when not cached yet under results/attack_cache)."""
    data = PoisonedDataModule(
        dataset="folder",
        root=str(extract(args.archive, args.cache)),
        attack=attack(args),
        per_class=args.per_class,
        batch_size=128,
        crop_padding=args.crop_padding,
        flip=args.flip,
        seed=args.seed,
        cache_dir=str(RESULTS / "attack_cache"),
    )
    start = time.perf_counter()
    data.prepare_data()
    data.prepare_seconds = time.perf_counter() - start
    data.setup()
    return data


def small_cnn(data: PoisonedDataModule, epochs: int) -> PoisonClassifier:
    """The small CNN with a step schedule scaled to ``epochs``."""
    return PoisonClassifier(
        arch="small_cnn",
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        lr=0.05,
        milestones=[int(epochs * 0.6), int(epochs * 0.85)],
    )


def trainer(epochs: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def evaluate(model: pl.LightningModule, data: PoisonedDataModule) -> dict[str, float]:
    """Clean accuracy and ASR of ``model`` on the data module's test sets."""
    results = trainer(1).validate(model, dataloaders=data.val_dataloader(), verbose=False)
    merged = {key: value for result in results for key, value in result.items()}
    return {"clean_acc": merged["val/acc"], "asr": merged["val/asr"]}


def train_victim(args: argparse.Namespace, data: PoisonedDataModule, callbacks=()) -> tuple[PoisonClassifier, dict]:
    """Trains the small CNN on the poisoned set; returns it with clean accuracy, ASR and wall time. The victim is
    saved under results/ so that the other benchmarks audit the same model."""
    pl.seed_everything(args.seed, verbose=False)
    model = small_cnn(data, args.epochs)
    start = time.perf_counter()
    run = trainer(args.epochs, callbacks=list(callbacks), num_sanity_val_steps=0, check_val_every_n_epoch=args.epochs)
    run.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    metrics = {**evaluate(model, data), "epochs": args.epochs, "train_s": seconds}
    torch.save({"state_dict": model.state_dict(), "metrics": metrics}, victim_path(args))
    return model, metrics


def load_victim(args: argparse.Namespace, data: PoisonedDataModule) -> tuple[PoisonClassifier, dict]:
    """The victim saved by an earlier benchmark with the same settings, else a newly trained one."""
    path = victim_path(args)
    if not path.exists():
        return train_victim(args, data)
    saved = torch.load(path)
    model = small_cnn(data, args.epochs)
    model.load_state_dict(saved["state_dict"])
    return model, saved["metrics"]


def run_tag(args: argparse.Namespace) -> str:
    """What keeps a seed's results apart: nothing for seed 0 (the README's tables), else ``_s<seed>``."""
    return f"_s{args.seed}" if args.seed else ""


def victim_path(args: argparse.Namespace) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    attack = "" if args.attack == "badnets" else f"{args.attack}{args.magnitude:g}_"
    flags = (
        f"{attack}{args.per_class}pc_{args.poisons}p_{args.epochs}e_crop{args.crop_padding}_flip{int(args.flip)}"
        f"_s{args.seed}"
    )
    return RESULTS / f"victim_{flags}.pt"


def report(name: str, rows: list[dict], columns: list[str]) -> None:
    """Prints ``rows`` as a table and writes them to ``results/<name>.json``."""
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-|-".join("-" * widths[c] for c in columns))
    for row in rows:
        print(" | ".join(_fmt(row.get(c)).ljust(widths[c]) for c in columns))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"device": _device(), "rows": rows}, indent=2))
    print(f"\nwritten to {path}")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _device() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
