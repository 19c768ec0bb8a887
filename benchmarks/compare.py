"""Every detector on one victim, each followed by retraining from scratch on what it keeps: one table per attack.

    python benchmarks/compare.py                  # BadNets on the CPU CIFAR-10 setting (small CNN, 1,000 per class)
    python benchmarks/compare.py --attack smooth  # the Smooth Trigger
    python benchmarks/compare.py --only "AGPD, SCAn"  # these rows alone, added to (or rerun in) compare_<attack>.json
    python benchmarks/witches_brew.py --only 0,1,2,6 --compare all  # Witches' Brew: one victim per target

Reuses the victim that benchmarks/detection.py saved for the same settings (else trains it, through train.py on the
config of configs/benchmarks/). Every detector runs through the audit pipeline (its folder under
results/compare_<attack>/), and every retrain is the config's own corrective fit. The influence detectors share one
factor fit (Δ-Influence fits them, the threshold baselines reuse them, so their time is the
scoring pass alone). Detectors that read clean images draw them from the test set the same way
(``delta_influence.detectors.clean_sample``: an equal seeded share of each label); the ``clean images`` column says
how many each reads. The table is printed, written as JSON and markdown under benchmarks/results/, and logged as the
W&B table ``compare/<attack>`` (offline unless a W&B key is configured).
"""

import json
import os
import tempfile
from dataclasses import replace
from typing import Optional

import torch
import wandb
from common import RESULTS, config_args, corrective_fit, load_victim, parse_args, report, run_tag

from delta_influence.audit import AuditData, QueryChoice, run_audit
from delta_influence.detectors import (
    AGPD,
    ASSET,
    ActivationClustering,
    CognitiveDistillation,
    DeltaInfluence,
    FrequencyAnalysis,
    InfluenceThreshold,
    Oracle,
    RandomSubset,
    SCAn,
    SpectralSignatures,
)
from delta_influence.lightning_modules.unlearning import Retrain

HEADERS = {"seed": "seed", "target": "target", "intended": "intended", "detector": "detector",
           "clean_used": "clean images", "flagged": "flagged", "precision": "precision", "recall": "recall", "f1": "F1",
           "detect_s": "detection (s)", "clean_acc": "clean acc after", "asr": "ASR after"}  # fmt: skip
COLUMNS = ["detector", "clean_used", "flagged", "precision", "recall", "f1", "detect_s", "clean_acc", "asr"]


def main() -> None:
    args = parse_args(
        __doc__,
        [
            ("--frequency-images", int, 2000, "clean images frequency analysis trains on"),
            ("--only", str, "", "comma-separated parts of detector titles: run those rows only, in the table"),
            ("--retrains", int, 1, "retrains per row (seeds seed, seed + 1, ...); the table shows their mean"),
        ],
    )
    cli = load_victim(args)
    data, victim, victim_metrics = cli.datamodule, cli.model, cli.victim_metrics
    every = detectors(data, seed=args.seed, frequency_images=args.frequency_images)
    chosen = pick(every, args.only) if args.only else every
    name = f"compare_{args.attack}{run_tag(args)}"
    table = RESULTS / f"{name}.json"  # --only adds or reruns rows of this table when it exists
    victim_row = {"attack": args.attack, "seed": args.seed, "num_train": len(data.eval_train_set)}
    rows = [{**victim_row, "detector": "none (victim)", "flagged": 0, "clean_acc": victim_metrics["clean_acc"],
             "asr": victim_metrics["asr"]}]  # fmt: skip
    rows = compare(cli, victim, chosen, victim_row, name, range(args.seed, args.seed + args.retrains), rows)
    if args.only and table.exists():  # the other rows as they were, these in their places
        rows = merge(json.loads(table.read_text())["rows"], rows, [title for title, _ in every])
    report(name, rows, COLUMNS)
    (RESULTS / f"{name}.json.partial").unlink()
    text = markdown(rows, f"Attack {args.attack} (train.py {' '.join(config_args(args))})")
    (RESULTS / f"{name}.md").write_text(text)
    print(text)
    log_to_wandb(rows, name.removeprefix("compare_"))


def detectors(data, seed: int, frequency_images: int, delta: Optional[DeltaInfluence] = None) -> list:
    """Every compared detector as (title, detector): today's first, the 2018-2021 baselines after them, the bounds
    last. ``delta``: the Δ-Influence settings the influence rows derive from (default: the defaults; the influence
    baselines take its factor settings, so that all share one factor fit). Spectral signatures' epsilon is the
    poisons' share of the attack's label (capped at its authors' largest, 0.66)."""
    poisons = data.poison_indices
    target = int(data.attack_test_set.labels[0])  # the label the attack wants
    target_share = min(len(poisons) / int((data.eval_train_set.labels == target).sum()), 0.66)
    settings = "default" if delta is None else "the config's settings"
    delta = delta or DeltaInfluence(train_batch_size=256)
    influence = {key: getattr(delta, key) for key in ("strategy", "train_batch_size", "seed", "factor_examples")}
    return [
        (f"Δ-Influence (verified, {settings})", delta),
        ("the Δ-Influence paper's rule (collapse alone)", replace(delta, num_contrast=0, verification=None)),
        ("SCAn (2021)", SCAn()),
        ("AGPD (2025)", AGPD()),
        ("ASSET (2023)", ASSET()),
        ("Cognitive Distillation (2023)", CognitiveDistillation()),
        ("Δ-Influence (contrast rule, unverified)", replace(delta, verification=None)),
        ("influence threshold (> 10)", InfluenceThreshold(threshold=10.0, **influence)),
        (f"influence top-k (k = {len(poisons)})", InfluenceThreshold(top_k=len(poisons), **influence)),
        ("activation clustering (2018)", ActivationClustering()),
        (f"spectral signatures (2018, eps = {target_share:.2f})", SpectralSignatures(expected_fraction=target_share)),
        ("frequency analysis (2021)", FrequencyAnalysis(epochs=6, max_images=frequency_images)),
        ("oracle: true poisons", Oracle()),
        ("random, as many as the poisons", RandomSubset(seed=seed)),
    ]


