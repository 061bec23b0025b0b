r"""What ``nn.MultiheadAttention`` feeds its four projections, made visible to the capture.

``nn.MultiheadAttention`` does not call modules for its projections: its forward hands
``in_proj_weight`` (or ``q/k/v_proj_weight``), ``in_proj_bias`` and ``out_proj.weight/bias`` to
``F.multi_head_attention_forward``, which applies them with ``F.linear``. Hooks on ``out_proj`` never
fire. This module runs torch's own ``F.multi_head_attention_forward`` — the same code object, so the
same arithmetic, masks, dropout draws and options — with one difference: its global name ``linear``
resolves to :func:`_tapped_linear`, which calls the real ``F.linear`` and, when the weight is (a row
block of) one of the module's projection weights, records the input rows and attaches a tensor hook
to the output that hands each projection's column block of ``∂J/∂y`` to the capture. Nothing is
monkey-patched: the function is rebuilt once with its own globals dictionary.

The rebuilt function is reached through a ``TorchFunctionMode`` pushed by a forward pre-hook of the
module (only in training mode under autograd, while the capture records) and popped by its forward
hook (``always_call=True``, so an exception pops it too): ``F.multi_head_attention_forward`` consults
modes first, and the mode answers that one call with the tapped copy; every other call passes
through unchanged.

A projection of a module is named by :data:`PROJECTIONS`; ``q_proj``, ``k_proj``, ``v_proj`` map
``query``, ``key``, ``value`` (after the layout change of ``batch_first``) to the projected rows,
``out_proj`` maps the heads' concatenated output to the module's output. :func:`tap_available`
checks once per process that the rebuilt function reports all four projections of a small module.
"""

from __future__ import annotations

import contextvars
import types
import weakref
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .capture import FunctionTap

__all__ = ["PROJECTIONS", "projection_blocks", "MHATap", "tap_available"]

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
_real_linear = torch._C._nn.linear
_current: contextvars.ContextVar = contextvars.ContextVar("pmptrain_mha_tap", default=None)


def _tapped_linear(input, weight, bias=None):
    y = _real_linear(input, weight, bias)
    tap = _current.get()
    if tap is not None:
        tap.seen(input, weight, y)
    return y


def _rebuild(fn, g):
    out = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
    out.__kwdefaults__ = fn.__kwdefaults__
    return out


_TAPPED = None


def _tapped_mha():
    """``F.multi_head_attention_forward`` with ``linear`` resolved to :func:`_tapped_linear`."""
    global _TAPPED
    if _TAPPED is None:
        g = dict(F.__dict__)
        g["linear"] = _tapped_linear
        g["has_torch_function"] = lambda *a, **k: False  # the mode already answered this call
        for helper in ("_in_projection_packed", "_in_projection"):
            if helper in g:
                g[helper] = _rebuild(getattr(F, helper), g)
        _TAPPED = _rebuild(F.multi_head_attention_forward, g)
    return _TAPPED


def projection_blocks(module: nn.MultiheadAttention) -> List[Tuple[str, Tensor, int, int, Optional[Tensor]]]:
    """``[(projection, base weight, first row, last row, bias block or None)]``: where each of the
    four projections' weight ``W`` (``y = W x + b``, ``[out, in]``) and bias live."""
    e = module.embed_dim
    out = []
    ib = module.in_proj_bias
    for j, name in enumerate(PROJECTIONS[:3]):
        bias = ib[j * e:(j + 1) * e] if ib is not None else None
        if module._qkv_same_embed_dim:
            out.append((name, module.in_proj_weight, j * e, (j + 1) * e, bias))
        else:
            w = getattr(module, name + "_weight")
            out.append((name, w, 0, e, bias))
    out.append(("out_proj", module.out_proj.weight, 0, e, module.out_proj.bias))
    return out


