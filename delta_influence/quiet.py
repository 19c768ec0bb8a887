"""Messages of dependencies that are known to be harmless, hidden in one place, each with the reason.

Only these exact messages are hidden; every other warning, the progress bars and the project's own summaries stay.
Messages this project caused are fixed where they came from instead (the corrective fit's validation loop, frozen
teachers left in eval mode, the W&B folder created before W&B looks for a git repository in it).
"""

import functools
import importlib
import logging
import sys
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from delta_influence.errors import DeltaInfluenceWarning

HARMLESS_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (
        r"`torch\.cuda\.amp\.GradScaler\(args\.\.\.\)` is deprecated",
        FutureWarning,
        "kronfluence 1.0 builds its gradient scaler (disabled unless it runs in float16) with the constructor torch "
        "renamed; the scaler behaves the same",
    ),
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        "Lightning's pytree helper uses a check newer torch versions deprecate; what it computes is unchanged",
    ),
)

LIGHTNING_TIP = "💡 Tip:"  # Lightning advertises its cloud add-ons at every Trainer; nothing is wrong
LIGHTNING_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero")


def interactive() -> bool:
    """Whether the console is a terminal: progress bars are drawn there, and left out of logs and pipes, where their
    redrawing would fill the output with control characters."""
    return sys.stderr.isatty()


def hide_harmless_warnings() -> None:
    """Hides the known harmless messages for the rest of the process and shows the project's own warnings as one line
    each, ``warning: <message>``, without the source line that raised them (the command-line entry points call it)."""
    for message, category, _ in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    if not getattr(warnings.formatwarning, "plain_for_the_project", False):
        warnings.formatwarning = _plain_for_the_project(warnings.formatwarning)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines((LIGHTNING_TIP,)))


LIGHTNING_INFO = ("GPU available", "TPU available", "HPU available", "`Trainer.fit` stopped")


@contextmanager
def lightning_info_hidden() -> Iterator[None]:
    """Hides, inside a block, the lines every Lightning Trainer prints about the devices and the end of its fit: a
    corrective fit announces and sums itself up, and these would read as a second training of the victim."""
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    dropped = _DropLines(LIGHTNING_INFO)
    for logger in loggers:
        logger.addFilter(dropped)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(dropped)


@contextmanager
def harmless_warnings_hidden() -> Iterator[None]:
    """Hides the known harmless warnings inside a block only (around kronfluence's calls)."""
    with warnings.catch_warnings():
        for message, category, _ in HARMLESS_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


# kronfluence's modules that draw progress bars (each imports ``tqdm`` by name)
KRONFLUENCE_BARS = (
    "kronfluence.factor.covariance",
    "kronfluence.factor.eigen",
    "kronfluence.score.dot_product",
    "kronfluence.score.pairwise",
    "kronfluence.score.self",
)


@contextmanager
def transient_bars() -> Iterator[None]:
    """Inside a block (around kronfluence's calls), kronfluence's progress bars erase themselves when done, as the
    project's own do: it keeps each finished bar's line (seven per audit) and has no setting for that, only for
    drawing none (``disable_tqdm``)."""
    modules = [importlib.import_module(name) for name in KRONFLUENCE_BARS]
    originals = [module.tqdm for module in modules]
    for module, bar in zip(modules, originals):
        module.tqdm = functools.partial(bar, leave=False)
    try:
        yield
    finally:
        for module, bar in zip(modules, originals):
            module.tqdm = bar


def quiet_wandb_logger(logger: Any) -> None:
    """Drops ``anonymous=None`` from a Lightning ``WandbLogger``'s ``wandb.init`` arguments: Lightning always passes
    it, and W&B prints that the (unset) setting has no effect. Lightning keeps those arguments in the logger's
    ``_wandb_init`` and offers no other way to change them; this is the one place that touches it."""
    logger._wandb_init = without_unused_wandb_settings(logger._wandb_init)


def without_unused_wandb_settings(init_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``wandb.init`` arguments without ``anonymous=None``.

    Example:
        >>> without_unused_wandb_settings({"project": "p", "anonymous": None})
        {'project': 'p'}
    """
    return {key: value for key, value in init_kwargs.items() if not (key == "anonymous" and value is None)}


def _plain_for_the_project(default: Callable[..., str]) -> Callable[..., str]:
    """``warnings.formatwarning`` that writes a ``DeltaInfluenceWarning`` as ``warning: <message>`` and leaves every
    other warning to ``default``."""

    def formatwarning(message, category, filename, lineno, line=None) -> str:
        if issubclass(category, DeltaInfluenceWarning):
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    formatwarning.plain_for_the_project = True
    return formatwarning


class _DropLines(logging.Filter):
    """Drops the log lines that start with any of ``starts``."""

    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)
