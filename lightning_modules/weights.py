"""Loading a trained model's weights from a checkpoint, refusing one made for another model."""

from pathlib import Path

import torch
from torch import nn

from delta_influence.errors import ConfigError


def load_weights(model: nn.Module, path: str, option: str) -> None:
    """Loads the checkpoint's weights into ``model``; a missing file or one made for another architecture or data
    set is refused with a message that names ``option`` (the command-line option that gave ``path``)."""
    if not Path(path).is_file():
        raise ConfigError(f"{option}={path!r} is not a file; give a trained model's .ckpt from its run's checkpoints/.")
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        details = (missing or unexpected or mismatched)[:3]
        raise ConfigError(
            f"{option}={path!r} does not match the configured model ({len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(mismatched)} differently shaped weights, e.g. {details}); pass the config the model "
            "was trained with (model.arch, data.dataset)."
        )
    model.load_state_dict(state)
