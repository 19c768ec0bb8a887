"""The stages of a run (audit, corrective fit) recorded in its folder, and stopped cleanly by a signal.

A scheduler ends a job with SIGTERM; a person with Ctrl+C (SIGINT). Inside a stage either one raises
``StageInterrupted``: what the stage was writing is discarded (results are published atomically), the run folder's
``stages.json`` says which stage stopped and how to finish it, and the command ends with status 128 + the signal's
number and that one line, never with status 0 as if it had finished.
"""

import json
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from delta_influence.files import checked_before_publishing, write_replacing

STAGES_FILE = "stages.json"
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StageInterrupted(BaseException):
    """A stage was stopped by a signal before it finished; ``exit_status`` is 128 + the signal's number.

    Like ``KeyboardInterrupt`` it is no ``Exception``, so that no ``except Exception`` on the way (a logging handler
    that was writing when the signal came, say) takes it for an error and carries on."""

    def __init__(self, stage: str, signum: int, finish: str) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"the {stage} was interrupted ({name}) before it finished; nothing of it was kept. {finish}")
        self.exit_status = 128 + signum


@contextmanager
def run_stage(folder: Optional[Path], stage: str, finish: str) -> Iterator[None]:
    """Runs a block as ``stage`` of the run in ``folder`` (``None``: no record): ``stages.json`` says ``running`` while
    it runs, then ``finished``, ``interrupted`` (with ``finish``, how to finish it) or ``failed``; SIGTERM and SIGINT
    raise ``StageInterrupted`` inside it (in the main thread, where Python delivers signals). A block that ends with
    any other exception after such a signal is interrupted too: the handler's exception can be swallowed (raised in
    a finalizer), and Lightning's own SIGTERM handler then ends its loops with ``SystemExit`` of status 0. So is a
    block that carries on to its end after a swallowed signal: it publishes nothing more (``write_new`` checks first)
    and ends interrupted."""
    record(folder, stage, "running")
    received: list[int] = []

    def check() -> None:
        if received:
            raise StageInterrupted(stage, received[0], finish)

    try:
        with _signals_interrupt(stage, finish, received), checked_before_publishing(check):
            yield
            check()
    except BaseException as error:
        interrupted = error if isinstance(error, StageInterrupted) else None
        if interrupted is None and received:
            # the handler's exception was swallowed where Python ignores exceptions (a finalizer, say) and something
            # else ended the block because of the same signal: Lightning's own SIGTERM handler makes its loops raise
            # SystemExit with status 0, which must not end the command as if it had finished
            interrupted = StageInterrupted(stage, received[0], finish)
        if interrupted is None:
            record(folder, stage, "failed", error=f"{type(error).__name__}: {error}")
            raise
        record(folder, stage, "interrupted", finish=finish, exit_status=interrupted.exit_status)
        if interrupted is error:
            raise
        raise interrupted from error
    record(folder, stage, "finished")


@contextmanager
def _signals_interrupt(stage: str, finish: str, received: list[int]) -> Iterator[None]:
    """SIGTERM and SIGINT raise ``StageInterrupted`` inside the block (and are noted in ``received``); the previous
    handlers are back after it."""

    def stop(signum: int, frame) -> None:
        received.append(signum)
        raise StageInterrupted(stage, signum, finish)

    previous = {}
    try:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                previous[signum] = signal.signal(signum, stop)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def record(folder: Optional[Path], stage: str, status: str, **details: object) -> None:
    """Sets ``stage``'s status in ``folder/stages.json`` (atomically; the other stages are kept)."""
    if folder is None:
        return
    path = Path(folder) / STAGES_FILE
    stages = json.loads(path.read_text()) if path.is_file() else {}
    stages[stage] = {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **details}
    write_replacing(path, lambda staging: staging.write_text(json.dumps(stages, indent=2)))


def read_stages(folder: Path) -> dict:
    """The run folder's stages and their status (empty when none was recorded)."""
    path = Path(folder) / STAGES_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