class _SplitCostateHook:
    """Tensor hook on a projection output: hands (input, column block of ∂J/∂y) to each
    projection's statistics once, then lets go of the input."""

    __slots__ = ("capture", "blocks", "x")

    def __init__(self, capture, blocks, x):
        self.capture, self.blocks, self.x = capture, blocks, x

    def __call__(self, grad: Tensor):
        cap = self.capture
        if cap.removed:
            return None
        if self.x is None:
            for key, _, _ in self.blocks:
                cap._repeated(key)
            return None
        x, self.x = self.x, None
        g = grad.detach()
        for key, c0, c1 in self.blocks:
            cap._accumulate(key, x, None, g[..., c0:c1] if (c0, c1) != (0, g.shape[-1]) else g)
        return None

    def __reduce__(self):
        from .capture import _Inert

        return (_Inert, ())


class _Mode(TorchFunctionMode):
    def __init__(self, tap: "MHATap"):
        super().__init__()
        self.tap = tap

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            token = _current.set(self.tap)
            try:
                return _tapped_mha()(*args, **kwargs)
            finally:
                _current.reset(token)
        return func(*args, **kwargs)


class MHATap(FunctionTap):
    """The pre-hook / hook pair of one ``nn.MultiheadAttention`` (see the module docstring);
    ``keys`` maps each projection to its capture key."""

    def __init__(self, capture, module: nn.MultiheadAttention, keys: Dict[str, str]):
        super().__init__(capture)
        self.module_ref = weakref.ref(module)
        self.keys = keys

    def mode(self) -> "_Mode":
        return _Mode(self)

    def seen(self, x: Tensor, w: Tensor, y: Tensor) -> None:
        """A ``linear`` call of the rebuilt forward: record it if ``w`` is a projection's weight."""
        cap, module = self.capture_ref(), self.module_ref()
        if cap is None or module is None or not y.requires_grad:
            return
        blocks = []
        for name, base, r0, r1, _ in projection_blocks(module):
            if name not in self.keys or base is None:
                continue
            if w is base:
                start = 0
            elif w._base is base and w.dim() == 2 and w.stride() == base.stride():
                start = (w.storage_offset() - base.storage_offset()) // base.stride(0)
            else:
                continue
            lo, hi = max(r0, start), min(r1, start + w.shape[0])
            if (lo, hi) == (r0, r1):  # the projection's whole block is in this call
                blocks.append((self.keys[name], r0 - start, r1 - start))
        if blocks:
            y.register_hook(_SplitCostateHook(cap, blocks, x.detach()))


_AVAILABLE: Optional[bool] = None


def tap_available() -> bool:
    """Whether the rebuilt forward reports the four projections of a small module with the same
    output as torch's (checked once per process; False if a torch version changed how
    ``F.multi_head_attention_forward`` applies its projections)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            _AVAILABLE = _self_test()
        except Exception:  # noqa: BLE001 - any failure means: not available
            _AVAILABLE = False
    return _AVAILABLE


def _self_test() -> bool:
    gen = torch.Generator().manual_seed(0)
    ok = True
    for kw in ({}, {"kdim": 3, "vdim": 5}):
        mha = nn.MultiheadAttention(4, 2, **kw).double()
        q = torch.randn(3, 2, 4, dtype=torch.float64, generator=gen)
        k = torch.randn(5, 2, kw.get("kdim", 4), dtype=torch.float64, generator=gen)
        v = torch.randn(5, 2, kw.get("vdim", 4), dtype=torch.float64, generator=gen)
        ref = mha(q, k if kw else q, v if kw else q)[0]
        seen = []

        class _Rec:
            def seen(self, x, w, y):
                seen.append(tuple(w.shape))

        token = _current.set(_Rec())
        try:
            with torch.no_grad():
                out = _tapped_mha()(
                    q, k if kw else q, v if kw else q, 4, 2, mha.in_proj_weight, mha.in_proj_bias, None, None, False,
                    0.0, mha.out_proj.weight, mha.out_proj.bias, training=True, need_weights=False,
                    use_separate_proj_weight=bool(kw), q_proj_weight=mha.q_proj_weight,
                    k_proj_weight=mha.k_proj_weight, v_proj_weight=mha.v_proj_weight)[0]
        finally:
            _current.reset(token)
        ok = ok and torch.allclose(out, ref, rtol=1e-12, atol=1e-12) and len(seen) >= 2
    return ok
