"""Δ-Influence on the CPU CIFAR-10 setting: detection quality against the true poisons, and stage times.

python benchmarks/detection.py                  # configs/benchmarks/cifar10_badnets_cpu.yaml: train, then audit
python benchmarks/detection.py --attack smooth  # configs/benchmarks/cifar10_smooth_cpu.yaml

The victim is trained and audited by ``train.py fit`` on the config, with fresh factors (so that their cost is
measured) and the audit written to results/detection_audit_<attack>[_s<seed>]. The default audit scores only the
samples of the attacker's label, all its rule can flag; a second scoring pass on the same factors scores every
sample (``score_all``, the rule alone, written to ``..._every_sample``), for the paper's rule (collapse alone).
Rows: that rule, collapse plus the clean-class contrast, and that rule's flagged set after the verification stage
(the default). The audit's time is the default's, given
without the verification stage (``rule_audit_s``) and with it (``audit_s``).
"""

import tempfile

from common import AUDIT_STAGES, RESULTS, audit_callback, every_sample_audit, parse_args, report, run_tag, train_victim

from delta_influence.metrics import detection_metrics


def main() -> None:
    args = parse_args(__doc__)
    with tempfile.TemporaryDirectory() as factors:  # fresh factors, so that their cost is measured
        output = RESULTS / f"detection_audit_{args.attack}{run_tag(args)}"
        cli = train_victim(args, [f"--delta_influence.{key}={value}" for key, value in
                                  (("factors_dir", factors), ("output_dir", output))])  # fmt: skip
        callback = audit_callback(cli)
        every = every_sample_audit(cli.model, cli.datamodule, callback.detector, output, factors, callback.choice)
    data, victim, result = cli.datamodule, cli.victim_metrics, callback.result
    decision, timings = result.evidence.decision, result.metrics
    rows = []
    rules = [("reference rule", every.evidence.decision.collapsed), ("with contrast", decision.flagged)]
    if result.evidence.verification is not None:
        rules.append(("verified (default)", result.evidence.verification.flagged))
    for rule, flagged in rules:
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
                "raw_topk_recall": every.metrics["raw_topk_recall"],  # the ranking of every sample
                **data.attack_info,  # the smooth trigger's surrogate and generation times, as recorded when made
                "train_s": victim["train_s"],
                "factors_s": timings["factors_s"],
                "scores_s": timings["scores_s"],
                "rule_audit_s": timings["total_s"] - timings.get("verify_s", 0.0),
                "verify_s": timings.get("verify_s", 0.0),
                "audit_s": timings["total_s"],
                "audit_epochs": timings["total_epochs"],  # the audit in epochs of this victim's training
                **{f"{stage}_epochs": timings.get(f"{stage}_epochs", 0.0) for stage in AUDIT_STAGES},
            }
        )
    report(f"detection_{args.attack}{run_tag(args)}", rows, list(rows[0]))
    print(f"audit folder: {result.output_dir}")


if __name__ == "__main__":
    main()
