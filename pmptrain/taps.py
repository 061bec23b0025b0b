r"""Children whose parent applies their weights in functional calls, made visible to the capture.

Some parents do not call a child module but hand its weight to a functional kernel. Hugging Face's
Mamba mixer (reference, non-CUDA path; transformers 5.x ``models/mamba/modeling_mamba.py``) is the
case in the model zoo:

* ``conv1d`` (a depthwise ``nn.Conv1d`` with ``padding = k − 1``): ``causal_conv1d_forward`` reads
  ``conv1d.weight.squeeze(1)`` and ``causal_conv1d_fn`` computes
  ``F.conv1d(x, weight.unsqueeze(1), conv1d.bias, padding=k − 1, groups=C)[..., :L]`` — the module's
  own map followed by a crop;
* ``dt_proj`` (an ``nn.Linear``): the mixer computes ``dt_proj.weight @ t`` with ``t`` ``[B, R, L]``
  (time steps as columns), and the selective scan adds ``dt_proj.bias`` to that product before the
  softplus — ``dt_proj``'s map ``W tᵀ + b`` with its output transposed.

Both maps are affine in the child's parameters and their closed forms need only what the child's
forward hook would have recorded: the call's input (the state) and ``∂J/∂y`` at its output (the
costate; for ``dt_proj`` the gradient at ``W t`` is the gradient at ``W t + b``, the bias being
added to it). A :class:`ParentTap` records them: a forward pre-hook of the parent pushes a
``TorchFunctionMode`` (only while the capture records: training mode under autograd), its forward
hook pops it (``always_call=True``). Inside, every call of ``F.conv1d/2d/3d`` whose weight is the
child's ``weight`` (or a view of it with the same shape, strides and storage) and whose stride,
padding, dilation and groups are the child's own, every ``F.linear`` with the child's weight, and
every ``W @ t`` / ``t @ Wᵀ`` with a Linear child's weight runs unchanged, and a tensor hook on its
output hands (input, output gradient) to the child's capture entry in the child's own layout
(``[…, rows, n]`` / ``[N, C, *]``), so the child's existing rule (Linear, grouped convolution)
applies unchanged. A call with other settings (the decode path's ``padding=0``) is not recorded;
a child none of whose calls was recorded is detected as silent at the first step and falls back
(:meth:`pmptrain.capture.ModuleCapture.silent_keys`): the tap can add closed forms, never a wrong one.

:data:`FUNCTIONAL_CHILDREN` lists the parents (by qualified class name, no import of their
library) and the children each reads this way, checked against the library's source: a call that
leaves the child's bias out (``dt_proj``) is one whose output the library adds that bias to, so
``Σ∂J/∂y`` is the bias's gradient (tested: the tapped pairs reproduce the autograd gradients of
weight and bias, ``tests/test_taps.py``).
"""

from __future__ import annotations

import weakref
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .capture import FunctionTap, _CostateHook

__all__ = ["FUNCTIONAL_CHILDREN", "ParentTap", "attach_parent_tap", "tapped_child"]

_MAMBA = "transformers.models.mamba.modeling_mamba.MambaMixer"
_FALCON_MAMBA = "transformers.models.falcon_mamba.modeling_falcon_mamba.FalconMambaMixer"
_MAMBA2 = "transformers.models.mamba2.modeling_mamba2.Mamba2Mixer"

#: parent class (qualified name) → the children whose weights its forward applies functionally
FUNCTIONAL_CHILDREN: Dict[str, Tuple[str, ...]] = {
    _MAMBA: ("conv1d", "dt_proj"),
    _FALCON_MAMBA: ("conv1d", "dt_proj"),
    _MAMBA2: ("conv1d",),
}

_CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_LINEARS = {F.linear, torch._C._nn.linear}
_MATMULS = {torch.matmul, Tensor.__matmul__, Tensor.matmul}


def _qualname(module: nn.Module) -> str:
    t = type(module)
    return f"{t.__module__}.{t.__qualname__}"


def tapped_child(parent: nn.Module, child_name: str) -> bool:
    """Whether ``parent``'s forward applies ``child_name``'s weight functionally and a
    :class:`ParentTap` records it."""
    return child_name in FUNCTIONAL_CHILDREN.get(_qualname(parent), ())


def _same(w: Tensor, p: Tensor) -> bool:
    """``w`` is ``p`` or a view of all of ``p`` with its shape and strides up to size-1 dimensions
    (``p.squeeze(1).unsqueeze(1)``)."""
    if w is p:
        return True
    if not isinstance(w, Tensor) or w._base is not p:
        return False
    if w.data_ptr() != p.data_ptr() or tuple(w.shape) != tuple(p.shape):
        return False
    return all(a == b for a, b, n in zip(w.stride(), p.stride(), p.shape) if n != 1)


