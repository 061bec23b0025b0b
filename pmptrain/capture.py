"""State and costate capture: thin hooks that record tensors and hand them on.

For every registered module, a forward hook records the call's inputs (the *state*) and registers a
tensor hook on the output that records ``∂J/∂y`` when the backward pass reaches it (the costate up
to the factor ``−B``, applied by the optimizer). A tensor hook on the output sees the gradient with
respect to the module's own output even when an in-place activation (``ReLU(inplace=True)``)
rewrites it later, which full backward hooks do not handle.

Rules: every call of a module during a training forward contributes one record (shared modules
contribute all their calls); nothing is recorded in ``eval()`` mode, under ``torch.no_grad()``, while
capture is paused, or when the output does not require grad; calls whose output never receives a
gradient are dropped. Records are consumed (and freed) by :meth:`ModuleCapture.pop`.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["CallRecord", "ModuleCapture"]


class CallRecord:
    """One call of a module: its positional/keyword inputs and the gradient at its output."""

    __slots__ = ("args", "kwargs", "grad")

    def __init__(self, args: Tuple, kwargs: Dict):
        self.args = args
        self.kwargs = kwargs
        self.grad: Optional[Tensor] = None

    @property
    def x(self) -> Tensor:
        return self.args[0]

    def _set_grad(self, grad: Tensor) -> None:
        # the same output can receive several gradient contributions only through accumulation
        # inside autograd, so the hook fires once per backward; a second backward adds up.
        self.grad = grad.detach() if self.grad is None else self.grad + grad.detach()


def _detach(value):
    return value.detach() if isinstance(value, Tensor) else value


class ModuleCapture:
    """Hooks on a set of named modules recording :class:`CallRecord` s.

    Args:
        modules: mapping ``name → module`` to record.
    """

    def __init__(self, modules: Dict[str, nn.Module]):
        self.records: Dict[str, List[CallRecord]] = {}
        self._paused = False
        self._handles = []
        for name, module in modules.items():
            self.add(name, module)

    def add(self, name: str, module: nn.Module) -> None:
        """Start recording ``module`` under ``name`` (no-op if ``name`` is recorded already)."""
        if name in self.records:
            return
        self.records[name] = []
        self._handles.append(module.register_forward_hook(self._make_hook(name), with_kwargs=True))

    def _make_hook(self, name: str):
        records = self.records[name]

        def hook(module: nn.Module, args, kwargs, output):
            if self._paused or not module.training or not torch.is_grad_enabled():
                return
            if not isinstance(output, Tensor) or not output.requires_grad:
                return
            if not args or not isinstance(args[0], Tensor):
                return
            record = CallRecord(
                tuple(_detach(a) for a in args), {k: _detach(v) for k, v in kwargs.items()}
            )
            output.register_hook(record._set_grad)
            records.append(record)

        return hook

    def pop(self, name: str) -> List[CallRecord]:
        """The completed records of ``name`` (calls whose output got a gradient); clears them."""
        recs = self.records[name]
        done = [r for r in recs if r.grad is not None]
        recs.clear()
        return done

    def has_records(self) -> bool:
        return any(r.grad is not None for recs in self.records.values() for r in recs)

    def clear(self) -> None:
        for recs in self.records.values():
            recs.clear()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Record nothing inside the block (used while the optimizer re-evaluates modules)."""
        old, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = old

    def remove(self) -> None:
        """Remove every hook and drop the records; the modules are left as they were."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()
