"""File-system helper shared by export, checkpoints, reports and data downloads."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Callable, Iterator, Optional

__all__ = ["atomic_write", "remove_stale_temporaries"]


def _umask() -> int:
    """The process umask: from ``/proc/self/status`` where it exists (reading it leaves the umask
    alone), else set and restored at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temporaries(path) -> list:
    """Remove the temporary files ``.<name>.*.tmp`` that an :func:`atomic_write` of ``path`` killed
    before its ``os.replace`` left behind. Only for files with one writer (the bench's checkpoints):
    another writer's temporary file in progress would be removed too. Returns the removed paths."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    prefix, removed = f".{os.path.basename(path)}.", []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if name.startswith(prefix) and name.endswith(".tmp"):
            try:
                os.unlink(os.path.join(directory, name))
                removed.append(os.path.join(directory, name))
            except OSError:
                pass
    return removed


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", verify: Optional[Callable[[str], None]] = None) -> Iterator[IO]:
    """Write ``path`` atomically: the block writes to a temporary file in the same directory, which
    is flushed, fsync'ed, passed to ``verify(tmp_path)`` (which may raise) and only then
    ``os.replace``'d onto ``path``. On any error the temporary file is removed and ``path`` is left
    as it was."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the file follows the umask like open()
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
