"""Adapters: what each kind of controlled module contributes to the closed-form E-MSA.

An adapter knows, for one module type, how a call's input becomes *state rows* and the gradient at
its output *costate rows*, how many samples a call carries, and how the stored parameters relate to
the controlled map. Nothing else: no mathematics, no hooks. Adapters are found with
:func:`adapter_for` while walking ``model.named_modules()``; :func:`unsupported_reason` says why a
module has none; :func:`register_module_type` adds a user's own module type.

Three kinds (``adapter.kind``):

* ``"matrix"`` — ``y = W x + b``: ``nn.Linear``; the transposed-weight ``Conv1D`` of GPT-2-style
  models (``y = x W + b``, weight stored ``[in, out]``); ``nn.Conv1d/2d/3d`` with ``groups == 1``
  (im2col patches are rows); ``nn.Embedding`` (``y = Eᵀ e_i`` on one-hot states, weight stored
  transposed, diagonal state statistics).
* ``"grouped"`` — grouped and depthwise ``nn.Conv1d/2d/3d``: ``groups`` independent blocks of the
  matrix kind sharing the rows; the fused expert weights of a mixture of experts
  (:class:`RoutedAdapter`: rows in block form).
* ``"channel"`` — the elementwise affine ``y = γ ⊙ x̂ + β`` of a normalisation layer: ``nn.LayerNorm``,
  ``nn.RMSNorm``, ``nn.GroupNorm``, ``nn.BatchNorm1d/2d/3d``, ``nn.InstanceNorm1d/2d/3d`` (with
  affine parameters), and the RMSNorm classes of Hugging Face's Llama, Mistral, Qwen2/3 and Phi-3.
  The normalisation is fixed dynamics before the controlled affine; the state is ``x̂``.
  ``nn.PReLU`` is this kind with ``x̂ = min(x, 0)`` and no bias.

Modules whose affine maps run inside one fused call (``nn.LSTM``, ``nn.ConvTranspose2d``, Mixtral's
experts) are controlled through *views* of their parameters (:mod:`pmptrain.views`), whose
adapters are :class:`SequenceLinearAdapter`, :class:`RoutedAdapter`, :class:`ConvTransposeAdapter`
and :class:`BiasAdapter`.

Classes not listed are recognised by what they compute (:mod:`pmptrain.probe`): a module with one
1-D ``weight`` (and ``bias``) whose forward matches LayerNorm, RMSNorm, ``(1 + w)`` RMSNorm or
channels-first LayerNorm, and an ``nn.Embedding`` subclass computing ``s·E[i]``.
:func:`bypassed_by_parent` names children whose parent reads their parameters without calling
them (``nn.MultiheadAttention.out_proj``): hooks on them would see nothing.

**What a sample is** (``batch_size``; docs/algorithms.md §1): for layers that act on the last
dimension row by row — Linear, Conv1D, Embedding, LayerNorm, RMSNorm — every row (token) is a
sample, so a fixed number of tokens gives the same step however it is split into B × T. For
convolutions and the batch/group/instance norms a sample is one entry of the batch dimension (an
image or a sequence), whose output positions are its rows.

Subclasses count only if they keep the base class's ``forward`` (a custom forward may not be affine
in the parameters); register them with :func:`register_module_type` otherwise.
"""

from __future__ import annotations

import itertools
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .symmetric import conv2d_patch_gram, shifted_gram_pays

__all__ = [
    "AffineAdapter",
    "LinearAdapter",
    "TransposedLinearAdapter",
    "ConvAdapter",
    "EmbeddingAdapter",
    "ChannelAffineAdapter",
    "LayerNormAdapter",
    "RMSNormAdapter",
    "BatchNormAdapter",
    "GroupNormAdapter",
    "ChannelsFirstLayerNormAdapter",
    "PReLUAdapter",
    "ConvTransposeAdapter",
    "EmbeddingBagAdapter",
    "BiasAdapter",
    "SequenceLinearAdapter",
    "RoutedAdapter",
    "adapter_for",
    "registration_hint",
    "unsupported_reason",
    "register_module_type",
    "unregister_module_type",
    "is_weight_layer",
    "bypassed_by_parent",
]


