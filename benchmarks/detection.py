"""Δ-Influence on the CPU CIFAR-10 setting: detection quality against the true poisons, and stage times.

python benchmarks/detection.py      # small CNN, 1,000 images per class, 250 BadNets poisons, 15 epochs
"""

import tempfile

from common import RESULTS, cifar_datamodule, parse_args, report, train_victim

from callbacks import InfluenceCollapseCallback


def main() -> None:
    args = parse_args(__doc__)
    data = cifar_datamodule(args)
    with tempfile.TemporaryDirectory() as factors:  # fresh factors, so that their cost is measured
        audit = InfluenceCollapseCallback(
            num_transforms=50, threshold=0.0, tolerance=2, output_dir=str(RESULTS / "detection_audit"),
            factors_dir=factors, train_batch_size=256,
        )  # fmt: skip
        _, victim = train_victim(args, data, callbacks=[audit])
    m = audit.result.metrics
    row = {
        "clean_acc": victim["clean_acc"],
        "asr": victim["asr"],
        "flagged": int(m["flagged"]),
        "poisons_found": round(m["recall"] * len(data.poison_indices)),
        "precision": m["precision"],
        "recall": m["recall"],
        "f1": m["f1"],
        "raw_topk_recall": m["raw_topk_recall"],
        "train_s": victim["train_s"],
        "factors_s": m["factors_s"],
        "scores_s": m["scores_s"],
        "audit_s": m["total_s"],
    }
    report("detection", [row], list(row))


if __name__ == "__main__":
    main()
