"""Adapters: what each kind of controlled module contributes to the closed-form E-MSA.

An adapter knows, for one module type, how an input becomes state rows ``X`` (N×n), how the gradient
at the output becomes costate rows (N×m), how the weight is viewed as the m×n matrix ``W`` of
``y = W x + b``, and how many samples ``B`` a call carries. Nothing else: no mathematics, no hooks.
Adapters are found with :func:`adapter_for` while walking ``model.named_modules()``.

Controlled (closed form): ``nn.Linear`` (inputs ``[..., n]``: leading dimensions become rows, ``B``
is the size of the first dimension; a 1-D input is one sample), ``nn.Conv1d`` and ``nn.Conv2d`` with
``groups == 1`` (im2col patches are rows: ``N = B × output positions``, ``n = C_in·∏k``,
``m = C_out``; every padding mode and ``padding='same'`` are supported).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AffineAdapter", "LinearAdapter", "ConvAdapter", "adapter_for", "FALLBACK_MODULE_TYPES"]

#: Modules whose parameters have no closed form by design; they silently take the fallback step.
FALLBACK_MODULE_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.PReLU,
)


class AffineAdapter:
    """Interface of an affine module ``y = W x + b`` seen row-wise."""

    def batch_size(self, module: nn.Module, x: Tensor) -> int:
        raise NotImplementedError

    def input_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def output_rows(self, module: nn.Module, grad_out: Tensor) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def weight_shape_2d(module: nn.Module) -> Tuple[int, int]:
        w = module.weight
        return w.shape[0], w[0].numel()


class LinearAdapter(AffineAdapter):
    """``nn.Linear``: rows are the input's last dimension, all leading dimensions flattened."""

    def batch_size(self, module, x):
        return x.shape[0] if x.dim() > 1 else 1

    def input_rows(self, module, x):
        return x.reshape(-1, x.shape[-1])

    def output_rows(self, module, grad_out):
        return grad_out.reshape(-1, grad_out.shape[-1])


class ConvAdapter(AffineAdapter):
    """``nn.Conv1d`` / ``nn.Conv2d`` (``groups == 1``): im2col patches are rows.

    The costate penalty of overlapping patches is approximated by the sum over positions
    (K-FAC/KFC style); see docs/algorithms.md.
    """

    def __init__(self, spatial_dims: int):
        self.spatial_dims = spatial_dims

    def _as_batched(self, module, t: Tensor) -> Tensor:
        return t if t.dim() == self.spatial_dims + 2 else t.unsqueeze(0)

    def batch_size(self, module, x):
        return self._as_batched(module, x).shape[0]

    def input_rows(self, module, x):
        x = self._as_batched(module, x)
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
            padding = (0,) * self.spatial_dims
        else:
            padding = module.padding
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
        if self.spatial_dims == 1:
            x = x.unsqueeze(2)
            kernel, dilation, stride = (1,) + kernel, (1,) + dilation, (1,) + stride
            padding = (0,) + tuple(padding)
        cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    def output_rows(self, module, grad_out):
        g = self._as_batched(module, grad_out)
        return g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])


_LINEAR = LinearAdapter()
_CONV1D = ConvAdapter(1)
_CONV2D = ConvAdapter(2)


def adapter_for(module: nn.Module) -> Optional[AffineAdapter]:
    """The adapter of a controlled module, or None if the module has no closed form.

    Subclasses count only if they keep the base class's ``forward`` (a custom forward may not be
    affine in the weight).
    """
    for base, adapter in ((nn.Linear, _LINEAR), (nn.Conv1d, _CONV1D), (nn.Conv2d, _CONV2D)):
        if isinstance(module, base) and type(module).forward is base.forward:
            if base is not nn.Linear and module.groups != 1:
                return None
            return adapter
    return None
