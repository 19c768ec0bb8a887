"""Reads an offline W&B run back from its ``run-*.wandb`` transaction log (LevelDB-style log of protobuf records)."""

import json
import struct
import time
from pathlib import Path

from google.protobuf.message import DecodeError
from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7  # checksum (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_run(run_dir: Path, timeout: float = 60.0) -> dict:
    """History rows, summary, config and logged artifact names of the offline run in ``run_dir``.

    W&B's service writes the log in the background, so this waits (up to ``timeout`` seconds) for the run's exit
    record before it reads.
    """
    deadline = time.monotonic() + timeout
    while True:
        run = _parse(Path(run_dir))
        if run["finished"] or time.monotonic() > deadline:
            return run
        time.sleep(0.5)


def _parse(run_dir: Path) -> dict:
    """Everything the log holds so far."""
    logs = list(run_dir.glob("run-*.wandb"))
    data = logs[0].read_bytes() if logs else b""
    history, summary, config, artifacts, finished = [], {}, {}, [], False
    for raw in _records(data):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(raw)
        except DecodeError:  # a record caught mid-write: read again later
            break
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(_items(record.history.item))
        elif kind == "summary":
            summary.update(_items(record.summary.update))
        elif kind == "config":
            config.update(_items(record.config.update))
        elif kind == "artifact":
            artifacts.append(record.artifact.name)
        elif kind == "exit":
            finished = True
    return {"history": history, "summary": summary, "config": config, "artifacts": artifacts, "finished": finished}


def logged_keys(run: dict) -> set[str]:
    """Keys of the run's history rows and of its summary (every logged metric lands in the summary too)."""
    return {key for row in run["history"] for key in row} | set(run["summary"])


def _items(items) -> dict:
    """Items to a dict; nested keys (media, tables) become nested dicts under their top-level key."""
    out: dict = {}
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return out


def _records(data: bytes):
    """Yields the payload of each record, joining records split across blocks."""
    position, pending = HEADER, b""  # the file starts with a 7-byte W&B header
    while position + HEADER <= len(data):
        left = BLOCK - position % BLOCK
        if left < HEADER:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        position += HEADER
        if kind == 0 and length == 0:
            break
        if position + length > len(data):
            return  # the writer has not finished this record yet
        pending += data[position : position + length]
        position += length
        if kind in (FULL, LAST):
            yield pending
            pending = b""
