"""What the bench writes beside its results: JSON files (atomically) and the provenance of a run
(versions, git commit)."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from .._io import atomic_write

__all__ = ["atomic_write_json", "git_hash", "versions"]


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
