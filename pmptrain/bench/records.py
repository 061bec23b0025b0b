"""What the bench writes beside its results: JSON files (atomically) and the provenance of a run
(versions, git commit)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .._io import atomic_write
from .schema import ConfigError

__all__ = ["atomic_write_json", "check_out_dir", "git_hash", "open_outputs", "versions"]


def check_out_dir(out: Path) -> None:
    """``--out``/``--resume`` must be a directory this process can create and write: it is created
    (with its missing parents) and a probe file written and removed, and what was created is removed
    again, so that ``/proc/x``, a symlink loop, a path through a file or a read-only place is refused
    (:class:`~pmptrain.bench.schema.ConfigError` naming ``--out``) before anything is loaded, and a
    refusal later leaves nothing behind. Called by the CLI and by :func:`~pmptrain.bench.sweep.run_bench`.
    The ranks of one ``torchrun`` check the same directory at once, each removing what it made, so a
    refusal is confirmed by up to 4 more checks (0.1 s in all) before it is raised."""
    for attempt in range(5):
        try:
            return _check_out_dir_once(Path(out))
        except ConfigError:
            if attempt == 4:
                raise
            time.sleep(0.01 * (attempt + 1))  # the ranks of one torchrun check the same --out at once


def _check_out_dir_once(out: Path) -> None:
    if os.path.lexists(out) and not out.is_dir():
        what = "a broken symbolic link or a link loop" if out.is_symlink() else "not a directory"
        raise ConfigError(f"--out: {out} exists and is {what}")
    made: List[Path] = []
    missing = []
    p = out
    while not os.path.lexists(p):
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    try:
        for d in reversed(missing):
            d.mkdir()
            made.append(d)
        fd, probe = tempfile.mkstemp(prefix=".pmptrain-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = str(e.strerror or e)
        raise ConfigError(f"--out: cannot create or write {out}: {reason[:1].lower() + reason[1:]}") from None
    finally:
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                pass


def git_hash(path: Optional[Path] = None) -> Optional[str]:
    """The git commit of the source tree (``+dirty`` if modified), or None if unavailable."""
    cwd = str(path or Path(__file__).resolve().parent)
    try:
        h = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                           timeout=10)
        if h.returncode != 0:
            return None
        d = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                           capture_output=True, text=True, timeout=10)
        return h.stdout.strip() + ("+dirty" if d.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> Dict[str, Any]:
    """Python, torch, numpy and pmptrain versions, platform, and the git hash."""
    from .. import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "pmptrain": __version__, "platform": platform.platform(), "git": git_hash()}


def open_outputs(out_dir: Path, tensorboard: bool, rank: int = 0):
    """``(out_dir, writer)``: ``out_dir`` as a Path, created by rank 0 only, and a TensorBoard
    ``SummaryWriter`` on ``out_dir/tensorboard`` for rank 0 when ``tensorboard`` (else None; the
    import is deferred: it is heavy)."""
    out_dir = Path(out_dir)
    if rank != 0:
        return out_dir, None
    out_dir.mkdir(parents=True, exist_ok=True)
    if not tensorboard:
        return out_dir, None
    from torch.utils.tensorboard import SummaryWriter

    return out_dir, SummaryWriter(str(out_dir / "tensorboard"))


def atomic_write_json(obj: Any, path: Path) -> None:
    """Write JSON atomically (temporary file + ``os.replace``)."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)
