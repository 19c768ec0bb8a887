"""Stages stopped by a signal: the command's status says so even where the stage's own exception cannot surface."""

import gc
import json
import os
import signal

import pytest

from delta_influence.stages import StageInterrupted, read_stages, run_stage


class _SignalledWhileCollected:
    """Sends SIGTERM to this process from its finalizer: the handler runs there, and Python ignores what it raises."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between bytecodes, still inside the finalizer
            pass


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed exception, as meant
def test_a_signal_whose_exception_was_swallowed_still_interrupts_the_stage(tmp_path):
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(StageInterrupted) as caught:
        with run_stage(tmp_path, "corrective fit", "Finish it with: python unlearn.py --run x"):
            _SignalledWhileCollected()  # collected at once: the StageInterrupted raised in it is swallowed
            gc.collect()
            raise SystemExit()  # what Lightning's loops raise once its own SIGTERM handler has seen the signal
    assert caught.value.exit_status == 128 + signal.SIGTERM
    assert "the corrective fit was interrupted (SIGTERM)" in str(caught.value)
    entry = read_stages(tmp_path)["corrective fit"]
    assert entry["status"] == "interrupted" and entry["exit_status"] == 143
    assert signal.getsignal(signal.SIGTERM) == handler  # the caller's handler is back


def test_an_error_without_a_signal_is_a_failure_and_a_quiet_block_a_finish(tmp_path):
    with pytest.raises(ValueError):
        with run_stage(tmp_path, "audit", "Finish it with: ..."):
            raise ValueError("bad")
    assert (
        read_stages(tmp_path)["audit"]["status"] == "failed"
        and "ValueError: bad" in read_stages(tmp_path)["audit"]["error"]
    )
    with run_stage(tmp_path, "audit", "Finish it with: ..."):
        pass
    assert json.loads((tmp_path / "stages.json").read_text())["audit"]["status"] == "finished"
