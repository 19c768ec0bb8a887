"""Δ-Influence's decision rules on clean-label poisons, read off the audits that witches_brew.py saved: for every
successful brew, the reference rule, the clean-class contrast at several ratios, the same-label filter alone, and the
contrast with the support floor at several shares (the verification stage is not applied here).

    python benchmarks/witches_brew.py        # first: brews, victims, audits (results/witches_brew_audit_<n>...)
    python benchmarks/witches_brew_rules.py  # then this table from every sample's saved scores; nothing computed again

Witches' Brew's poisons are images of the intended class with their true labels, so the contrast (clean test images
of that class) also sees them support ordinary members of their class; this shows what each step keeps of them. The
poisons of each pair are recomputed from the attack's settings (the same draw the attack makes). The support floor
catches them by what they do not do: they support the clean images of their class far less than its other members.
"""

import json

import torch
from common import RESULTS, config_args, newest, parse_args, report
from witches_brew import CONFIG

import train
from delta_influence import detection_metrics, flag_collapsed

COLUMNS = ["rule", "pairs", "flagged", "precision", "recall", "recalls"]


def main() -> None:
    args = parse_args(
        __doc__,
        [
            ("--ratios", str, "2,1,0.5,0", "contrast ratios to try"),
            ("--floors", str, "0.03,0.04,0.045,0.05,0.075", "support floors to try with the contrast ratio 2"),
        ],
    )
    rows = [row for row in json.loads((RESULTS / "witches_brew.json").read_text())["rows"] if row["success"]]
    if not rows:
        raise SystemExit("No successful brew in results/witches_brew.json: run benchmarks/witches_brew.py first.")
    command = config_args(args, CONFIG)
    attack = train.main(command, run=False).datamodule.attack
    clean = train.main([*command, "--data.attack=null"], run=False).datamodule
    clean.setup("fit")
    labels = clean.eval_train_set.labels
    rules = {"reference (collapse only)": lambda collapsed, same, s0, c: collapsed,
             "collapse + same label": lambda collapsed, same, s0, c: collapsed & same}  # fmt: skip
    for ratio in (float(r) for r in args.ratios.split(",")):
        rules[f"collapse + same label + contrast {ratio:g}"] = lambda collapsed, same, s0, c, ratio=ratio: (
            collapsed & same & (s0 > ratio * c.abs())
        )
    for floor in (float(f) for f in args.floors.split(",")):
        rules[f"collapse + same label + contrast 2 + support floor {floor:g}"] = floor
    results = {name: [] for name in rules}
    for row in rows:
        audit = newest(f"witches_brew_audit_{row['pair']}_every_sample", "benchmarks/witches_brew.py")
        scores, evidence = torch.load(audit / "scores.pt"), torch.load(audit / "contrast.pt")
        summary = json.loads((audit / "summary.json").read_text())
        brew = attack.__class__(**{**vars(attack), "intended": row["intended"], "target": (row["target"],)})
        (poisons,) = brew.poison_sets(labels, 1)
        collapsed = torch.zeros(len(labels), dtype=torch.bool)
        collapsed[evidence["collapsed"]] = True
        for name, rule in rules.items():
            if isinstance(rule, float):  # the library's rule itself, with the audit's settings and a support floor
                flagged = flag_collapsed(
                    scores, summary["threshold"], summary["tolerance"], summary["num_contrast"], 2.0,
                    evidence["same_label"], summary["contrast_statistic"], support_floor=rule,
                ).flagged  # fmt: skip
            else:
                flagged = torch.nonzero(rule(collapsed, evidence["same_label"], scores[0], evidence["contrast"]))
                flagged = flagged.flatten()
            results[name].append(detection_metrics(flagged, len(labels), poisons))
    table = []
    for name, found in results.items():
        table.append({"rule": name, "pairs": len(found), "flagged": sum(m["flagged"] for m in found) / len(found),
                      "precision": sum(m["precision"] for m in found) / len(found),
                      "recall": sum(m["recall"] for m in found) / len(found),
                      "recalls": [round(m["recall"], 3) for m in found]})  # fmt: skip
    report("witches_brew_rules", table, COLUMNS)


if __name__ == "__main__":
    main()