class AffineAdapter:
    """Interface of a module seen row-wise.

    Attributes:
        kind: ``"matrix"`` (``y = Wx + b``), ``"grouped"`` (block-diagonal W) or ``"channel"``
            (per-channel scale and shift).
        transposed: the stored weight is ``Wᵀ`` (an embedding's V×d table, GPT-2's ``Conv1D``).
        index_input: inputs are integer indices (one-hot states), not feature rows.
        weight_name / bias_name: the attributes holding the parameters.
    """

    kind = "matrix"
    transposed = False
    index_input = False
    weight_name = "weight"
    bias_name = "bias"

    def batch_size(self, module: nn.Module, x: Tensor) -> int:
        raise NotImplementedError

    def input_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def output_rows(self, module: nn.Module, grad_out: Tensor) -> Tensor:
        raise NotImplementedError

    def weight(self, module: nn.Module) -> Optional[Tensor]:
        return module._parameters.get(self.weight_name) if self.weight_name else None

    def bias(self, module: nn.Module) -> Optional[Tensor]:
        return module._parameters.get(self.bias_name) if self.bias_name else None

    def weight_shape_2d(self, module: nn.Module) -> Tuple[int, int]:
        """``(m, n)`` of ``W`` in ``y = W x + b`` (outputs, inputs)."""
        w = self.weight(module)
        return w.shape[0], w[0].numel()

    def groups(self, module: nn.Module) -> int:
        return 1

    def batched(self, module: nn.Module, x: Tensor) -> bool:
        """Whether ``x`` and the output gradient share a leading dimension along which a call may
        be split into parts (the capture folds large calls in slices)."""
        return x.dim() >= 2


# ---------------------------------------------------------------------------------- row-wise


