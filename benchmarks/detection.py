"""Δ-Influence on the CPU CIFAR-10 setting: detection quality against the true poisons, and stage times.

python benchmarks/detection.py                  # small CNN, 1,000 images per class, 250 BadNets poisons, 15 epochs
python benchmarks/detection.py --attack smooth  # the same with the Smooth Trigger (250 poisons, magnitude 0.2)

One audit, one scoring pass; both decision rules are read off the same scores: the reference rule (collapse alone,
as in the paper) and the project's default (collapse plus the clean-class contrast).
"""

import tempfile

from common import RESULTS, cifar_datamodule, parse_args, report, run_tag, train_victim

from callbacks import InfluenceCollapseCallback
from delta_influence import detection_metrics


def main() -> None:
    args = parse_args(__doc__)
    data = cifar_datamodule(args)
    with tempfile.TemporaryDirectory() as factors:  # fresh factors, so that their cost is measured
        audit = InfluenceCollapseCallback(
            num_transforms=50, threshold=0.0, tolerance=2, factors_dir=factors, train_batch_size=256,
            output_dir=str(RESULTS / f"detection_audit_{args.attack}{run_tag(args)}"),
        )  # fmt: skip
        _, victim = train_victim(args, data, callbacks=[audit])
    result = audit.result
    generation = data.attack_info  # the smooth trigger's surrogate and generation times, as recorded when made
    decision, timings = result.audit.decision, result.metrics
    rows = []
    for rule, flagged in (("reference rule", decision.collapsed), ("with contrast", decision.flagged)):
        m = detection_metrics(flagged, len(data.eval_train_set), data.poison_indices)
        rows.append(
            {
                "attack": args.attack,
                "rule": rule,
                "clean_acc": victim["clean_acc"],
                "asr": victim["asr"],
                "flagged": int(m["flagged"]),
                "poisons_found": round(m["recall"] * len(data.poison_indices)),
                "precision": m["precision"],
                "recall": m["recall"],
                "f1": m["f1"],
                "raw_topk_recall": timings["raw_topk_recall"],
                "attack_prep_s": data.prepare_seconds,
                **generation,
                "train_s": victim["train_s"],
                "factors_s": timings["factors_s"],
                "scores_s": timings["scores_s"],
                "audit_s": timings["total_s"],
            }
        )
    report(f"detection_{args.attack}{run_tag(args)}", rows, list(rows[0]))
    print(f"audit folder: {result.output_dir}")


if __name__ == "__main__":
    main()
