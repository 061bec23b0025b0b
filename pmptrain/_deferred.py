"""Deferred checks: the optimizer step reads the device once, not once per factorisation.

The closed-form solves have safety nets that need to know, on the host, whether a factorisation
or a result is finite (an LU/Cholesky that reports a singular matrix falls back to an
eigendecomposition; LAPACK's eigensolver that returns NaN on a finite matrix is retried in
float64; a float32 solve that overflows is redone in float64). Asking is a host synchronisation
(``bool(tensor)``, ``int(info)``): on a GPU each one stalls the stream, and a step asked once per
unit.

Inside :func:`collecting` (the optimizer shell opens it around its rules' proposals) the
mathematics takes its fast path instead and hands the question to :func:`defer`: a device tensor
that is non-finite exactly when the fast path may have failed. The shell folds every deferred
tensor into its one finiteness check of the step (read once); if that check fails, it recomputes
the proposals outside :func:`collecting` — the careful path, with every safety net — before it
decides to skip the step. Outside :func:`collecting` (the pure functions called directly, tests,
the careful recomputation) nothing changes: the careful path is the reference.

Imports only torch, so the pure mathematics may use it (as :mod:`pmptrain._profile`).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, List, Optional

import torch
from torch import Tensor

__all__ = ["active", "collecting", "defer", "failure_flag"]

_local = threading.local()


def active() -> bool:
    """Whether a :func:`collecting` block is open in this thread (the fast path may be taken)."""
    return getattr(_local, "flags", None) is not None


@contextlib.contextmanager
def collecting() -> Iterator[List[Tensor]]:
    """Collect the deferred checks of the block (yields the list they are appended to)."""
    old = getattr(_local, "flags", None)
    flags: List[Tensor] = []
    _local.flags = flags
    try:
        yield flags
    finally:
        _local.flags = old


@contextlib.contextmanager
def careful() -> Iterator[None]:
    """Inside a :func:`collecting` block: take the careful path (syncing checks) for this block."""
    old = getattr(_local, "flags", None)
    _local.flags = None
    try:
        yield
    finally:
        _local.flags = old


def defer(t: Tensor) -> None:
    """Hand ``t`` (any shape; non-finite iff the computation may have failed) to the open
    :func:`collecting` block. Only call it on the fast path, i.e. when :func:`active`."""
    flags: Optional[List[Tensor]] = getattr(_local, "flags", None)
    if flags is None:
        raise RuntimeError("pmptrain._deferred.defer called outside collecting()")
    flags.append(t.detach().reshape(-1).sum().float())


def failure_flag(info: Tensor) -> Tensor:
    """``0`` where a LAPACK ``info`` is 0 (success), NaN otherwise (a float tensor on its device)."""
    zero = torch.zeros((), dtype=torch.float32, device=info.device)
    return torch.where(info == 0, zero, torch.full_like(zero, float("nan")))