def pick(chosen: list, only: str) -> list:
    """The detectors whose titles contain one of the comma-separated parts of ``only``; stops when none does."""
    wanted = [part.strip() for part in only.split(",")]
    picked = [(title, detector) for title, detector in chosen if any(part in title for part in wanted)]
    if not picked:
        raise SystemExit(f"--only {only!r} matches no detector; titles: {', '.join(title for title, _ in chosen)}")
    return picked


def merge(earlier: list[dict], rows: list[dict], titles: list[str]) -> list[dict]:
    """``earlier`` with ``rows`` in the places of the rows of the same victim (seed) and detector, the others added;
    each victim's rows in the order of ``titles``, its own row first.

    Example:
        >>> old = [{"seed": 0, "detector": "none (victim)"}, {"seed": 0, "detector": "b", "f1": 0.5}]
        >>> new = merge(old, [{"seed": 0, "detector": "a"}, {"seed": 0, "detector": "b", "f1": 0.7}], ["a", "b"])
        >>> [(row["detector"], row.get("f1")) for row in new]
        [('none (victim)', None), ('a', None), ('b', 0.7)]
    """
    fresh = {(row["seed"], row["detector"]): row for row in rows}
    merged = [fresh.pop((row["seed"], row["detector"]), row) for row in earlier] + list(fresh.values())
    rank = {title: place for place, title in enumerate(["none (victim)", *titles])}
    return sorted(merged, key=lambda row: (row["seed"], rank.get(row["detector"], len(rank))))


def compare(cli, victim, chosen: list, victim_row: dict, name: str, seeds, rows: list, choice=QueryChoice()) -> list:
    """``rows`` and, for each chosen detector, its audit of ``victim`` followed by the config's retrain without its
    set (from each of ``seeds``: the row has their mean), written to results/<name>.json.partial as each finishes.
    The influence detectors share one fresh factor fit, so that its cost is measured once."""
    data = cli.datamodule
    rows = list(rows)
    with tempfile.TemporaryDirectory() as factors:
        for title, detector in chosen:
            folder = RESULTS / name / detector.name
            result = run_audit(victim, AuditData.of(data), detector, folder, factors, choice)
            metrics = result.metrics
            row = {**victim_row, "detector": title, "clean_used": clean_used(detector), "flagged": len(result.flagged),
                   "precision": metrics["precision"], "recall": metrics["recall"], "f1": metrics["f1"],
                   "detect_s": metrics["total_s"],
                   "audit_dir": str(result.output_dir.relative_to(RESULTS))}  # fmt: skip
            retrains = []
            for seed in seeds:
                torch.manual_seed(seed)
                retrain = corrective_fit(cli, RESULTS / "compare_unlearn", Retrain(seed=seed))
                retrained = retrain.run(victim, result.flagged, str(result.output_dir))
                if retrained is not None:
                    retrains.append((retrained.report.acc, retrained.report.asr))
            if retrains:
                accs, asrs = zip(*retrains)
                row |= {"clean_acc": sum(accs) / len(accs), "asr": sum(asrs) / len(asrs)}
                row |= {"retrain_clean_accs": list(accs), "retrain_asrs": list(asrs)}
            rows.append(row)
            print(row, flush=True)
            (RESULTS / f"{name}.json.partial").write_text(json.dumps(rows, indent=2))  # the rows so far
    return rows


def clean_used(detector) -> int:
    """How many clean held-out images the detector reads: its contrast images, the images it draws, or those it
    trains on."""
    for setting in ("num_contrast", "clean_images", "max_images"):
        if getattr(detector, setting, 0):
            return int(getattr(detector, setting))
    return 0


def markdown(rows: list[dict], title: str, columns: list[str] = COLUMNS) -> str:
    """The table as markdown, for the README."""

    def cell(row: dict, column: str) -> str:
        value = row.get(column)
        if value is None:
            return "-"
        if column in ("clean_acc", "asr") and len(row.get(f"retrain_{column}s", ())) > 1:
            spread = row[f"retrain_{column}s"]
            return f"{100 * value:.1f} % ({100 * min(spread):.1f}–{100 * max(spread):.1f})"
        if column in ("precision", "recall", "f1", "clean_acc", "asr"):
            return f"{100 * value:.1f} %"
        return f"{value:.0f}" if isinstance(value, float) else str(value)

    lines = [
        f"{title}; every retrain from scratch with the victim's recipe (several: their mean, min–max). The first "
        "row of each victim is the victim.",
        "",
        "| " + " | ".join(HEADERS[column] for column in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(cell(row, column) for column in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def log_to_wandb(rows: list[dict], table: str) -> None:
    """The table as a W&B table in a run of its own (offline without a configured key)."""
    if not (os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY")):
        os.environ["WANDB_MODE"] = "offline"
    run = wandb.init(project="delta-influence", name=f"compare-{table}", dir=str(RESULTS), job_type="benchmark")
    wandb_table = wandb.Table(columns=COLUMNS, data=[[row.get(column) for column in COLUMNS] for row in rows])
    run.log({f"compare/{table}": wandb_table})
    run.finish()


if __name__ == "__main__":
    main()
