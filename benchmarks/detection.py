"""Δ-Influence on the CPU CIFAR-10 setting: detection quality against the true poisons, what the corrective fits
do, and what each stage costs.

python benchmarks/detection.py                  # configs/benchmarks/cifar10_badnets_cpu.yaml: train, audit, correct
python benchmarks/detection.py --attack smooth  # configs/benchmarks/cifar10_smooth_cpu.yaml

The victim is trained, audited and corrected by ``train.py fit`` on the config, with fresh factors (so that their
cost is measured) and the audit written to results/detection_audit_<attack>[_s<seed>]; the config's correction loop
(a retrain without the flagged set, a second round while the query still misbehaves, the second opinion) writes to
the run's ``unlearn/``. The default audit scores only the samples of the attacker's label, all its rule can flag; a
second scoring pass on the same factors scores every sample (``score_all``, written to ``..._every_sample``) for the
paper's rule (collapse alone). Rows: that rule, the contrast rule, the verified set (the audit's answer), the final
set after the correction's second opinion (with the retrain that confirmed it), and the true poisons (a retrain
without them, for reference). The audit's time is given in seconds and in epochs of the victim's own training; the
second opinion's cost, its confirming fit, as a multiple of the audit and of an epoch.
"""

import tempfile

import torch
from common import (
    AUDIT_STAGES,
    RESULTS,
    audit_callback,
    corrective_fit,
    every_sample_audit,
    parse_args,
    report,
    run_tag,
    train_victim,
)

from delta_influence.lightning_modules.unlearning import Retrain
from delta_influence.metrics import detection_metrics


def main() -> None:
    args = parse_args(__doc__)
    with tempfile.TemporaryDirectory() as factors:  # fresh factors, so that their cost is measured
        output = RESULTS / f"detection_audit_{args.attack}{run_tag(args)}"
        cli = train_victim(args, [f"--delta_influence.{key}={value}" for key, value in
                                  (("factors_dir", factors), ("output_dir", output))])  # fmt: skip
        callback = audit_callback(cli)
        every = every_sample_audit(cli.model, cli.datamodule, callback.detector, output, factors, callback.choice)
    data, victim, result, correction = cli.datamodule, cli.victim_metrics, callback.result, callback.correction
    timings, poisons = result.metrics, data.poison_indices
    epoch_s = timings["total_s"] / timings["total_epochs"]
    rows = [("the paper's rule", every.evidence.decision.collapsed, None), ("with contrast",
            result.evidence.decision.flagged, None)]  # fmt: skip
    if result.evidence.verification is not None:
        rows.append(
            ("verified (default)", result.flagged, correction.rounds[0].corrected.report if correction else None)
        )
    if correction is not None and correction.second_opinion is not None:
        rows.append(("second opinion (final)", correction.final.forgotten, correction.final.corrected.report))
    torch.manual_seed(args.seed)
    oracle = corrective_fit(cli, RESULTS / "unlearn", Retrain(seed=args.seed)).run(cli.model, poisons, "true poisons")
    rows.append(("true poisons", poisons, oracle.report))
    opinion = correction.second_opinion if correction is not None else None
    extra_s = opinion.fit.corrected.report.time_s if opinion is not None and opinion.fit is not None else 0.0
    table = []
    for rule, flagged, fit in rows:
        m = detection_metrics(torch.as_tensor(flagged), len(data.eval_train_set), poisons)
        table.append(
            {
                "attack": args.attack,
                "seed": args.seed,
                "num_train": len(data.eval_train_set),
                "rule": rule,
                "clean_acc": victim["clean_acc"],
                "asr": victim["asr"],
                "flagged": int(m["flagged"]),
                "poisons_found": round(m["recall"] * len(poisons)),
                "precision": m["precision"],
                "recall": m["recall"],
                "f1": m["f1"],
                "retrain_acc": fit.acc if fit else None,
                "retrain_asr": fit.asr if fit else None,
                "raw_topk_recall": every.metrics["raw_topk_recall"],  # the ranking of every sample
                **data.attack_info,  # the smooth trigger's surrogate and generation times, as recorded when made
                "train_s": victim["train_s"],
                "epoch_s": epoch_s,
                "factors_s": timings["factors_s"],
                "scores_s": timings["scores_s"],
                "rule_audit_s": timings["total_s"] - timings.get("verify_s", 0.0),
                "verify_s": timings.get("verify_s", 0.0),
                "audit_s": timings["total_s"],
                "audit_epochs": timings["total_epochs"],  # the audit in epochs of this victim's training
                **{f"{stage}_epochs": timings.get(f"{stage}_epochs", 0.0) for stage in AUDIT_STAGES},
                "rounds": len(correction.rounds) if correction else 0,
                "given_back": len(opinion.opinion.given_back) if opinion and opinion.opinion is not None else 0,
                "second_opinion": opinion.reason if opinion else None,
                "second_opinion_fit_s": extra_s,
                "second_opinion_audits": extra_s / timings["total_s"],
                "second_opinion_epochs": extra_s / epoch_s,
            }
        )
    report(f"detection_{args.attack}{run_tag(args)}", table, list(table[0]))
    print(f"audit folder: {result.output_dir}")


if __name__ == "__main__":
    main()
