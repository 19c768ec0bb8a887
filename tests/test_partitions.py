"""The influence passes split across two processes (gloo) by kronfluence's data partitions: the same scores as one
process, each process's timings, and a failure in either process ending both with its message."""

import json
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from kronfluence.analyzer import Analyzer
from test_influence import _data, _model
from torch import nn
from torch.utils.data import TensorDataset

from delta_influence.influence import DataPartitions, PartitionError, compute_influence_scores, finish, serve

FIT = {"train_batch_size": 8, "seed": 3}
SOME = torch.tensor([0, 2, 3, 7, 11, 12, 19, 23])  # the samples a scoring pass of some samples scores


def _queries() -> TensorDataset:
    return TensorDataset(torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2]))


def _batch_normed() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, 3)).eval()  # fmt: skip


def _process(rank: int, folder: str) -> None:
    """One process of the run: process 0 audits case after case, process 1 serves; each writes what it saw."""
    folder = Path(folder)
    dist.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}", rank=rank, world_size=2)
    partitions, seen = DataPartitions(), {}
    other_labels = TensorDataset(_data().tensors[0], _data().tensors[1].roll(1))
    cases = {  # case: this process's model, training set and factor folder
        "same": (_model(), _data(), "same"),
        "some samples": (_model(), _data(), "same"),  # the same factors, reused; some samples scored
        "other data": (_model(), _data() if rank == 0 else other_labels, "other data"),
        "own statistics": (_batch_normed(), _data(), "own statistics"),  # aligned to process 0's first
        "cache on process 0 only": (_model(), _data(), "same" if rank == 0 else "fresh"),
        "fails": (_model(), _data(), "fails"),
        "interrupted": (_model(), _data(), "interrupted"),
    }
    for case, (model, train, into) in cases.items():
        if case == "own statistics":
            model[1].running_mean.fill_(float(rank))  # as the last training step leaves each DDP process's own
            partitions.align(model)
        if case == "fails" and rank == 1:  # this process's share of the covariance pass breaks
            Analyzer.fit_covariance_matrices = lambda *args, **kwargs: (_ for _ in ()).throw(MemoryError("no room"))
        if case == "interrupted" and rank == 1:  # Ctrl+C in this process's share
            Analyzer.fit_covariance_matrices = lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt())
        try:
            if rank == 0:
                try:
                    scored = SOME if case == "some samples" else None
                    scores = compute_influence_scores(model, train, _queries(), folder / into, partitions=partitions,
                                                      scored=scored, **FIT)  # fmt: skip
                    torch.save(scores.scores, folder / f"{case}.pt")
                    seen[case] = {"timings": scores.process_timings, "summary": scores.summary()}
                finally:
                    finish(partitions, f"{case}: done")
            else:
                seen[case] = {"served": serve(model, train, folder / into, "cpu", partitions)}
        except KeyboardInterrupt:
            seen[case] = {"interrupted": True}
            partitions.share()  # process 0's end of the audit, which a process that stopped here never reads
        except PartitionError as error:
            seen[case] = {"error": str(error)}
    (folder / f"process{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_score_as_one_and_a_failed_share_ends_both(tmp_path):
    context = mp.start_processes(_process, args=(str(tmp_path),), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):  # never a hang: a stuck process fails the test
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two processes did not finish within 4 minutes")
    first, second = (json.loads((tmp_path / f"process{rank}.json").read_text()) for rank in (0, 1))

    alone = compute_influence_scores(_model(), _data(), _queries(), tmp_path / "alone", **FIT)
    shared = torch.load(tmp_path / "same.pt")
    assert shared.shape == alone.scores.shape == (3, 24)
    assert torch.allclose(shared, alone.scores, rtol=1e-3, atol=1e-5)
    assert torch.equal(shared.argsort(dim=1), alone.scores.argsort(dim=1))  # the same ranking, sample by sample
    some = torch.load(tmp_path / "some samples.pt")  # split across both processes too, the others NaN
    assert torch.allclose(some[:, SOME], alone.scores[:, SOME], rtol=1e-3, atol=1e-5)
    assert some.isnan().sum() == 3 * (24 - len(SOME)) and second["some samples"] == {"served": "some samples: done"}
    timings = first["same"]["timings"]
    assert set(timings) == {"covariance_s", "eigendecomposition_s", "lambda_s", "aggregate_s", "scores_s"}
    assert all(len(seconds) == 2 for seconds in timings.values())  # each process's own
    assert first["same"]["summary"]["factors"] == alone.factors_name  # the same factors' name: one cache for both
    assert second["same"] == {"served": "same: done"}
    leftovers = [p.name for p in (tmp_path / "same").rglob("*") if "partial" in p.name or "tmp_" in p.name]
    assert leftovers == []  # the processes' own folders and the scores' partitions are gone
    assert not list((tmp_path / "same").rglob("*_data_partition*"))  # aggregated, the partitions' copies removed

    for case, message in [("other data", "differ from process 0's"), ("fails", "process 1: MemoryError: no room")]:
        assert message in first[case]["error"] and first[case]["error"] == second[case]["error"], case
    assert "timings" in first["own statistics"] and second["own statistics"] == {"served": "own statistics: done"}
    # process 0 found the factors cached and process 1 took its word: both stop at the scores (none in its folder)
    assert "score pass failed in process 1" in first["cache on process 0 only"]["error"]
    assert first["cache on process 0 only"]["error"] == second["cache on process 0 only"]["error"]
    # a process interrupted in its share ends as interrupted, and the other with its message, not a hang
    assert second["interrupted"] == {"interrupted": True}
    assert "process 1: KeyboardInterrupt" in first["interrupted"]["error"]
