"""Adapters: what each kind of affine module contributes to the closed-form E-MSA.

An adapter knows, for one module type, how a call's input becomes state rows ``X`` (N×n) — or, for an
embedding, index rows —, how the gradient at the output becomes costate rows (N×m), how many samples
``B`` a call carries, and how the stored weight relates to the matrix ``W`` of ``y = W x + b``.
Nothing else: no mathematics, no hooks. Adapters are found with :func:`adapter_for` while walking
``model.named_modules()``; :func:`unsupported_reason` says why a module has none.

Controlled (closed form):

* ``nn.Linear`` — inputs ``[..., n]``: leading dimensions become rows, ``B`` is the size of the first
  dimension (a 1-D input is one sample);
* ``nn.Conv1d`` / ``nn.Conv2d`` with ``groups == 1`` — im2col patches are rows (``N = B × output
  positions``, ``n = C_in·∏k``, ``m = C_out``; every padding mode and ``padding='same'``);
* ``nn.Embedding`` (dense gradients, no ``max_norm``) — a Linear on one-hot inputs: ``y = Eᵀ e_i``,
  so ``W = Eᵀ`` and the stored weight is *transposed* (V×d); the state statistic is the diagonal
  of index counts (docs/algorithms.md §2, "Embeddings").

Subclasses count only if they keep the base class's ``forward`` (a custom forward may not be affine
in the weight).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AffineAdapter",
    "LinearAdapter",
    "ConvAdapter",
    "EmbeddingAdapter",
    "adapter_for",
    "unsupported_reason",
    "is_weight_layer",
    "FALLBACK_MODULE_TYPES",
]

#: Modules whose parameters have no closed form by design; they silently take the fallback step.
FALLBACK_MODULE_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.EmbeddingBag,
    nn.PReLU,
)


class AffineAdapter:
    """Interface of an affine module ``y = W x + b`` seen row-wise.

    Attributes:
        transposed: the stored weight is ``Wᵀ`` (an embedding's V×d table), not ``W``.
        index_input: inputs are integer indices (one-hot states), not feature rows.
    """

    transposed = False
    index_input = False

    def batch_size(self, module: nn.Module, x: Tensor) -> int:
        raise NotImplementedError

    def input_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def output_rows(self, module: nn.Module, grad_out: Tensor) -> Tensor:
        raise NotImplementedError

    def weight_shape_2d(self, module: nn.Module) -> Tuple[int, int]:
        """``(m, n)`` of ``W`` in ``y = W x + b`` (outputs, inputs)."""
        w = module.weight
        return w.shape[0], w[0].numel()

    def bias(self, module: nn.Module) -> Optional[Tensor]:
        return getattr(module, "bias", None)


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


class EmbeddingAdapter(AffineAdapter):
    """``nn.Embedding``: ``y = Eᵀ e_i`` — a Linear with ``W = Eᵀ`` on one-hot states ``e_i``.

    Input rows are the flattened indices (one row per looked-up index); ``B`` is the size of the
    first dimension (``[B, T]`` indices: B samples of T rows; a 1-D index tensor: one sample per
    index). The weight is stored transposed (``E`` is V×d), and there is no bias.
    """

    transposed = True
    index_input = True

    def batch_size(self, module, x):
        return x.shape[0] if x.dim() >= 1 else 1

    def input_rows(self, module, x):
        return x.reshape(-1)

    def output_rows(self, module, grad_out):
        return grad_out.reshape(-1, grad_out.shape[-1])

    def weight_shape_2d(self, module):
        v, d = module.weight.shape
        return d, v

    def bias(self, module):
        return None


_LINEAR = LinearAdapter()
_CONV1D = ConvAdapter(1)
_CONV2D = ConvAdapter(2)
_EMBEDDING = EmbeddingAdapter()
_TABLE = ((nn.Linear, _LINEAR), (nn.Conv1d, _CONV1D), (nn.Conv2d, _CONV2D), (nn.Embedding, _EMBEDDING))


def _match(module: nn.Module):
    for base, adapter in _TABLE:
        if isinstance(module, base):
            return base, adapter
    return None, None


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why ``module`` (of an affine base type) has no adapter, or None if it has one / is not of an
    affine base type at all."""
    base, _ = _match(module)
    if base is None:
        return None
    if type(module).forward is not base.forward:
        return f"{type(module).__name__} overrides {base.__name__}.forward (it may not be affine in its weight)"
    if not isinstance(module.__dict__.get("_parameters", {}).get("weight"), nn.Parameter):
        return "its weight is not a Parameter of the module (a parametrization or a plain tensor)"
    if base in (nn.Conv1d, nn.Conv2d) and module.groups != 1:
        return f"grouped convolution (groups={module.groups}) has no closed form yet"
    if base is nn.Embedding:
        if module.sparse:
            return "sparse embedding gradients (sparse=True) are not supported"
        if module.max_norm is not None:
            return "max_norm renormalises the weight inside forward (not an affine map of it)"
    return None


def adapter_for(module: nn.Module) -> Optional[AffineAdapter]:
    """The adapter of a controlled module, or None if the module has no closed form
    (see :func:`unsupported_reason`)."""
    base, adapter = _match(module)
    if base is None or unsupported_reason(module) is not None:
        return None
    return adapter


def is_weight_layer(module: nn.Module) -> bool:
    """A Linear/Conv1d/Conv2d layer (any subclass, any ``groups``): the layers whose weights
    :func:`pmptrain.discretize_` can put onto a grid."""
    base, _ = _match(module)
    return base in (nn.Linear, nn.Conv1d, nn.Conv2d)
