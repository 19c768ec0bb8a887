"""The contrast's settings read off saved audits: detection F1 at each ratio, with and without the same-label
filter, on victims of seeds other than the README's tables.

    python benchmarks/detection.py --seed 1                  # first: the held-out victims and their audits
    python benchmarks/detection.py --attack smooth --seed 1
    python benchmarks/contrast_ratio.py                      # --runs badnets:1,smooth:1 by default

The rule is applied to the scores of every sample that each detection.py run saved (``..._every_sample``, its
collapse settings from its summary.json), so no influence is computed again. The defaults are chosen on these
held-out victims; the README's tables (seed 0) then measure them.
The last rows add the support floor (``--floors``) to the default ratio; ``floor`` None is the ratio alone.
"""

import argparse
import json

import torch
from common import configured, newest, parse_args, report, run_tag

from delta_influence import detection_metrics, flag_collapsed


def main() -> None:
    args = parse_args(
        __doc__,
        [
            ("--runs", str, "badnets:1,smooth:1", "attack:seed pairs whose detection.py audits are read"),
            ("--ratios", str, "1,1.5,2,2.5,3,4,5,6,8", "contrast ratios to try"),
            ("--floors", str, "0.03,0.04,0.045,0.05,0.075,0.1", "support floors to try (same label, ratio 2)"),
        ],
    )
    ratios = [float(r) for r in args.ratios.split(",")]
    rows = [{"same_label": same, "ratio": ratio, "floor": None} for same in (True, False) for ratio in ratios]
    rows += [{"same_label": True, "ratio": 2.0, "floor": float(floor)} for floor in args.floors.split(",")]
    for run in args.runs.split(","):
        attack, seed = run.split(":")
        settings = argparse.Namespace(**{**vars(args), "attack": attack, "seed": int(seed)})
        audit = newest(f"detection_audit_{attack}{run_tag(settings)}_every_sample",
                       f"benchmarks/detection.py --attack {attack} --seed {seed}")  # fmt: skip
        summary = json.loads((audit / "summary.json").read_text())
        scores = torch.load(audit / "scores.pt")
        data = configured(settings).datamodule
        same_label = data.eval_train_set.labels == summary["query_label"]
        for row in rows:
            decision = flag_collapsed(
                scores, summary["threshold"], summary["tolerance"], summary["num_contrast"], row["ratio"],
                same_label if row["same_label"] else None, support_floor=row["floor"],
            )  # fmt: skip
            metrics = detection_metrics(decision.flagged, scores.shape[1], data.poison_indices)
            row[f"{run} flagged"] = int(metrics["flagged"])
            row[f"{run} F1"] = metrics["f1"]
    for row in rows:
        f1s = [value for key, value in row.items() if key.endswith(" F1")]
        row["mean F1"] = sum(f1s) / len(f1s)
    report(f"contrast_ratio_{args.runs.replace(':', '_s').replace(',', '_')}", rows, list(rows[0]))
    best = max(rows, key=lambda row: row["mean F1"])
    setting = f"same_label={best['same_label']}, contrast_ratio={best['ratio']:g}, support_floor={best['floor']}"
    print(f"highest mean F1: {setting} ({100 * best['mean F1']:.1f} %)")


if __name__ == "__main__":
    main()
