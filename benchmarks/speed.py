"""Scoring all Δ-Influence queries in one pass over the training set versus one pass per query (the reference).

    python benchmarks/speed.py                 # the detection benchmark's victim, data and factors
    python benchmarks/speed.py --per-query 51  # time every per-query pass instead of a sample of them

Per-query passes cost the same each, so by default a sample of ``--per-query`` of them is timed and the total for
all queries is projected from their mean; the table says which.
"""

import tempfile
import time

from common import cifar_datamodule, load_victim, parse_args, report
from torch.utils.data import Subset, TensorDataset

from delta_influence import make_queries
from delta_influence.examples import first_attacked
from delta_influence.influence import InfluenceAnalysis


def main() -> None:
    args = parse_args(__doc__, extra=[("--per-query", int, 5, "per-query passes to time")])
    data = cifar_datamodule(args)
    model, victim = load_victim(args, data)
    model.eval()
    index = first_attacked(model, data.attack_test_set)
    image, label = data.attack_test_set[index]
    queries = make_queries(image, int(label), data.num_classes, num_transforms=50, seed=0)
    query_set = TensorDataset(queries.images, queries.labels)

    # fresh factors in a temporary folder, so that their cost is measured too
    with tempfile.TemporaryDirectory() as cache:
        analysis = InfluenceAnalysis(model, data.eval_train_set, cache, train_batch_size=256)
        start = time.perf_counter()
        analysis.fit_factors()
        factors_s = time.perf_counter() - start

        start = time.perf_counter()
        together = analysis.pairwise_scores(query_set)
        one_pass_s = time.perf_counter() - start

        timed = min(args.per_query, len(query_set))
        per_query_s, alone = [], []
        for k in range(timed):
            start = time.perf_counter()
            alone.append(analysis.pairwise_scores(Subset(query_set, [k]), query_batch_size=1)[0])
            per_query_s.append(time.perf_counter() - start)
    per_query_total = sum(per_query_s) / timed * len(query_set)
    max_diff = max((a - together[k]).abs().max().item() for k, a in enumerate(alone))
    scale = together.abs().max().item()

    row = {
        "queries": len(query_set),
        "train": len(data.eval_train_set),
        "one_pass_s": one_pass_s,
        "per_query_pass_s": sum(per_query_s) / timed,
        "per_query_total_s": per_query_total,
        "per_query_total": "measured" if timed == len(query_set) else f"projected from {timed}",
        "speedup": per_query_total / one_pass_s,
        "max_rel_diff": max_diff / scale,
        "factors_s": factors_s,
        "train_s": victim["train_s"],
        "audit_over_train": (factors_s + one_pass_s) / victim["train_s"],
    }
    report("speed", [row], list(row))


if __name__ == "__main__":
    main()
