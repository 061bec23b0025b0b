"""The first layer's costate for YOPO: which module is the first layer, and a thin hook that records
``∂J/∂y₀`` at its output during an ordinary backward pass.

Why a hook of its own rather than :class:`pmptrain.capture.ModuleCapture`: the capture folds each
call into curvature statistics row by row (``Σxxᵀ``, ``Σggᵀ``) and owns its modules — a second
capture registered on a module removes the first one's hooks ("one optimizer per module"). YOPO needs
the costate as one unfolded tensor in the layout of the layer's output, and must run *beside* a
pmptrain optimizer (E-MSA) that captures the same layer for its own step. So the hook follows the
capture's pattern — a forward hook attaches a tensor hook to the output, the tensor hook hands the
gradient on and lets go — but records only that tensor, for one call, and owns nothing.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["find_first_layer", "is_affine_in_input", "FirstLayerCostate"]

_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def find_first_layer(model: nn.Module, first: Union[None, str, nn.Module] = None) -> Tuple[str, nn.Module]:
    """``(name, module)`` of the first layer: ``first`` by name or as a module of ``model``, or
    (``None``) the first module in ``named_modules()`` order that has parameters of its own
    (a leaf: ``Linear``, ``Conv2d``, …). Whether it really receives the model's input is checked
    at the first forward pass (:class:`FirstLayerCostate`)."""
    if isinstance(first, str):
        mods = dict(model.named_modules())
        if first not in mods:
            names = [n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
            raise ValueError(f"first: no module named {first!r} in the model; modules with parameters: "
                             f"{names[:10]}")
        return first, mods[first]
    if isinstance(first, nn.Module):
        for n, m in model.named_modules():
            if m is first:
                return n, m
        raise ValueError(f"first: the module {type(first).__name__} is not part of the model")
    if first is not None:
        raise TypeError(f"first: expected None, a module name or a module, got {type(first).__name__}")
    for n, m in model.named_modules():
        if any(True for _ in m.parameters(recurse=False)):
            return n, m
    raise ValueError("first: the model has no module with parameters, so it has no first layer")


def is_affine_in_input(module: nn.Module) -> bool:
    """True for ``nn.Linear`` / ``nn.Conv{1,2,3}d`` and subclasses that keep their parent's
    ``forward``: ``f(x + η) = f(x) + Aη`` with ``A`` linear, so ``∇_η[p·f(x + η)] = Aᵀp`` does not
    depend on η."""
    for cls in _AFFINE:
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return True
    return False


class FirstLayerCostate:
    """Records, for the next forward pass that runs through ``module`` on the input ``expect``,
    the layer's input (as the layer saw it) and, when the backward pass reaches its output,
    ``g = ∂J/∂y₀`` (the costate is ``p = −g``).

    Usage::

        rec = FirstLayerCostate(module)
        rec.arm(x_adv)             # the tensor passed to the model
        loss = loss_fn(model(x_adv), y); loss.backward()
        g = rec.grad               # ∂loss/∂y₀, shape of the layer's output
        rec.input_shape            # the layer's input shape (a reshape of x_adv, e.g. after Flatten)
        rec.remove()

    Raises ``RuntimeError`` at the forward pass if the layer's input is not ``expect`` or a view of
    it with the same elements (a normalisation or any other computation between the model's input
    and the layer would make "the perturbation enters through the first layer alone" false).
    """

    def __init__(self, module: nn.Module, name: str = "first"):
        self.module, self.name = module, name
        self._expect: Optional[Tensor] = None
        self.grad: Optional[Tensor] = None
        self.input_shape: Optional[torch.Size] = None
        self._handle = module.register_forward_hook(self._forward)

    def arm(self, expect: Tensor) -> None:
        self._expect, self.grad, self.input_shape = expect, None, None

    def _forward(self, module, args, output):
        expect = self._expect
        if expect is None or not torch.is_grad_enabled():
            return None
        self._expect = None
        x = args[0] if args else None
        same = isinstance(x, Tensor) and (x is expect or (
            x.numel() == expect.numel() and x.data_ptr() == expect.data_ptr() and x.is_contiguous()
            and expect.is_contiguous()))
        if not same:
            raise RuntimeError(
                f"YOPO: the first layer {self.name!r} ({type(module).__name__}) does not receive the model's "
                "input (or a reshape of it): the perturbation must enter through that layer alone. Pass "
                "first= the module that consumes the input, and fold any normalisation into the model "
                "after it or into the data.")
        self.input_shape = x.shape
        if isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(self._backward)
        return None

    def _backward(self, grad: Tensor):
        self.grad = grad.detach()
        return None

    def remove(self) -> None:
        self._handle.remove()
