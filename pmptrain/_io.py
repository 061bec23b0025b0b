"""File-system helper shared by export, checkpoints, reports and data downloads."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Callable, Iterator, Optional

__all__ = ["atomic_write"]


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
