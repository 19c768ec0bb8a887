"""Corrective fits on the CPU CIFAR-10 setting: the six methods on (a) Δ-Influence's flagged set (the default rule,
verified) and (b) a random 10 % of the true poisons (the corrective-unlearning setting: most poisons stay in the
retained set), plus a retrain without all the true poisons for reference.

    python benchmarks/detection.py [--attack smooth]    # first: trains the victim and flags samples
    python benchmarks/unlearning.py [--attack smooth]

    python benchmarks/unlearning.py --seed 1 --methods potion   # one method

Per row: clean accuracy, ASR and the clean accuracy on the attacker's label after the fit, the share of test
predictions it changed and its verdict, its time and that time as a share of the retrain's on the same forget set
(when the retrain is among the methods).
"""

import torch
from common import RESULTS, corrective_fit, load_victim, newest, parse_args, report, run_tag

from delta_influence.lightning_modules.unlearning import SCRUB, SSD, BadTeacher, FineTune, Potion, Retrain

METHODS = ("retrain", "finetune", "ssd", "potion", "scrub", "bad_teacher")


def main() -> None:
    args = parse_args(
        __doc__,
        [
            ("--share", float, 0.1, "share of the true poisons in set (b)"),
            ("--methods", str, ",".join(METHODS), "the methods to run, comma-separated"),
        ],
    )
    names = args.methods.split(",")
    if unknown := sorted(set(names) - set(METHODS)):
        raise SystemExit(f"--methods={args.methods}: {', '.join(unknown)} unknown; choose among {', '.join(METHODS)}.")
    # the newest audit of this victim (a rerun of detection.py publishes beside the earlier ones)
    audit = newest(
        f"detection_audit_{args.attack}{run_tag(args)}",
        f"benchmarks/detection.py --attack {args.attack} --seed {args.seed}",
    )
    print(f"Forgetting the flagged set of {audit}", flush=True)
    cli = load_victim(args)
    data, victim, metrics = cli.datamodule, cli.model, cli.victim_metrics
    poisons = torch.as_tensor(data.poison_indices)
    generator = torch.Generator().manual_seed(args.seed)
    part = poisons[torch.randperm(len(poisons), generator=generator)[: round(args.share * len(poisons))]]
    sets = [("Δ-Influence (default)", torch.load(audit / "flagged.pt")), (f"{args.share:.0%} of the poisons", part)]
    methods = [Retrain(seed=args.seed), FineTune(), SSD(), Potion(), SCRUB(), BadTeacher(seed=args.seed)]
    methods = [method for method in methods if method.name in names]
    runs = [(name, indices, method) for name, indices in sets for method in methods]
    if "retrain" in names:
        runs.append(("all true poisons", poisons, Retrain(seed=args.seed)))
    rows, retrain_s = [], {}
    for forget, indices, method in runs:
        torch.manual_seed(args.seed)
        result = corrective_fit(cli, RESULTS / "unlearn", method).run(victim, indices, forget).report
        if method.name == "retrain":
            retrain_s[forget] = result.time_s
        rows.append(
            {
                "forget": forget,
                "method": method.name,
                "removed": len(indices),
                "poisons_removed": int(torch.isin(torch.as_tensor(indices), poisons).sum()),
                "clean_acc": result.acc,
                "asr": result.asr,
                "label_acc": result.label_acc,
                "changed": result.changed_predictions,
                "verdict": result.verdict,
                "dampened": result.details.get("dampened_fraction"),
                "time_s": result.time_s,
                "vs_retrain": result.time_s / retrain_s[forget] if forget in retrain_s else None,
            }
        )
        print(rows[-1], flush=True)
    victim_row = {"forget": "nothing (victim)", "method": "-", "removed": 0, "poisons_removed": 0,
                  "clean_acc": result.before_acc, "asr": result.before_asr,
                  "label_acc": result.before_label_acc, "time_s": metrics["train_s"]}  # fmt: skip
    columns = ["forget", "method", "removed", "poisons_removed", "clean_acc", "asr", "label_acc", "changed", "verdict",
               "dampened", "time_s", "vs_retrain"]  # fmt: skip
    chosen = "" if names == list(METHODS) else "_" + "-".join(names)
    report(f"unlearning_{args.attack}{run_tag(args)}{chosen}", [victim_row, *rows], columns)


if __name__ == "__main__":
    main()
