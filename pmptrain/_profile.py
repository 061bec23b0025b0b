"""Named phases for ``torch.profiler`` (``benchmarks/profile_step.py`` reads them).

``phase("factorise")`` opens a ``torch.profiler.record_function("pmptrain::factorise")`` while a
profiler is recording and is a no-op otherwise (one flag check, ~0.1 µs: the scopes stay in the hot
path). Imports only torch, so the pure mathematics may use it.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

__all__ = ["phase", "PREFIX"]

PREFIX = "pmptrain::"
_NULL = nullcontext()
_enabled = torch._C._autograd._profiler_enabled


def phase(name: str):
    """A context manager marking ``name`` as a phase of pmptrain's work for the profiler."""
    if _enabled():
        return torch.profiler.record_function(PREFIX + name)
    return _NULL
