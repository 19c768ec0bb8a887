"""Messages of dependencies that are known to be harmless, hidden in one place, each with the reason.

Only these exact messages are hidden; every other warning, the progress bars and the project's own summaries stay.
Messages this project caused are fixed where they came from instead (the corrective fit's validation loop, frozen
teachers left in eval mode, the W&B folder created before W&B looks for a git repository in it).
"""

import logging
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

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


def hide_harmless_warnings() -> None:
    """Hides the known harmless messages for the rest of the process (the command-line entry points call it)."""
    for message, category, _ in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningTips) for f in logger.filters):
            logger.addFilter(_DropLightningTips())


@contextmanager
def harmless_warnings_hidden() -> Iterator[None]:
    """Hides the known harmless warnings inside a block only (around kronfluence's calls)."""
    with warnings.catch_warnings():
        for message, category, _ in HARMLESS_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


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


class _DropLightningTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LIGHTNING_TIP)
