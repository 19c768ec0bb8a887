"""The Δ-Influence paper's CIFAR-10 BadNets setting, end to end on every GPU of the machine, as one table.

    python benchmarks/paper_setting.py --data.root data               # attack -> 40-epoch ResNet-18 -> audit -> retrain
    python benchmarks/paper_setting.py --data.root data --trainer.devices 1   # on one GPU
    python benchmarks/paper_setting.py --tiny --data.root <cifar-10>  # the same chain in about a minute on a CPU

Runs ``train.py fit --config configs/cifar10_badnets.yaml`` (any further ``--key value`` overrides go to it) and
prints the victim's clean accuracy and ASR, what the audit flagged (precision and recall against the true poisons),
the retrained model's clean accuracy and ASR, and how long each stage took, the audit's per pass (covariance,
eigendecomposition, eigen-corrections, scores, verification) and in epochs of the run; the table is also written as
JSON next to the run's other files (``<run folder>/paper_setting.json``, with every process's seconds of each pass).
With several GPUs and no ``--trainer.devices`` given, it runs on all of them under DDP (training, the audit's passes
split by data partition, the retrain), as ``train.py fit ... --trainer.strategy ddp --trainer.devices <all>`` does;
Lightning starts this script once more per extra device. ``--tiny`` shrinks the run to check that the chain works
(20 images per class, 10 poisons, the small CNN, 2 epochs, 8 transformed copies, the audit on the first attacked test
image even if the attack has not taken hold), not to measure it.
"""

import json
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import AUDIT_STAGES, correction_seconds  # noqa: E402  (this script's folder)

from delta_influence.callbacks import InfluenceCollapseCallback  # noqa: E402
from delta_influence.cli import run_command, train  # noqa: E402

TINY = [
    "--data.per_class", "20", "--data.attack.init_args.num_poisons", "10", "--model.arch", "small_cnn",
    "--trainer.max_epochs", "2", "--data.num_workers", "0", "--detector.num_workers", "0",
    "--detector.num_transforms", "8", "--detector.tolerance", "1", "--detector.num_contrast", "0",
    "--detector.verification", "null", "--delta_influence.query_index", "0",
    "--delta_influence.require_misclassified", "false", "--trainer.enable_progress_bar", "false",
]  # fmt: skip


def main(args: list[str]) -> dict:
    """Runs the setting with ``args`` (``--tiny`` and overrides); prints and returns the table (on the global rank 0;
    the other processes of a multi-device run return an empty one)."""
    overrides = [arg for arg in args if arg != "--tiny"]
    command = ["fit", "--config", str(ROOT / "configs" / "cifar10_badnets.yaml")]
    command += (TINY if "--tiny" in args else []) + every_device(overrides) + overrides
    start = time.perf_counter()
    cli = train.main(command)
    total = time.perf_counter() - start
    if not cli.trainer.is_global_zero:
        return {}
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, InfluenceCollapseCallback)]
    audit, correction = callback.result.metrics, callback.correction
    final = correction.final.corrected.report if correction is not None else None
    table = {
        "victim_clean_acc": final.before_acc if final else None,
        "victim_asr": final.before_asr if final else None,
        "flagged": int(audit["flagged"]),
        "precision": audit.get("precision"),
        "recall": audit.get("recall"),
        "retrained_clean_acc": final.acc if final else None,
        "retrained_asr": final.asr if final else None,
        "rounds": len(correction.rounds) if correction is not None else 0,
        "attack_and_training_s": total - audit["total_s"] - correction_seconds(correction),
        "audit_s": audit["total_s"],
        "retrain_s": correction_seconds(correction) if correction is not None else None,
        "total_s": total,
        **{f"audit_{stage}_s": audit.get(f"{stage}_s") for stage in AUDIT_STAGES},
        "audit_epochs": audit.get("total_epochs"),
        "audit_process_s": callback.result.summary.get("process_timings", {}),
        "device": str(cli.trainer.strategy.root_device),
        "devices": cli.trainer.world_size,
        "run": str(callback.result.output_dir.parent),
    }
    (callback.result.output_dir.parent / "paper_setting.json").write_text(json.dumps(table, indent=2))
    print(_render(table))
    return table


def _render(table: dict) -> str:
    def pct(value) -> str:
        return "n/a" if value is None else f"{100 * value:.1f} %"

    epochs = "" if table["audit_epochs"] is None else f" ({table['audit_epochs']:.1f} epochs of training)"
    passes = ", ".join(
        f"{stage} {table[f'audit_{stage}_s']:.0f} s" for stage in AUDIT_STAGES if table[f"audit_{stage}_s"] is not None
    )
    rows = [
        ("victim clean accuracy / ASR", f"{pct(table['victim_clean_acc'])} / {pct(table['victim_asr'])}"),
        ("flagged (precision, recall)", f"{table['flagged']} ({pct(table['precision'])}, {pct(table['recall'])})"),
        ("retrained clean accuracy / ASR", f"{pct(table['retrained_clean_acc'])} / {pct(table['retrained_asr'])}"),
        ("attack + victim training", f"{table['attack_and_training_s']:.0f} s"),
        ("audit (factors + scores + verification)", f"{table['audit_s']:.0f} s{epochs}"),
        ("  per pass", passes),
        (
            "correction (fits, later audits)",
            "n/a" if table["retrain_s"] is None else f"{table['retrain_s']:.0f} s ({table['rounds']} round(s))",
        ),
        ("total", f"{table['total_s']:.0f} s on {table['devices']} x {table['device']}"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'stage'.ljust(width)} | result |", f"|{'-' * (width + 2)}|--------|"]
    return "\n".join(lines + [f"| {name.ljust(width)} | {value} |" for name, value in rows])


def every_device(overrides: list[str]) -> list[str]:
    """DDP over every GPU when there are several and the overrides choose no devices, strategy or accelerator."""
    count = torch.cuda.device_count()
    chosen = ("--trainer.devices", "--trainer.strategy", "--trainer.accelerator")
    if count < 2 or any(arg.split("=")[0] in chosen for arg in overrides):
        return []
    return ["--trainer.devices", str(count), "--trainer.strategy", "ddp"]


if __name__ == "__main__":
    # LightningCLI gets the arguments as ``args``; sys.argv keeps them, because under DDP Lightning starts this
    # script again, with the same command line, for every further device
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
    run_command(lambda: main(sys.argv[1:]))