def _rows_of(x: Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() > 0 else 1


class LinearAdapter(AffineAdapter):
    """``nn.Linear``: rows are the input's last dimension, all leading dimensions flattened; every
    row is a sample."""

    def batch_size(self, module, x):
        return _rows_of(x)

    def input_rows(self, module, x):
        return x.reshape(-1, x.shape[-1])

    def output_rows(self, module, grad_out):
        return grad_out.reshape(-1, grad_out.shape[-1])


class TransposedLinearAdapter(LinearAdapter):
    """``y = x W + b`` with ``W`` stored ``[in, out]`` (GPT-2's ``Conv1D``): a Linear whose stored
    weight is the transpose of ``W`` in ``y = Wx + b``."""

    transposed = True

    def weight_shape_2d(self, module):
        n, m = self.weight(module).shape
        return m, n


class SequenceLinearAdapter(LinearAdapter):
    """A :class:`~pmptrain.views.LinearView`: ``y = W x + b`` on calls whose first dimension is the
    samples — ``[B, T, n]`` (a whole sequence) or ``[B, n]`` (one time step); a sample is one
    sequence, its time steps are its rows (docs/algorithms.md §2, "Recurrent layers"). Calls of a
    host's ``PackedSequence`` batch carry only valid steps (``[Σ_t b_t, n]``, ``[b_t, n]``); their
    samples are the batch's sequences, which the view holds (``packed_samples``)."""

    def batch_size(self, module, x):
        packed = getattr(module, "packed_samples", None)
        if packed is not None:
            return packed
        return x.shape[0] if x.dim() >= 2 else 1


class EmbeddingBagAdapter(AffineAdapter):
    """A :class:`~pmptrain.views.EmbeddingBagView`: ``y_b = Eᵀ c_b`` with ``c_b = Σ_{i∈b} w_i e_{idx_i}``
    the bag's weighted index counts (``w_i`` = 1, the per-sample weight, or ``1/|b|`` in mean mode):
    a Linear with ``W = Eᵀ`` stored transposed whose state rows are the dense ``c_b`` (``n = V``);
    a sample is a bag. The call carries the bags compactly, ``[bags, K, 2]`` (index, weight; padded
    with weight 0), and :meth:`input_rows` scatters them into ``c_b``."""

    transposed = True
    bias_name = None

    def weight_shape_2d(self, module):
        v, d = module.weight.shape
        return d, v

    def batch_size(self, module, x):
        return x.shape[0]

    def input_rows(self, module, x):
        v = module.weight.shape[0]
        return x.new_zeros(x.shape[0], v).scatter_add_(1, x[..., 0].long(), x[..., 1])

    def output_rows(self, module, grad_out):
        return grad_out.reshape(-1, grad_out.shape[-1])


class RoutedAdapter(AffineAdapter):
    """A :class:`~pmptrain.views.RoutedView`: ``E`` expert matrices stored ``[E, m, n]``, rows in
    block form (``x_i`` in the block of its expert): the ``"grouped"`` kind with ``E`` groups whose
    rows are zero outside their own block. Every routed row is a sample (a token's row per expert)."""

    kind = "grouped"
    bias_name = None

    def groups(self, module):
        return module.weight.shape[0]

    def weight_shape_2d(self, module):
        e, m, n = module.weight.shape
        return e * m, e * n

    def batch_size(self, module, x):
        return x.shape[0]

    def input_rows(self, module, x):
        return x

    def output_rows(self, module, grad_out):
        return grad_out


class EmbeddingAdapter(AffineAdapter):
    """``nn.Embedding``: ``y = Eᵀ e_i`` — a Linear with ``W = Eᵀ`` on one-hot states ``e_i``. Input
    rows are the flattened indices; every index is a sample. No bias."""

    transposed = True
    index_input = True
    bias_name = None
    #: ``y = s·Eᵀ e_i``: the state is ``s·e_i`` (Gemma's scaled embedding), so ``C_x`` is ``s²``
    #: times the index counts / B
    state_scale = 1.0

    def __init__(self, state_scale: float = 1.0):
        self.state_scale = float(state_scale)

    def batch_size(self, module, x):
        return max(1, x.numel())

    def batched(self, module, x):
        return x.dim() >= 1

    def input_rows(self, module, x):
        return x.reshape(-1)

    def output_rows(self, module, grad_out):
        return grad_out.reshape(-1, grad_out.shape[-1])

    def weight_shape_2d(self, module):
        v, d = module.weight.shape
        return d, v


# ------------------------------------------------------------------------------ convolutions


def _patch_rows(x: Tensor, kernel, dilation, stride) -> Tensor:
    """The im2col rows of an already padded ``[N, C, *spatial]`` input: ``[N·∏out, C·∏k]``, one row
    per output position, columns in the weight's flattening order ``(c, k_1, …, k_d)``.

    Built as one ``torch.stack`` of the ``∏k`` shifted (strided) views of the channels-last input, so
    the rows are written once (``F.unfold`` + transpose writes them twice); the same numbers as
    ``F.unfold`` (pure copies, tested). The channels-last copy is made contiguous first: the shifted
    views then gather from contiguous rows of C, not with a stride of the whole image (the small
    CNN's 16-channel rows: 13 → 4 ms on one thread, docs/performance.md "Speed per second")."""
    d = len(kernel)
    xl = x.movedim(1, -1).contiguous()  # [N, *spatial, C]
    out = [(x.shape[2 + i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(d)]
    views = []
    for offset in itertools.product(*(range(k) for k in kernel)):
        idx = (slice(None),) + tuple(
            slice(o * dilation[i], o * dilation[i] + (out[i] - 1) * stride[i] + 1, stride[i])
            for i, o in enumerate(offset))
        views.append(xl[idx])
    return torch.stack(views, dim=-1).reshape(-1, x.shape[1] * math.prod(kernel))


class _SpatialAdapter(AffineAdapter):
    """What convolutions and transposed convolutions share: ``spatial_dims`` (1, 2, 3), the
    ``"matrix"`` kind or, with ``groups > 1`` (``grouped=True``), the ``"grouped"`` kind; an unbatched
    input ``[C, *spatial]`` is one sample."""

    def __init__(self, spatial_dims: int, grouped: bool = False):
        self.spatial_dims = spatial_dims
        self.kind = "grouped" if grouped else "matrix"

    def groups(self, module):
        return module.groups

    def _as_batched(self, t: Tensor) -> Tensor:
        return t if t.dim() == self.spatial_dims + 2 else t.unsqueeze(0)

    def batch_size(self, module, x):
        return self._as_batched(x).shape[0]

    def batched(self, module, x):
        return x.dim() == self.spatial_dims + 2


class ConvAdapter(_SpatialAdapter):
    """``nn.Conv1d/2d/3d``: im2col patches are rows (``n = C_in/groups·∏k`` per group,
    ``m = C_out/groups``), every sample (batch entry) has ``L = output positions`` rows. With
    ``groups > 1`` the kind is ``"grouped"``: the state columns and costate columns of group ``j``
    are the ``j``-th blocks.

    The costate penalty of overlapping patches is approximated by the sum over positions
    (K-FAC/KFC style); see docs/algorithms.md.
    """

    def weight_shape_2d(self, module):
        w = module.weight
        return w.shape[0], w[0].numel() * module.groups  # the block-diagonal W, all groups

    def _padded(self, module, x):
        x = self._as_batched(x)
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            return F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        if any(module.padding):
            return F.pad(x, tuple(p for p in reversed(module.padding) for _ in range(2)))
        return x

    def input_rows(self, module, x):
        return _patch_rows(self._padded(module, x), module.kernel_size, module.dilation, module.stride)

    def input_gram(self, module, x, dtype) -> Optional[Tuple[Tensor, Tensor]]:
        """``(XᵀX, Σx)`` of :meth:`input_rows` without forming the rows, where that is cheaper: a
        ``Conv2d`` with stride 1, dilation 1 and one group, large enough that
        :func:`~pmptrain.symmetric.conv2d_patch_gram` pays (``shifted_gram_pays``); None otherwise."""
        if (self.spatial_dims != 2 or module.groups != 1 or tuple(module.stride) != (1, 1)
                or tuple(module.dilation) != (1, 1)):
            return None
        xp = self._padded(module, x)
        kernel = module.kernel_size
        out_hw = (xp.shape[2] - kernel[0] + 1, xp.shape[3] - kernel[1] + 1)
        pad = module.padding[0] if module.padding_mode == "zeros" and not isinstance(module.padding, str) else 0
        if not shifted_gram_pays(out_hw, kernel, xp.shape[1], (pad, pad)):
            return None
        return conv2d_patch_gram(xp.to(dtype), kernel, zero_rows=(pad, pad))

    def output_rows(self, module, grad_out):
        g = self._as_batched(grad_out)
        return g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])


class ConvTransposeAdapter(_SpatialAdapter):
    """A :class:`~pmptrain.views.ConvTransposeView` (``nn.ConvTranspose1d/2d/3d`` without its bias,
    ``groups = 1``) as the adjoint of a convolution: every *input* position ``i`` contributes
    ``z_i = Mᵀ x_i`` to the kernel window of outputs it reaches (``M`` = the weight stored
    ``[C_in, C_out·∏k]``), and the output is ``col2im`` of the ``z_i``. So it is the matrix kind with
    ``W = Mᵀ`` stored transposed: state rows are the input's pixels ``x_i`` (``C_in``), costate rows
    ``∂J/∂z_i`` are the im2col patches of the output gradient at the input positions
    (``C_out·∏k``). The costate penalty is exact; the state penalty of overlapping windows is
    approximated by the sum over input positions (the adjoint of a convolution's K-FAC
    approximation; docs/algorithms.md §2, "Transposed convolutions"). A sample is one batch entry.

    With ``groups = g > 1`` (``grouped=True``) it is the ``"grouped"`` kind: input channels
    ``[j·C_in/g, (j+1)·C_in/g)`` reach only output channels ``[j·C_out/g, (j+1)·C_out/g)`` through
    ``M_j`` = rows ``j·C_in/g …`` of the weight, so ``W = Mᵀ`` is block-diagonal with blocks ``M_jᵀ``
    (``m/g = C_out/g·∏k`` by ``n/g = C_in/g``): group ``j``'s state columns are its input channels,
    its costate columns the patch columns of its output channels (contiguous in the ``(c, k…)``
    order of the patches), and each stored block is transposed (:attr:`transposed`)."""

    transposed = True
    bias_name = None

    def weight_shape_2d(self, module):
        w = module.weight  # [C_in, C_out/groups, *k]: W = Mᵀ is block-diagonal, one block per group
        return w[0].numel() * module.groups, w.shape[0]

    def input_rows(self, module, x):
        x = self._as_batched(x)
        return x.movedim(1, -1).reshape(-1, x.shape[1])

    def output_rows(self, module, grad_out):
        g = self._as_batched(grad_out)
        if any(module.padding):
            g = F.pad(g, tuple(p for p in reversed(module.padding) for _ in range(2)))
        return _patch_rows(g, module.kernel_size, module.dilation, module.stride)


# ------------------------------------------------------------------------- normalisation affine


class ChannelAffineAdapter(AffineAdapter):
    """``y = γ ⊙ x̂ + β`` per channel after a normalisation ``x̂ = N(x)`` (fixed dynamics).

    ``input_rows`` gives the normalised rows ``x̂`` (rows × C, computed without autograd),
    ``output_rows`` the output-gradient rows in the same layout. ``weight``/``bias``: γ, β (either
    may be absent).
    """

    kind = "channel"
    #: γ = weight + ``weight_offset`` (1 for Gemma's ``(1 + w)``): the closed form in γ moves
    #: ``weight`` by the same Δγ (the affine's Hamiltonian depends on γ only through Δγ and ``.grad``)
    weight_offset = 0.0

    def channels(self, module) -> int:
        p = self.weight(module) if self.weight(module) is not None else self.bias(module)
        return p.numel()

    def weight_shape_2d(self, module):
        c = self.channels(module)
        return c, c

    def normalize(self, module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def input_rows(self, module, x):
        with torch.no_grad():
            return self._to_rows(module, self.normalize(module, x.detach()))

    def output_rows(self, module, grad_out):
        return self._to_rows(module, grad_out)

    def _to_rows(self, module, t: Tensor) -> Tensor:
        raise NotImplementedError


class _LastDimsNorm(ChannelAffineAdapter):
    """Normalisations over the trailing ``normalized_shape`` dimensions; every row is a sample."""

    def _shape(self, module):
        """``normalized_shape`` (an int or a tuple), or the weight's shape for classes without it."""
        shape = getattr(module, "normalized_shape", None)
        if shape is None:
            shape = tuple(self.weight(module).shape)
        return tuple(shape) if not isinstance(shape, int) else (shape,)

    def _to_rows(self, module, t):
        return t.reshape(-1, math.prod(self._shape(module)))

    def batch_size(self, module, x):
        k = len(self._shape(module))
        return max(1, x.numel() // math.prod(x.shape[x.dim() - k:])) if x.dim() > k else 1

    def batched(self, module, x):
        return x.dim() > len(self._shape(module))


class LayerNormAdapter(_LastDimsNorm):
    """``nn.LayerNorm`` (and classes with ``normalized_shape``/``eps`` attributes that call
    ``F.layer_norm``): ``x̂ = (x − mean)/√(var + eps)`` over the trailing dimensions (biased var)."""

    def __init__(self, eps_attr: str = "eps", default_eps: float = 1e-5):
        self.eps_attr, self.default_eps = eps_attr, default_eps

    def normalize(self, module, x):
        eps = getattr(module, self.eps_attr, self.default_eps) if self.eps_attr else self.default_eps
        return F.layer_norm(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, self._shape(module),
                            eps=self.default_eps if eps is None else float(eps))


class RMSNormAdapter(_LastDimsNorm):
    """RMS normalisation over the last dimension: ``x̂ = x / √(mean(x²) + eps)`` (``nn.RMSNorm``,
    ``eps=None`` meaning the dtype's machine epsilon; Hugging Face's ``LlamaRMSNorm`` family with
    ``eps_attr="variance_epsilon"``, which normalises in float32)."""

    def __init__(self, eps_attr: Optional[str] = "eps", default_eps: Optional[float] = None,
                 weight_offset: float = 0.0):
        self.eps_attr, self.default_eps, self.weight_offset = eps_attr, default_eps, weight_offset

    def normalize(self, module, x):
        eps = getattr(module, self.eps_attr, None) if self.eps_attr else None
        eps = self.default_eps if eps is None else eps
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        if eps is None:
            eps = torch.finfo(x.dtype).eps
        dims = tuple(range(x.dim() - len(self._shape(module)), x.dim()))
        return xf * torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + float(eps))


class PReLUAdapter(ChannelAffineAdapter):
    """``nn.PReLU``: ``y = relu(x) + a ⊙ min(x, 0)`` — the channel kind with state
    ``x̂ = min(x, 0)``, no bias (``relu(x)`` is fixed drift). One slope (``num_parameters = 1``): every
    entry is a row of one channel; ``C`` slopes: channel dimension 1. A sample is one entry of the
    first dimension (the whole input when it has fewer than 2 dimensions)."""

    bias_name = None

    def normalize(self, module, x):
        return x.clamp(max=0)

    def _to_rows(self, module, t):
        if module.weight.numel() == 1:
            return t.reshape(-1, 1)
        return t.movedim(1, -1).reshape(-1, t.shape[1])

    def batch_size(self, module, x):
        return x.shape[0] if x.dim() >= 2 else 1

    def batched(self, module, x):
        return x.dim() >= 2


class _ChannelDimNorm(ChannelAffineAdapter):
    """Normalisations of ``[N, C, *]`` inputs with a per-channel affine; a sample is one entry of N."""

    def batch_size(self, module, x):
        return x.shape[0] if x.dim() > 1 else 1

    def _to_rows(self, module, t):
        if t.dim() == 1:
            return t.reshape(1, -1)
        return t.movedim(1, -1).reshape(-1, t.shape[1])


class BiasAdapter(_ChannelDimNorm):
    """A :class:`~pmptrain.views.BiasView`: ``y = x + b`` per channel of dimension 1 (the bias of a
    transposed convolution): the channel kind with only a shift; a sample is one batch entry, its
    positions are rows (the rows and samples of :class:`_ChannelDimNorm`)."""

    weight_name = None
    bias_name = "bias"

    def normalize(self, module, x):
        return x


class BatchNormAdapter(_ChannelDimNorm):
    """``nn.BatchNorm1d/2d/3d`` in train mode (batch statistics, biased variance) or without
    running statistics: ``x̂ = (x − mean_c)/√(var_c + eps)`` over all dimensions but the channel."""

    def normalize(self, module, x):
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        if not module.training and module.track_running_stats:
            mean, var = module.running_mean, module.running_var
        else:
            dims = [0] + list(range(2, x.dim()))
            mean, var = xf.mean(dims), xf.var(dims, unbiased=False)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (xf - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + module.eps)


class ChannelsFirstLayerNormAdapter(_ChannelDimNorm):
    """LayerNorm over the channel dimension of ``[N, C, *]`` inputs (ConvNeXt's ``channels_first``
    LayerNorm): ``x̂ = (x − mean_C)/√(var_C + eps)`` per sample and position, biased variance; a
    sample is one entry of N (as for the convolutions around it)."""

    def __init__(self, eps: float = 1e-6):
        self.eps = eps

    def normalize(self, module, x):
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        mu = xf.mean(1, keepdim=True)
        return (xf - mu) * torch.rsqrt((xf - mu).pow(2).mean(1, keepdim=True) + self.eps)


class GroupNormAdapter(_ChannelDimNorm):
    """``nn.GroupNorm`` (and ``nn.InstanceNorm*d``, ``groups = C``): statistics per sample and group of
    channels over the spatial positions."""

    def normalize(self, module, x):
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        groups = getattr(module, "num_groups", None) or x.shape[1]
        return F.group_norm(xf, groups, eps=module.eps)


# ------------------------------------------------------------------------------------ lookup

_LINEAR = LinearAdapter()
_CONV1D = TransposedLinearAdapter()
_EMBEDDING = EmbeddingAdapter()
_CONV = {d: ConvAdapter(d) for d in (1, 2, 3)}
_GROUPED = {d: ConvAdapter(d, grouped=True) for d in (1, 2, 3)}
_LAYER_NORM = LayerNormAdapter()
_RMS_NORM = RMSNormAdapter()
_BATCH_NORM = BatchNormAdapter()
_GROUP_NORM = GroupNormAdapter()
_PRELU = PReLUAdapter()

_BUILTIN = [
    (nn.Linear, _LINEAR), (nn.Conv1d, None), (nn.Conv2d, None), (nn.Conv3d, None), (nn.Embedding, _EMBEDDING),
    (nn.LayerNorm, _LAYER_NORM), (nn.GroupNorm, _GROUP_NORM),
    (nn.modules.batchnorm._BatchNorm, _BATCH_NORM), (nn.modules.instancenorm._InstanceNorm, _GROUP_NORM),
    (nn.PReLU, _PRELU),
]
if hasattr(nn, "RMSNorm"):
    _BUILTIN.append((nn.RMSNorm, _RMS_NORM))

#: Module classes of other libraries, by qualified name (no import of those libraries).
_BY_NAME: Dict[str, AffineAdapter] = {
    "transformers.pytorch_utils.Conv1D": _CONV1D,
    **{f"transformers.models.{m}.modeling_{m}.{c}RMSNorm": RMSNormAdapter("variance_epsilon")
       for m, c in (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3"),
                    ("phi3", "Phi3"))},
}
_REGISTERED: Dict[type, AffineAdapter] = {}


def register_module_type(cls: type, adapter: AffineAdapter) -> None:
    """Give a module type of your own a closed-form rule: its instances (exactly this class, not its
    subclasses) are controlled through ``adapter`` — one of this module's adapters, configured for
    the class's attributes, or a subclass of them. Examples::

        pmptrain.register_module_type(MyLayerNorm, LayerNormAdapter(eps_attr=None, default_eps=1e-5))
        pmptrain.register_module_type(MyRMSNorm, RMSNormAdapter(eps_attr="variance_epsilon"))
        pmptrain.register_module_type(MyTransposedLinear, TransposedLinearAdapter())

    The adapter must describe the module's forward exactly (``y = Wx + b``, ``y = xW + b``, or
    ``y = γ ⊙ N(x) + β`` with the adapter's normalisation ``N``): pmptrain cannot check that a
    forward it does not know matches. ``tests/test_layers.py`` shows how to check a registration
    (the step equals the numerical maximiser of the module's augmented Hamiltonian). Optimizers
    built afterwards use it; :func:`unregister_module_type` removes it.
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"invalid cls={cls!r}: must be an nn.Module subclass")
    if not isinstance(adapter, AffineAdapter):
        raise TypeError(f"invalid adapter={adapter!r}: must be a pmptrain.modules adapter")
    _REGISTERED[cls] = adapter


def unregister_module_type(cls: type) -> None:
    """Remove a registration of :func:`register_module_type` (a no-op for an unregistered class)."""
    _REGISTERED.pop(cls, None)


def _qualname(module: nn.Module) -> str:
    t = type(module)
    return f"{t.__module__}.{t.__qualname__}"


def _lookup(module: nn.Module):
    """``(adapter or None, reason or None)`` for a module."""
    t = type(module)
    view_adapter = getattr(module, "view_adapter", None)
    if isinstance(view_adapter, AffineAdapter):  # a pmptrain.views view of a host's parameters
        return view_adapter, None
    if t in _REGISTERED:
        return _REGISTERED[t], None
    named = _BY_NAME.get(_qualname(module))
    if named is not None:
        return named, None
    for base, adapter in _BUILTIN:
        if not isinstance(module, base):
            continue
        if t.forward is not base.forward:
            probed = _probed_embedding(module) if base is nn.Embedding else _probed(module)
            if probed is not None:
                return probed, None
            return None, (f"{t.__name__} overrides {base.__name__}.forward (it may not be affine in its "
                          "parameters); register it with pmptrain.register_module_type if it is")
        if base in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[base]
            adapter = _GROUPED[dims] if module.groups > 1 else _CONV[dims]
        if base is nn.Embedding:
            if module.sparse:
                return None, "sparse embedding gradients (sparse=True) are not supported"
            if module.max_norm is not None:
                return None, "max_norm renormalises the weight inside forward (not an affine map of it)"
        return adapter, None
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and module.padding_mode != "zeros":
        return None, "transposed convolutions support only padding_mode='zeros'"
    if isinstance(module, nn.EmbeddingBag):
        if module.mode == "max":
            return None, "mode='max' is not affine in the weight"
        if module.max_norm is not None:
            return None, "max_norm renormalises the weight inside forward (not an affine map of it)"
        if module.sparse or module.scale_grad_by_freq:
            return None, "sparse=True / scale_grad_by_freq gradients are not supported"
    return _probed(module), None


def _probed_embedding(module: nn.Module) -> Optional[AffineAdapter]:
    """An ``nn.Embedding`` subclass whose forward is ``s·E[i]`` (:func:`pmptrain.probe.recognise_scaled_embedding`),
    under the same conditions as ``nn.Embedding`` itself, or None."""
    from .probe import recognise_scaled_embedding

    if module.sparse or module.max_norm is not None:
        return None
    scale = recognise_scaled_embedding(module)
    return None if scale is None else EmbeddingAdapter(scale)


def _probed(module: nn.Module) -> Optional[AffineAdapter]:
    """The adapter of a normalisation layer recognised by what it computes
    (:func:`pmptrain.probe.recognise_norm`), or None."""
    from .probe import recognise_norm

    found = recognise_norm(module)
    if found is None:
        return None
    kind, eps = found
    if kind == "layer":
        return LayerNormAdapter(eps_attr=None, default_eps=eps)
    if kind == "layer_cf":
        return ChannelsFirstLayerNormAdapter(eps)
    return RMSNormAdapter(eps_attr=None, default_eps=eps, weight_offset=1.0 if kind == "rms_1p" else 0.0)


def registration_hint(module: nn.Module) -> Optional[str]:
    """The one-line registration that would give ``module``'s class a closed form, when an adapter
    of the right kind exists (a 1-D ``weight``: a normalisation's affine; a 2-D ``weight``: a
    Linear), or None."""
    params = dict(module.named_parameters(recurse=False))
    w = params.get("weight")
    if w is None or set(params) - {"weight", "bias"} or any(True for _ in module.children()):
        return None
    if any(isinstance(module, base) and type(module).forward is base.forward for base, _ in _BUILTIN):
        return None  # a built-in type refused for a stated reason (max_norm, sparse): not a registration matter
    cls = type(module).__name__
    if w.dim() == 1:
        return (f" If {cls} computes y = weight * N(x) + bias with a normalisation N that pmptrain did not "
                f"recognise, register it in one line: pmptrain.register_module_type({cls}, "
                "pmptrain.LayerNormAdapter(eps_attr=None, default_eps=...)) (or pmptrain.RMSNormAdapter(...)); "
                "otherwise exclude it explicitly (exclude=[...]).")
    if w.dim() == 2:
        return (f" If {cls} computes y = x @ weight.T + bias, register it in one line: "
                f"pmptrain.register_module_type({cls}, pmptrain.LinearAdapter()) (pmptrain.TransposedLinearAdapter() "
                "for y = x @ weight + bias); otherwise exclude it explicitly (exclude=[...]).")
    return None


def adapter_for(module: nn.Module) -> Optional[AffineAdapter]:
    """The adapter of a controlled module, or None (see :func:`unsupported_reason`). Only modules
    whose parameters are real Parameters of the module qualify (a parametrized weight does not)."""
    adapter, _ = _lookup(module)
    if adapter is None:
        return None
    params = [adapter.weight(module), adapter.bias(module)]
    if all(p is None for p in params):
        return None  # e.g. LayerNorm(elementwise_affine=False): nothing to control
    if adapter.kind != "channel" and not isinstance(adapter.weight(module), nn.Parameter):
        return None
    return adapter


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why ``module`` has no adapter although it is of a known type, or None."""
    adapter, reason = _lookup(module)
    if reason is not None:
        return reason
    if adapter is not None and adapter.kind != "channel" and not isinstance(adapter.weight(module), nn.Parameter):
        return "its weight is not a Parameter of the module (a parametrization or a plain tensor)"
    return None


def is_weight_layer(module: nn.Module) -> bool:
    """A Linear/Conv1d/Conv2d layer (any subclass, any ``groups``): the layers whose weights
    :func:`pmptrain.discretize_` can put onto a grid."""
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))


#: Parents that read a child's parameters without calling the child: ``{parent type: {child
#: attribute: how}}``. Hooks on such a child never see the use of its parameters, so its rule
#: could not form its Hamiltonian (the first step also detects the cases not listed here).
_BYPASSING_PARENTS: Dict[type, Dict[str, str]] = {
    nn.MultiheadAttention: {
        "out_proj": "its parent MultiheadAttention reads out_proj.weight and out_proj.bias inside "
                    "F.multi_head_attention_forward without calling out_proj",
    },
}


def bypassed_by_parent(parent: nn.Module, child_name: str) -> Optional[str]:
    """Why hooks on ``parent``'s child ``child_name`` cannot see how its parameters are used (the
    parent reads them without calling the child), or None."""
    for cls, children in _BYPASSING_PARENTS.items():
        if isinstance(parent, cls) and child_name in children:
            return children[child_name]
    return None
