"""The command line: ``delta-influence`` (``python train.py``) trains, audits and corrects; ``delta-influence-unlearn``
(``python unlearn.py``) runs a corrective fit on a file of flagged indices."""

import os
import signal
import sys
from typing import Callable

from pytorch_lightning.utilities.exceptions import SIGTERMException

from delta_influence.cli import train, unlearn
from delta_influence.cli.train import AuditingTrainer, DeltaInfluenceCLI
from delta_influence.errors import DeltaInfluenceError
from delta_influence.stages import StageInterrupted

TRACEBACK_VARIABLE = "DELTA_INFLUENCE_TRACEBACK"

__all__ = [
    "AuditingTrainer",
    "DeltaInfluenceCLI",
    "run_command",
    "train",
    "train_command",
    "unlearn",
    "unlearn_command",
]


def train_command() -> None:
    """``delta-influence fit|validate|test|predict|audit ...``: the training command, as a console command."""
    run_command(train.main)


def unlearn_command() -> None:
    """``delta-influence-unlearn ...``: the corrective fit of a file of indices, as a console command."""
    args, sys.argv[1:] = sys.argv[1:], []  # LightningCLI warns when it gets both ``args`` and sys.argv
    run_command(lambda: unlearn.main(args))


def run_command(main: Callable[[], object]) -> None:
    """Runs a command-line entry point. An error the project raises on purpose (a bad setting, missing data, a
    model that does not fit) ends it with the message alone and exit status 2; set DELTA_INFLUENCE_TRACEBACK=1 to
    see the traceback. Unexpected errors keep theirs. A stage stopped by a signal ends with status 128 + the signal's
    number and a line saying how to finish it, and so does training stopped by SIGTERM (which Lightning would end
    with status 0, as if it had finished)."""
    try:
        main()
    except DeltaInfluenceError as error:
        if os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
            raise
        print(f"error: {error}\n(set {TRACEBACK_VARIABLE}=1 to see where it was raised)", file=sys.stderr)
        sys.exit(2)
    except StageInterrupted as interrupted:
        print(f"error: {interrupted}", file=sys.stderr)
        sys.exit(interrupted.exit_status)
    except SIGTERMException:
        print(
            "error: training was interrupted (SIGTERM) before it finished. Resume it from its last checkpoint with "
            "the same command and --ckpt_path <run folder>/checkpoints/<checkpoint>.",
            file=sys.stderr,
        )
        sys.exit(128 + signal.SIGTERM)
