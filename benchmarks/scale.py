"""How the audit's cost grows with the training set: one victim per size, each stage in seconds and in epochs of that
victim's training, the process's peak memory, and the verified set's precision and recall.

python benchmarks/scale.py                          # BadNets: 500 / 1,000 / 2,500 / 5,000 images per class, 1 % poisons
python benchmarks/scale.py --attack smooth --sizes 500,5000

Every size is the --scale config's victim and recipe (full: configs/benchmarks/cifar10_<attack>_full.yaml) with
``--data.per_class`` set and 1 % of the training set poisoned, trained and audited by ``train.py fit`` in a process of
its own (so that its peak memory is its own), with fresh factors. A second table fits each stage's seconds to
``a * N ** b`` over the sizes: b near 1 is a stage linear in the training set, near 0 one of constant cost.
"""

import json
import math
import resource
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from common import AUDIT_STAGES, audit_callback, parse_args, report, train_victim

from delta_influence.audit import AuditData, run_audit

STAGES = [f"{stage}_s" for stage in AUDIT_STAGES]


def main() -> None:
    args = parse_args(
        __doc__,
        [
            ("--sizes", str, "500,1000,2500,5000", "training images per class, comma-separated"),
            ("--one", str, "", "internal: the JSON file one size's process writes"),
        ],
    )
    if args.one:
        return measure(args)
    rows = []
    for size in [int(size) for size in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "row.json"
            command = [sys.executable, __file__, *_flags(args, size), "--one", str(out)]
            subprocess.run(command, check=True)
            rows += json.loads(out.read_text())
        print(rows[-2:], flush=True)
    columns = ["factors", "num_train", "poisons", "clean_acc", "asr", "epoch_s", *STAGES, "audit_s", "audit_epochs",
               "peak_memory_mb", "flagged", "precision", "recall"]  # fmt: skip
    report(f"scale_{args.attack}_{args.scale}", rows, columns)
    growth = []
    for factors in ("every sample", "default"):
        for stage in [*STAGES, "audit_s", "epoch_s"]:
            points = [
                (math.log(r["num_train"]), math.log(r[stage])) for r in rows if r["factors"] == factors and r[stage]
            ]
            if len(points) > 1:
                growth.append({"attack": args.attack, "factors": factors, "stage": stage, "exponent": _slope(points)})
    report(f"scale_{args.attack}_{args.scale}_growth", growth, ["attack", "factors", "stage", "exponent"])


def measure(args) -> None:
    """One size: the victim trained and audited by the config (its default audit, timed in epochs of this training),
    then audited again with every sample's factors; fresh factors each; both rows written to ``args.one``."""
    with tempfile.TemporaryDirectory() as factors:
        cli = train_victim(args, [f"--delta_influence.factors_dir={factors}", "--delta_influence.unlearning=null"])
    data, callback = cli.datamodule, audit_callback(cli)
    default = callback.result.metrics
    epoch_s = default["total_s"] / default["total_epochs"]
    every = replace(callback.detector, factor_examples=None)
    with tempfile.TemporaryDirectory() as folder:
        result = run_audit(cli.model, AuditData.of(data), every, Path(folder) / "audit", Path(folder) / "factors",
                           callback.choice, epoch_seconds=epoch_s)  # fmt: skip
    rows = []
    for name, detector, metrics in (("default", callback.detector, default), ("every sample", every, result.metrics)):
        rows.append({"factors": name, "factor_examples": detector.factor_examples,
                     "num_train": len(data.eval_train_set),
                     "poisons": len(data.poison_indices), **cli.victim_metrics, "epoch_s": epoch_s,
                     **{stage: metrics.get(stage) for stage in STAGES}, "audit_s": metrics["total_s"],
                     "audit_epochs": metrics["total_epochs"], "flagged": metrics["flagged"],
                     "precision": metrics["precision"], "recall": metrics["recall"]})  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this process's peak (Linux: KiB)
    Path(args.one).write_text(json.dumps([row | {"peak_memory_mb": peak} for row in rows]))


def _flags(args, size: int) -> list[str]:
    """This run's flags for one size: the same attack, seed and scale, ``size`` images per class, 1 % of CIFAR-10's ten
    classes' images poisoned."""
    flags = ["--attack", args.attack, "--seed", str(args.seed), "--scale", args.scale, "--per-class", str(size)]
    return flags + ["--poisons", str(max(1, round(0.01 * size * 10)))]


def _slope(points: list[tuple[float, float]]) -> float:
    """The least-squares slope of log seconds on log N."""
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)


if __name__ == "__main__":
    main()
