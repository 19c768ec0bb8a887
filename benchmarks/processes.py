"""The audit of one victim in one process and split across several (kronfluence's data partitions, as under DDP).

    python benchmarks/detection.py            # first: the victim (configs/benchmarks/cifar10_badnets_cpu.yaml)
    python benchmarks/processes.py            # 1 and 2 processes on CPUs (gloo); on GPUs 1 and all devices (NCCL)
    python benchmarks/processes.py --processes 1,2,4
    python benchmarks/processes.py --threads-each 1   # every process one CPU thread: the split's own speed-up

Each row is the config's Δ-Influence audit through the audit pipeline with fresh factors: process 0 drives it, the
others take their share of the covariance, eigen-correction and score passes, as in a DDP run of train.py. On CPUs
the machine's threads are shared out between the processes, as Lightning's DDP does, so a row's speed-up is what
splitting the passes gains on the same hardware; with ``--threads-each`` every process gets that many, so that a row
with N processes has N times the first row's hardware, as N GPUs have N times one's. Times are the slowest
process's (every process's in the JSON) and also in epochs of training: one epoch of the victim's recipe measured
at the start of the same run, with all of the machine's threads.
"""

import datetime
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import AUDIT_STAGES, RESULTS, audit_callback, epoch_seconds, load_victim, parse_args, report, run_tag

from delta_influence.audit import AuditData, run_audit
from delta_influence.influence import DataPartitions, finish, serve

STAGES = [f"{stage}_s" for stage in AUDIT_STAGES if stage != "verify"]  # the passes split across processes


def _audit(rank: int, count: int, args, factors: str, out: str, threads: int, epoch_s: float) -> None:
    """Process ``rank`` of ``count``: process 0 audits and saves what it found, the others serve it."""
    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)  # where NCCL's object collectives put their tensors
    partitions = None
    if count > 1:
        dist.init_process_group(
            "nccl" if cuda else "gloo", init_method=f"file://{factors}/rendezvous", rank=rank, world_size=count,
            timeout=datetime.timedelta(hours=1), **({"device_id": device} if cuda else {}),
        )  # fmt: skip
        partitions = DataPartitions()
    cli = load_victim(args)
    data, model = cli.datamodule, cli.model.to(device)
    if rank == 0:
        flagged = None
        try:
            detector, folder = audit_callback(cli).detector, RESULTS / f"processes_{args.attack}{run_tag(args)}"
            result = run_audit(
                model, AuditData.of(data), detector, folder, factors, device=device, epoch_seconds=epoch_s,
                partitions=partitions,
            )  # fmt: skip
            flagged = result.flagged
            torch.save({"metrics": result.metrics, "summary": result.summary, "flagged": flagged}, out)
        finally:
            if partitions is not None:
                finish(partitions, flagged)
    else:
        serve(model, data.eval_train_set, factors, device, partitions)
    if count > 1:
        dist.destroy_process_group()


def main() -> None:
    args = parse_args(
        __doc__,
        extra=[
            ("--processes", str, None, "process counts, e.g. 1,2 (default: 1 and all GPUs, or 1 and 2 on CPUs)"),
            ("--threads-each", int, None, "CPU threads of every process (default: the machine's, shared out)"),
        ],
    )
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 2  # CPUs: 1 and 2 processes
    counts = [int(part) for part in args.processes.split(",")] if args.processes else sorted({1, devices})
    threads = torch.get_num_threads()
    epoch_s = epoch_seconds(load_victim(args))  # the unit, measured now with the machine's threads
    rows, first = [], None
    for count in counts:
        with tempfile.TemporaryDirectory() as factors:  # fresh factors: their cost is measured
            out = str(Path(factors) / "result.pt")
            share = args.threads_each or max(threads // count, 1)
            if count == 1:
                _audit(0, 1, args, factors, out, share, epoch_s)
                torch.set_num_threads(threads)
            else:
                os.environ["OMP_NUM_THREADS"] = str(share)
                mp.start_processes(
                    _audit, args=(count, args, factors, out, share, epoch_s), nprocs=count, start_method="spawn"
                )
            saved = torch.load(out, weights_only=False)
        m, flagged = saved["metrics"], set(saved["flagged"].tolist())
        first = flagged if first is None else first
        per_process = saved["summary"].get("process_timings", {})
        rows.append(
            {
                "processes": count,
                "threads_each": share,
                "flagged": len(flagged),
                "precision": m["precision"],
                "recall": m["recall"],
                "same_as_first_row": len(flagged & first) / max(len(flagged | first), 1),
                **{stage: m[stage] for stage in STAGES},
                "audit_s": m["total_s"],
                "audit_epochs": m["total_epochs"],
                **{f"{stage[:-2]}_epochs": m.get(f"{stage[:-2]}_epochs", 0.0) for stage in STAGES},
                "per_process": {stage: per_process.get(stage, [m[stage]]) for stage in STAGES},
            }
        )
        print(rows[-1], flush=True)
    tag = f"_threads{args.threads_each}" if args.threads_each else ""
    report(f"processes_{args.attack}{run_tag(args)}{tag}", rows, [key for key in rows[0] if key != "per_process"])
    print(f"one training epoch of the victim, measured in this run: {epoch_s:.1f} s")


if __name__ == "__main__":
    main()
