"""Publishing finished results under a name without ever replacing what is already there."""

import os
from pathlib import Path


def publish(staging: Path, target: Path) -> Path:
    """Gives the finished file or folder ``staging`` the name ``target``, or, when that is taken, the first free
    ``target-2``, ``target-3``, ... (a file keeps its suffix: ``retrain-2.ckpt``). Returns the name it got.

    Both steps are atomic renames or links, so a name holds either nothing or a finished result, and a finished
    result is never replaced.
    """
    is_folder = staging.is_dir()
    stem, suffix = (target.name, "") if is_folder else (target.stem, target.suffix)
    version = 1
    while True:
        final = target if version == 1 else target.with_name(f"{stem}-{version}{suffix}")
        try:
            if is_folder:
                os.rename(staging, final)  # fails when final is a file or a folder with something in it
            else:
                os.link(staging, final)  # fails when final exists
                staging.unlink()
            return final
        except OSError:
            if not final.exists():
                raise
            version += 1
