"""Generated artefacts (a trigger, brewed perturbations) cached on disk, keyed by everything that made them."""

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor


def content_key(settings: dict, *tensors: Tensor) -> str:
    """A hash of ``settings`` (JSON-able) and of every element of ``tensors`` (shape, dtype and content).

    Example:
        >>> a = content_key({"eps": 16}, torch.zeros(3))
        >>> a == content_key({"eps": 16}, torch.zeros(3)), a == content_key({"eps": 8}, torch.zeros(3))
        (True, False)
    """
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


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
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        torch.save(content, staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return content
