"""Writing results atomically: a name holds either nothing or a finished file or folder.

``write_new`` never replaces what is already there (audits, checkpoints, reports, run configs); ``write_replacing``
is for caches, whose content is made again when it is stale.
"""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

_CHECKS: list[Callable[[], None]] = []


def write_new(target: Path, write: Callable[[Path], object], folder: bool = False) -> Path:
    """Writes through ``write(staging)`` into a hidden staging file (or folder) next to ``target``, then publishes it as
    ``target`` or, when that is taken, the first free ``target-2``, ``target-3``, ... (a file keeps its suffix:
    ``retrain-2.ckpt``). Returns the name it got. An interrupted write leaves nothing behind, not even the folder it
    made for ``target``; the checks of ``checked_before_publishing`` run between writing and publishing.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> [write_new(root / "a.txt", lambda path: path.write_text("x")).name for _ in range(2)]
        ['a.txt', 'a-2.txt']
    """
    made = _missing_folders(target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    else:
        staging = _staging_file(target)
    _usual_mode(staging)
    try:
        write(staging)
        for check in list(_CHECKS):
            check()
        return publish(staging, target)
    except BaseException:
        if folder:
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.unlink(missing_ok=True)
        for path in made:  # deepest first; a folder that something else has filled since is kept
            try:
                path.rmdir()
            except OSError:
                break
        raise


@contextmanager
def checked_before_publishing(check: Callable[[], None]) -> Iterator[None]:
    """Inside the block, ``write_new`` calls ``check()`` once a result is written and before it is published; what
    ``check`` raises discards the result (a stage that was signalled to stop, say)."""
    _CHECKS.append(check)
    try:
        yield
    finally:
        _CHECKS.remove(check)


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def shown(path: Path | str) -> str:
    """A path as the project prints it: relative to the working folder when it lies inside it, else absolute.

    Example:
        >>> shown(Path.cwd() / "runs" / "x"), shown("/elsewhere/y")
        ('runs/x', '/elsewhere/y')
    """
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def write_replacing(target: Path, write: Callable[[Path], object]) -> Path:
    """Writes through ``write(staging)`` and renames the finished file onto ``target``, replacing what was there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_file(target)
    _usual_mode(staging)
    try:
        write(staging)
        os.replace(staging, target)
        return target
    finally:
        staging.unlink(missing_ok=True)


def _staging_file(target: Path) -> Path:
    """A new, empty hidden file next to ``target``."""
    handle, name = tempfile.mkstemp(prefix=f".{target.name}-", suffix=".tmp", dir=target.parent)
    os.close(handle)
    return Path(name)


def _usual_mode(path: Path) -> None:
    """The permissions a plainly created file or folder gets (tempfile makes them private to the owner)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


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