def _arg(args, kwargs, i, name, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _tuple(v, d):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * d


class _Record(_CostateHook):
    """Tensor hook on a tapped call's output: the capture's own costate hook, with the output
    gradient first put in the child's layout (``"columns"``: ``W @ t`` holds time steps as columns,
    the child's rows are their transposes)."""

    __slots__ = ("layout",)

    def __init__(self, capture, key, x, layout):
        super().__init__(capture, key, x, ((x,), {}))
        self.layout = layout

    def __call__(self, grad: Tensor):
        return super().__call__(grad.transpose(-1, -2) if self.layout == "columns" else grad)


class _Mode(TorchFunctionMode):
    def __init__(self, tap: "ParentTap"):
        super().__init__()
        self.tap = tap

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _CONVS or func in _LINEARS or func in _MATMULS:
            self.tap.seen(func, args, kwargs, out)
        return out


class ParentTap(FunctionTap):
    """The pre-hook / hook pair of one parent (see the module docstring); ``keys`` maps each
    tapped child module to its capture key."""

    def __init__(self, capture, parent: nn.Module):
        super().__init__(capture)
        self.parent_ref = weakref.ref(parent)
        self.keys: Dict[nn.Module, str] = {}
        self.inside = 0  # > 0 while a tapped child's own forward runs (its own hook records that call)

    def mode(self) -> "_Mode":
        return _Mode(self)

    def active(self, cap, module) -> bool:
        return bool(self.keys) and cap.recording(module)

    def _match(self, func, args, kwargs) -> Optional[Tuple[str, Tensor, str]]:
        """``(key, state, layout)`` when the call applies a tapped child's weight as the child
        itself would, else None."""
        for child, key in self.keys.items():
            w = child._parameters.get("weight")
            if w is None:
                continue
            if func in _CONVS and isinstance(child, nn.modules.conv._ConvNd) \
                    and not isinstance(child, nn.modules.conv._ConvTransposeNd):
                d = _CONVS[func]
                x, cw = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
                if d != len(child.kernel_size) or not _same(cw, w) or child.padding_mode != "zeros" \
                        or isinstance(child.padding, str):
                    continue
                got = (_tuple(_arg(args, kwargs, 3, "stride", 1), d), _tuple(_arg(args, kwargs, 4, "padding", 0), d),
                       _tuple(_arg(args, kwargs, 5, "dilation", 1), d), _arg(args, kwargs, 6, "groups", 1))
                if got != (tuple(child.stride), tuple(child.padding), tuple(child.dilation), child.groups):
                    continue
                if not _bias_ok(_arg(args, kwargs, 2, "bias"), child):
                    continue
                return key, x, "rows"
            if not isinstance(child, nn.Linear):
                continue
            if func in _LINEARS:
                x, lw = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
                if _same(lw, w) and _bias_ok(_arg(args, kwargs, 2, "bias"), child):
                    return key, x, "rows"
            elif func in _MATMULS and len(args) == 2:
                a, b = args
                if _same(a, w) and isinstance(b, Tensor) and b.dim() >= 2:  # W @ t, t [..., n, L]
                    return key, b.transpose(-1, -2), "columns"
                if isinstance(b, Tensor) and b.dim() == 2 and b._base is not None and _same(b.T, w):  # x @ Wᵀ
                    return key, a, "rows"
        return None

    def seen(self, func, args, kwargs, out) -> None:
        cap = self.capture_ref()
        if cap is None or self.inside or not isinstance(out, Tensor) or not out.requires_grad:
            return
        found = self._match(func, args, kwargs)
        if found is None:
            return
        key, x, layout = found
        if isinstance(x, Tensor):
            out.register_hook(_Record(cap, key, x.detach(), layout))


class _Inside:
    """Forward pre-hook / hook of a tapped child: while the child's own forward runs (a parent that
    does call it, as transformers' quantized path calls ``dt_proj``), its calls are not tapped — the
    child's forward hook records them."""

    def __init__(self, tap: ParentTap):
        self.tap = tap

    def pre(self, module, args, kwargs):
        self.tap.inside += 1

    def post(self, module, args, kwargs, output):
        self.tap.inside = max(0, self.tap.inside - 1)


def _bias_ok(bias, child) -> bool:
    """The call adds the child's own bias, or none (a bias the library adds to the product later:
    only the children of :data:`FUNCTIONAL_CHILDREN` are tapped, checked against their source)."""
    return bias is None or bias is child._parameters.get("bias")


#: (capture, parent) → its tap
_TAPS: "weakref.WeakKeyDictionary[nn.Module, ParentTap]" = weakref.WeakKeyDictionary()


def attach_parent_tap(capture, root: nn.Module, key: str, module: nn.Module) -> bool:
    """If ``module`` (named ``key`` in ``root``) is a child whose parent applies its weight
    functionally (:data:`FUNCTIONAL_CHILDREN`), make the parent's :class:`ParentTap` record it into
    ``capture``'s entry ``key``; returns whether it did."""
    parent_name, _, child = key.rpartition(".")
    if not key:
        return False
    try:
        parent = root.get_submodule(parent_name) if parent_name else root
    except AttributeError:
        return False
    if not tapped_child(parent, child) or getattr(parent, child, None) is not module:
        return False
    tap = _TAPS.get(parent)
    if tap is None or tap.capture_ref() is not capture:
        tap = ParentTap(capture, parent)
        _TAPS[parent] = tap
    if module not in tap.keys:
        tap.keys[module] = key
        capture.add_tap(module, _Inside(tap))
    tap.keys[module] = key
    capture.add_tap(parent, tap)
    return True
