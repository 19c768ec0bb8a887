"""EK-FAC factors fitted on a sample of the training set: detection quality and the audit's cost per sample size.

    python benchmarks/detection.py            # first: the victim (configs/benchmarks/cifar10_badnets_cpu.yaml)
    python benchmarks/factor_sample.py        # 100 %, 50 %, 25 %, 10 % of the training set for the factor fits
    python benchmarks/factor_sample.py --attack smooth

Every row is the config's Δ-Influence audit through the audit pipeline, with fresh factors fitted on a seeded random
sample (``delta_influence.factor_examples``); scores as the config's audit computes them (the attacker's label).
Times are also given in epochs of training (one epoch of the victim's recipe, measured at the start of the same run),
the unit to plan with.
"""

import dataclasses
import tempfile

from common import AUDIT_STAGES, RESULTS, audit_callback, epoch_seconds, load_victim, parse_args, report, run_tag

from delta_influence.pipeline import AuditData, run_audit


def main() -> None:
    args = parse_args(__doc__, extra=[("--fractions", str, "1,0.5,0.25,0.1", "shares of the training set")])
    cli = load_victim(args)
    data, model = cli.datamodule, cli.model
    settings = audit_callback(cli).delta_influence
    epoch_s = epoch_seconds(cli)
    total = len(data.eval_train_set)
    rows, full = [], None
    for fraction in (float(part) for part in args.fractions.split(",")):
        detector = dataclasses.replace(settings, factor_examples=None if fraction >= 1 else round(fraction * total))
        with tempfile.TemporaryDirectory() as factors:  # fresh factors: their cost is measured
            result = run_audit(
                model, AuditData.of(data), detector, RESULTS / f"factor_sample_{args.attack}{run_tag(args)}", factors,
                epoch_seconds=epoch_s,
            )  # fmt: skip
        flagged = set(result.flagged.tolist())
        full = flagged if full is None else full
        m = result.metrics
        rows.append(
            {
                "fraction": fraction,
                "factor_examples": detector.factor_examples or total,
                "flagged": len(flagged),
                "precision": m["precision"],
                "recall": m["recall"],
                "same_as_first_row": len(flagged & full) / max(len(flagged | full), 1),
                "covariance_s": m["covariance_s"],
                "eigendecomposition_s": m["eigendecomposition_s"],
                "lambda_s": m["lambda_s"],
                "scores_s": m["scores_s"],
                "audit_s": m["total_s"],
                "audit_epochs": m["total_epochs"],
                **{f"{stage}_epochs": m.get(f"{stage}_epochs", 0.0) for stage in AUDIT_STAGES},  # each stage in epochs
            }
        )
        print(rows[-1], flush=True)
    report(f"factor_sample_{args.attack}{run_tag(args)}", rows, list(rows[0]))
    print(f"one training epoch of the victim, measured in this run: {epoch_s:.1f} s")


if __name__ == "__main__":
    main()
