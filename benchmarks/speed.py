"""Scoring all Δ-Influence queries in one pass over the training set versus one pass per query (the reference).

    python benchmarks/speed.py                 # the detection benchmark's victim, data and audit settings
    python benchmarks/speed.py --per-query 56  # time every per-query pass instead of a sample of them

The audit pipeline runs the config's Δ-Influence scoring every sample (``score_all``; fresh factors, then all
queries and contrast images in one pass); then, on the same factors and queries, passes of one query each are timed.
They cost the same each, so by default a sample of ``--per-query`` of them is timed and the total for all queries is
projected from their mean; the table says which.
"""

import dataclasses
import tempfile
import time

from common import RESULTS, audit_callback, load_victim, parse_args, report, run_tag
from torch.utils.data import Subset

from delta_influence.audit import AuditData, run_audit
from delta_influence.influence import InfluenceAnalysis
from delta_influence.queries import scoring_set


def main() -> None:
    args = parse_args(__doc__, extra=[("--per-query", int, 5, "per-query passes to time")])
    cli = load_victim(args)
    data, model, victim = cli.datamodule, cli.model, cli.victim_metrics
    settings = dataclasses.replace(audit_callback(cli).detector, score_all=True)  # every sample, as per query
    with tempfile.TemporaryDirectory() as cache:  # fresh factors, so that their cost is measured too
        result = run_audit(model, AuditData.of(data), settings, RESULTS / f"speed_audit{run_tag(args)}", cache)
        audit = result.evidence
        query_set = scoring_set(audit.queries, audit.contrast)  # the rows of the one pass
        analysis = InfluenceAnalysis(
            model, data.eval_train_set, cache, settings.strategy, train_batch_size=settings.train_batch_size,
            seed=settings.seed,
        )  # fmt: skip
        timed = min(args.per_query, len(query_set))
        per_query_s, alone = [], []
        for k in range(timed):
            start = time.perf_counter()
            alone.append(analysis.pairwise_scores(Subset(query_set, [k]), query_batch_size=1)[0])
            per_query_s.append(time.perf_counter() - start)
    together, one_pass_s, factors_s = audit.scores, result.metrics["scores_s"], result.metrics["factors_s"]
    per_query_total = sum(per_query_s) / timed * len(query_set)
    max_diff = max((a - together[k]).abs().max().item() for k, a in enumerate(alone))
    row = {
        "queries": len(query_set),
        "train": len(data.eval_train_set),
        "one_pass_s": one_pass_s,
        "per_query_pass_s": sum(per_query_s) / timed,
        "per_query_total_s": per_query_total,
        "per_query_total": "measured" if timed == len(query_set) else f"projected from {timed}",
        "speedup": per_query_total / one_pass_s,
        "max_rel_diff": max_diff / together.abs().max().item(),
        "factors_s": factors_s,
        "train_s": victim["train_s"],
        "audit_over_train": (factors_s + one_pass_s) / victim["train_s"],
    }
    report(f"speed{run_tag(args)}", [row], list(row))


if __name__ == "__main__":
    main()
