"""Stages stopped by a signal: the command's status says so even where the stage's own exception cannot surface."""

import gc
import json
import os
import signal

import pytest

from delta_influence.files import write_new
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


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_block_that_carries_on_after_a_swallowed_signal_publishes_nothing_and_ends_interrupted(tmp_path):
    with pytest.raises(StageInterrupted) as caught:
        with run_stage(tmp_path, "corrective fit", "Finish it with: python unlearn.py --run x"):
            _SignalledWhileCollected()
            gc.collect()
            write_new(tmp_path / "unlearn" / "retrain.ckpt", lambda path: path.write_text("weights"))
    assert caught.value.exit_status == 128 + signal.SIGTERM
    assert not (tmp_path / "unlearn").exists()  # neither the result nor the folder made for it
    assert read_stages(tmp_path)["corrective fit"]["status"] == "interrupted"
    with pytest.raises(StageInterrupted):  # nothing to publish: the block's end is the check
        with run_stage(tmp_path, "audit", "Finish it with: ..."):
            _SignalledWhileCollected()
            gc.collect()
    assert read_stages(tmp_path)["audit"]["status"] == "interrupted"
    assert write_new(tmp_path / "a" / "b.txt", lambda path: path.write_text("x")).read_text() == "x"  # no stage


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
