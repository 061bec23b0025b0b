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

__all__ = ["Checks", "active", "collecting", "defer", "defer_info"]

_local = threading.local()


class Checks:
    """The deferred checks of one :func:`collecting` block: ``finite`` (tensors that must be finite)
    and ``infos`` (LAPACK ``info`` tensors that must be 0). Kept as they are (no operation per
    check); :meth:`ok` reduces them all on the device."""

    __slots__ = ("finite", "infos")

    def __init__(self):
        self.finite: List[Tensor] = []
        self.infos: List[Tensor] = []

    def __bool__(self) -> bool:
        return bool(self.finite or self.infos)

    def ok(self) -> Optional[Tensor]:
        """A 0-dim bool tensor: every check passed (None without checks)."""
        out = None
        if self.finite:
            t = self.finite[0] if len(self.finite) == 1 else torch.cat([f.reshape(-1) for f in self.finite])
            out = torch.isfinite(t).all()
        if self.infos:
            t = self.infos[0] if len(self.infos) == 1 else torch.cat([i.reshape(-1) for i in self.infos])
            bad = t.any()
            out = bad.logical_not() if out is None else out & bad.logical_not()
        return out


def active() -> bool:
    """Whether a :func:`collecting` block is open in this thread (the fast path may be taken)."""
    return getattr(_local, "checks", None) is not None


@contextlib.contextmanager
def collecting() -> Iterator[Checks]:
    """Collect the deferred checks of the block (yields their :class:`Checks`)."""
    old = getattr(_local, "checks", None)
    checks = Checks()
    _local.checks = checks
    try:
        yield checks
    finally:
        _local.checks = old


def _open() -> Checks:
    checks = getattr(_local, "checks", None)
    if checks is None:
        raise RuntimeError("pmptrain._deferred: a check was deferred outside collecting()")
    return checks


def defer(t: Tensor) -> None:
    """``t`` (any shape) must be finite, else the fast path may have failed. Only on the fast path
    (:func:`active`)."""
    _open().finite.append(t.detach())


def defer_info(info: Tensor) -> None:
    """A LAPACK ``info`` (any shape) must be 0, else the factorisation failed."""
    _open().infos.append(info)
