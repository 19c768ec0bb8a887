"""Corrective fits on the CPU CIFAR-10 setting: the five methods on Δ-Influence's flagged set, retraining on the
retained set of each decision rule, and for contrast retraining without the true poisons and without a random set of
the flagged set's size.

    python benchmarks/detection.py     # first: trains the victim and flags samples (both rules, one audit)
    python benchmarks/unlearning.py
"""

import sys

import torch
from common import RESULTS, corrective_fit, load_victim, parse_args, report, run_tag

from lightning_modules.unlearning import SCRUB, SSD, BadTeacher, FineTune, Retrain


def main() -> None:
    args = parse_args(__doc__)
    audit = RESULTS / f"detection_audit_{args.attack}{run_tag(args)}"
    if not (audit / "contrast.pt").exists():
        sys.exit(f"No audit in {audit}: run benchmarks/detection.py --attack {args.attack} --seed {args.seed} first.")
    flagged = torch.load(audit / "flagged.pt")  # the default rule: collapse plus clean-class contrast
    reference = torch.load(audit / "contrast.pt")["collapsed"]  # the reference rule on the same scores
    cli = load_victim(args)
    data, victim, metrics = cli.datamodule, cli.model, cli.victim_metrics
    fit = corrective_fit(cli, RESULTS / "unlearn")
    generator = torch.Generator().manual_seed(args.seed)
    random_set = torch.randperm(len(data.eval_train_set), generator=generator)[: len(flagged)].sort().values
    runs = [
        ("Δ-Influence, with contrast", flagged, Retrain(seed=args.seed)),
        ("Δ-Influence, with contrast", flagged, FineTune()),
        ("Δ-Influence, with contrast", flagged, SSD()),
        ("Δ-Influence, with contrast", flagged, SCRUB()),
        ("Δ-Influence, with contrast", flagged, BadTeacher(seed=args.seed)),
        ("Δ-Influence, reference rule", reference, Retrain(seed=args.seed)),
        ("true poisons", data.poison_indices, Retrain(seed=args.seed)),
        ("random, flagged size", random_set, Retrain(seed=args.seed)),
    ]
    rows = [{"forget": "nothing (victim)", "method": "-", "removed": 0, "clean_acc": metrics["clean_acc"],
             "asr": metrics["asr"], "time_s": metrics["train_s"]}]  # fmt: skip
    for forget, indices, method in runs:
        torch.manual_seed(args.seed)
        result = fit.run(victim, method, indices)
        rows.append({"forget": forget, "method": method.name, "removed": len(indices), "clean_acc": result["acc"],
                     "asr": result["asr"], "time_s": result["time_s"]})  # fmt: skip
        print(rows[-1], flush=True)
    columns = ["forget", "method", "removed", "clean_acc", "asr", "time_s"]
    report(f"unlearning_{args.attack}{run_tag(args)}", rows, columns)


if __name__ == "__main__":
    main()
