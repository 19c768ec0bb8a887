"""Generated artefacts (a trigger, brewed perturbations, influence factors) cached on disk, keyed by a hash of
everything that made them."""

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from delta_influence.files import write_replacing


def content_key(settings: dict, *tensors: Tensor) -> str:
    """A hash of ``settings`` (JSON-able) and of every element of ``tensors`` (shape, dtype and content).

    Example:
        >>> a = content_key({"eps": 16}, torch.zeros(3))
        >>> a == content_key({"eps": 16}, torch.zeros(3)), a == content_key({"eps": 8}, torch.zeros(3))
        (True, False)
    """
    digest = new_digest(settings)
    for tensor in tensors:
        update_digest(digest, tensor)
    return digest.hexdigest()[:20]


def new_digest(settings: dict) -> "hashlib._Hash":
    """A SHA-256 digest started with ``settings`` (JSON-able; keys sorted, anything else by its ``str``)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())


def update_digest(digest: "hashlib._Hash", tensor: Tensor) -> None:
    """Adds a tensor's shape, dtype and content to ``digest``."""
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
    digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())


def cached(folder: Path, name: str, key: str, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The artefact ``folder/<name>-<key>.pt``: loaded when its stored key is ``key``, else made by ``make`` and
    written atomically (a temporary file renamed into place), so that a half-written file is never read.

    A file under the right name whose stored key differs (copied or edited by hand) is never used: it is made again.
    """
    path = Path(folder) / f"{name}-{key}.pt"
    if path.is_file():
        content = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(content, dict) and content.get("key") == key:
            return content
        print(f"{path} was made with other settings or data than this run's; making it again.")
    content = {**make(), "key": key}
    write_replacing(path, lambda staging: torch.save(content, staging))
    return content
