r"""Affine views: hookable stand-ins for the affine maps a module computes inside one fused call.

Some modules apply their parameters as affine maps that no hook can see: ``nn.LSTM`` runs every
layer, direction and time step in one fused kernel (``W_ih x_t + b_ih`` and ``W_hh h_{t−1} + b_hh``
at every step); Mixtral's experts keep ``E`` expert matrices in one 3-D tensor and apply each to the
tokens routed to it; Mixtral's router returns a tuple. For such a *host* module this file defines

* its **views** — small ``nn.Module`` objects (not children of the model: they are not in
  ``state_dict`` or ``model.modules()``) that hold the host's own ``Parameter`` objects and compute one
  affine map each: :class:`LinearView` ``y = W x + b`` (as ``nn.Linear``), :class:`RoutedView`
  ``y_i = W_{e_i} x_i`` (one matrix per expert, the block rows of a grouped unit);
* its **unrolled forward** — the host's computation written with the views, the same mathematics as
  the host's own forward (checked against it to 1e-12 in float64 in ``tests/test_views.py``).

While an optimizer captures the views (their forward hooks are registered), a forward hook on the
host replaces the fused output by the unrolled one in training mode under autograd, so the capture's
ordinary hooks record every call of every view: a view used at every time step is a shared module
called T times (every call contributes, docs/algorithms.md §2 "Recurrent layers"). Otherwise (eval,
``no_grad``, no optimizer) the host's own forward stands, at its own speed.

:func:`views_of` gives ``[(suffix, view)]`` of a host (None for other modules); the optimizer shell
puts each view in the rule table as the unit ``host_name.suffix``.
"""

from __future__ import annotations

import weakref
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modules import (
    BiasAdapter,
    ConvTransposeAdapter,
    EmbeddingBagAdapter,
    LinearAdapter,
    RoutedAdapter,
    SequenceLinearAdapter,
    unsupported_reason,
)

__all__ = ["AffineView", "LinearView", "RoutedView", "views_of", "unrolled_forward"]


class AffineView(nn.Module):
    """A view of affine parameters of a host module (see the module docstring). ``view_adapter``:
    the :mod:`pmptrain.modules` adapter the capture and the rules use for it."""

    view_adapter = None

    def __init__(self, weight: Tensor, bias: Optional[Tensor]):
        super().__init__()
        self.register_parameter("weight", weight)
        self.register_parameter("bias", bias)


class LinearView(AffineView):
    """``y = W x + b`` (``nn.Linear``'s map) with the host's ``W``, ``b``. A call's first dimension
    is its samples: ``[B, T, n]`` for a whole sequence of B samples, ``[B, n]`` for one step."""

    def __init__(self, weight, bias):
        super().__init__(weight, bias)
        self.view_adapter = SequenceLinearAdapter()
        #: the sequences of the host's current ``PackedSequence`` batch (None: a padded call, whose
        #: first dimension is its samples); set by the unrolled forward at every call
        self.packed_samples: Optional[int] = None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class RoutedView(AffineView):
    """``y_i = W_{e_i} x_i`` for a weight ``W`` stored ``[E, m, n]`` (one matrix per expert, no
    bias) applied to routed rows: the call takes the rows in *block form* ``X [N, E·n]`` — row ``i``
    holds ``x_i`` in block ``e_i`` and zeros elsewhere — and the experts ``e [N]``, and returns
    ``Y [N, E·m]`` with ``y_i`` in block ``e_i`` (zeros elsewhere). In this form the rows are those
    of a grouped unit with ``E`` groups (:class:`~pmptrain.modules.RoutedAdapter`): the diagonal
    blocks of ``ΣXᵀX`` and ``ΣYᵀY``-gradients are each expert's own statistics. Each expert's matrix
    product runs on its own tokens only."""

    def __init__(self, weight):
        super().__init__(weight, None)
        self.view_adapter = RoutedAdapter()

    @property
    def groups(self) -> int:
        return self.weight.shape[0]

    def forward(self, x_blocks: Tensor, experts: Tensor) -> Tensor:
        e_count, m, n = self.weight.shape
        rows = torch.arange(x_blocks.shape[0], device=x_blocks.device)
        x = x_blocks.view(-1, e_count, n)[rows, experts]
        out = x.new_zeros(x.shape[0], e_count, m)
        for e in torch.unique(experts).tolist():
            sel = (experts == e).nonzero().squeeze(1)
            out = out.index_put((sel, torch.full_like(sel, e)), F.linear(x[sel], self.weight[e]))
        return out.reshape(-1, e_count * m)


class BilinearView(AffineView):
    """``nn.Bilinear``'s ``y_k = x₁ᵀ A_k x₂ + b_k`` as a Linear on the outer-product state
    ``z = x₁ ⊗ x₂`` (``n₁·n₂`` features): ``y = A z + b`` with ``A`` = the weight ``[out, n₁, n₂]``
    flattened to ``[out, n₁·n₂]``. Every row is a sample (as ``nn.Linear``)."""

    def __init__(self, host):
        super().__init__(host.weight, host.bias)
        self.view_adapter = LinearAdapter()

    def forward(self, z: Tensor) -> Tensor:
        return F.linear(z, self.weight.flatten(1), self.bias)


def _bilinear_forward(host, views, args, kwargs):
    x1 = args[0] if args else kwargs["input1"]
    x2 = args[1] if len(args) > 1 else kwargs["input2"]
    return views[""]((x1.unsqueeze(-1) * x2.unsqueeze(-2)).flatten(-2))


class EmbeddingBagView(AffineView):
    """``nn.EmbeddingBag`` in ``sum``/``mean`` mode: ``F.embedding_bag`` with the host's settings;
    its first argument, the bags in compact form ``[bags, K, 2]``, is the state the capture reads
    (:class:`~pmptrain.modules.EmbeddingBagAdapter`), the output is computed by the kernel."""

    def __init__(self, host):
        super().__init__(host.weight, None)
        self.view_adapter = EmbeddingBagAdapter()
        self.host_settings = (host.mode, host.include_last_offset, host.padding_idx)

    def forward(self, bags: Tensor, input: Tensor, offsets, per_sample_weights) -> Tensor:
        mode, last, pad = self.host_settings
        return F.embedding_bag(input, self.weight, offsets, None, 2.0, False, mode, False, per_sample_weights,
                               last, pad)


def _embedding_bag_forward(host, views, args, kwargs):
    """``nn.EmbeddingBag.forward`` through the view, with each bag's (index, weight) pairs."""
    names = ("input", "offsets", "per_sample_weights")
    x, offsets, psw = (args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names))
    if x.dim() == 2:
        bags = x.shape[0]
        bag_of = torch.arange(bags, device=x.device).repeat_interleave(x.shape[1])
        flat = x.reshape(-1)
    else:
        offs = offsets if not host.include_last_offset else offsets[:-1]
        bags = offs.numel()
        bag_of = torch.searchsorted(offs, torch.arange(x.numel(), device=x.device), right=True) - 1
        flat = x
    w = psw.reshape(-1).to(host.weight.dtype) if psw is not None else host.weight.new_ones(flat.numel())
    if host.padding_idx is not None:
        w = w * (flat != host.padding_idx)
    if host.mode == "mean":
        size = torch.zeros(bags, dtype=w.dtype, device=w.device).index_add_(0, bag_of, (w != 0).to(w.dtype))
        w = w / size.clamp(min=1)[bag_of]
    slot = torch.arange(flat.numel(), device=x.device) - torch.searchsorted(
        bag_of, bag_of, right=False)  # position of each element inside its bag (bag_of is sorted)
    k = int(slot.max()) + 1 if flat.numel() else 1
    compact = host.weight.new_zeros(bags, k, 2)
    compact[bag_of, slot, 0] = flat.to(compact.dtype)
    compact[bag_of, slot, 1] = w.detach()
    return views[""](compact, x, offsets, psw)


class ConvTransposeView(AffineView):
    """The weight part of ``nn.ConvTranspose1d/2d/3d``: ``conv_transposeNd(x, W)`` with the host's
    stride, padding, output padding, dilation and groups (the output size is fixed by the host's
    call; ``groups > 1``: a grouped unit, one block per group)."""

    def __init__(self, host):
        super().__init__(host.weight, None)
        self.dims = len(host.kernel_size)
        self.view_adapter = ConvTransposeAdapter(self.dims, grouped=host.groups > 1)
        for k in ("kernel_size", "stride", "padding", "dilation", "groups"):
            setattr(self, k, getattr(host, k))

    def forward(self, x: Tensor, output_padding) -> Tensor:
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[self.dims - 1]
        return fn(x, self.weight, None, self.stride, self.padding, output_padding, self.groups, self.dilation)


class BiasView(AffineView):
    """``y = x + b`` per channel of dimension 1 (a transposed convolution's bias)."""

    def __init__(self, bias):
        super().__init__(None, bias)
        self.view_adapter = BiasAdapter()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias.reshape((-1,) + (1,) * (x.dim() - 2)) if x.dim() > 1 else x + self.bias


def _conv_transpose_views(host) -> List[Tuple[str, AffineView]]:
    views = [("", ConvTransposeView(host))]
    if host.bias is not None:
        views.append(("bias", BiasView(host.bias)))
    return views


def _conv_transpose_forward(host, views, args, kwargs):
    """``nn.ConvTransposeNd.forward``: the weight map, then the bias (``output_size`` as the host
    resolves it)."""
    x = args[0] if args else kwargs["input"]
    output_size = args[1] if len(args) > 1 else kwargs.get("output_size")
    dims = len(host.kernel_size)
    pad = host._output_padding(x, output_size, host.stride, host.padding, host.kernel_size, dims, host.dilation)
    y = views[""](x, pad)
    return views["bias"](y) if "bias" in views else y


def _blocks(x: Tensor, experts: Tensor, count: int) -> Tensor:
    """Rows ``x [N, n]`` in block form ``[N, count·n]`` (row ``i`` in block ``experts[i]``)."""
    out = x.new_zeros(x.shape[0], count, x.shape[1])
    rows = torch.arange(x.shape[0], device=x.device)
    return out.index_put((rows, experts), x).reshape(x.shape[0], -1)


def _unblock(y: Tensor, experts: Tensor, count: int) -> Tensor:
    rows = torch.arange(y.shape[0], device=y.device)
    return y.view(y.shape[0], count, -1)[rows, experts]


# ------------------------------------------------------------------------------ recurrent layers

_GATES = {"RNN": 1, "LSTM": 4, "GRU": 3}


def _rnn_kind(host) -> str:
    if isinstance(host, nn.LSTM) or isinstance(host, nn.LSTMCell):
        return "LSTM"
    if isinstance(host, nn.GRU) or isinstance(host, nn.GRUCell):
        return "GRU"
    return "RNN"


def _rnn_views(host) -> List[Tuple[str, AffineView]]:
    out = []
    for k in range(host.num_layers):
        for sfx in ("", "_reverse")[: 2 if host.bidirectional else 1]:
            for part in ("ih", "hh"):
                w = getattr(host, f"weight_{part}_l{k}{sfx}")
                b = getattr(host, f"bias_{part}_l{k}{sfx}") if host.bias else None
                out.append((f"{part}_l{k}{sfx}", LinearView(w, b)))
            if getattr(host, "proj_size", 0) > 0:
                out.append((f"hr_l{k}{sfx}", LinearView(getattr(host, f"weight_hr_l{k}{sfx}"), None)))
    return out


def _cell_views(host) -> List[Tuple[str, AffineView]]:
    return [(part, LinearView(getattr(host, f"weight_{part}"), getattr(host, f"bias_{part}") if host.bias else None))
            for part in ("ih", "hh")]


def _cell_step(kind: str, nonlinearity: str, gi: Tensor, h: Tensor, c: Optional[Tensor],
               hh: Callable[[Tensor], Tensor]):
    """One step of torch's recurrences from the input part ``gi = W_ih x + b_ih`` and the hidden map
    ``hh(h) = W_hh h + b_hh``: returns ``(h', c')`` (``c'`` None but for the LSTM)."""
    gh = hh(h)
    if kind == "RNN":
        pre = gi + gh
        return (torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)), None
    if kind == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, -1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c_new), c_new
    ir, iz, inn = gi.chunk(3, -1)
    hr, hz, hn = gh.chunk(3, -1)
    r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
    n = torch.tanh(inn + r * hn)
    return (1.0 - z) * n + z * h, None


def _rnn_layers(host, views: Dict[str, AffineView], layer_in, h0, c0, prepare, direction):
    """The layer and direction loop of both recurrent forwards: for layer ``k`` and direction ``d``
    the input map ``ih_l{k}`` (``_reverse`` for ``d = 1``) is called once on ``prepare(layer_in)``,
    then ``direction(d, gi, hh, hr, h_0, c_0)`` runs the time steps (``hh``/``hr``: the hidden and
    projection maps; ``h_0, c_0``: that layer and direction's initial states) and returns
    ``(outputs, h, c)``; the directions' outputs are concatenated on the last dimension, with
    dropout between layers in training, as torch's kernels do. Returns ``(last layer's outputs,
    h_n, c_n)`` (``c_n`` None without cell states)."""
    dirs = 2 if host.bidirectional else 1
    h_n, c_n = [], []
    for k in range(host.num_layers):
        outs = []
        for d, sfx in enumerate(("", "_reverse")[:dirs]):
            gi = views[f"ih_l{k}{sfx}"](prepare(layer_in))
            c_init = c0[k * dirs + d] if c0 is not None else None
            out, h, c = direction(d, gi, views[f"hh_l{k}{sfx}"], views.get(f"hr_l{k}{sfx}"), h0[k * dirs + d], c_init)
            outs.append(out)
            h_n.append(h)
            if c is not None:
                c_n.append(c)
        layer_in = outs[0] if dirs == 1 else torch.cat(outs, -1)
        if host.dropout > 0 and host.training and k < host.num_layers - 1:
            layer_in = F.dropout(layer_in, host.dropout, True)
    return layer_in, torch.stack(h_n), (torch.stack(c_n) if c_n else None)


def _rnn_forward(host, views: Dict[str, AffineView], args, kwargs):
    """``nn.RNN/LSTM/GRU.forward`` unrolled through the views (padded tensors and ``PackedSequence``)."""
    x = args[0] if args else kwargs["input"]
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    packed = isinstance(x, nn.utils.rnn.PackedSequence)
    for v in views.values():
        v.packed_samples = int(x.batch_sizes[0]) if packed and x.batch_sizes.numel() else None
    if packed:
        return _rnn_forward_packed(host, views, x, hx)
    kind = _rnn_kind(host)
    batched = x.dim() == 3
    if not batched:
        x = x.unsqueeze(1)
    elif host.batch_first:
        x = x.transpose(0, 1)
    seq, batch = x.shape[0], x.shape[1]
    dirs = 2 if host.bidirectional else 1
    proj = getattr(host, "proj_size", 0)
    h_out = proj if proj > 0 else host.hidden_size
    if kind == "LSTM":
        h0, c0 = hx if hx is not None else (None, None)
    else:
        h0, c0 = hx, None
    if h0 is None:
        h0 = x.new_zeros(host.num_layers * dirs, batch, h_out)
    elif not batched:
        h0 = h0.unsqueeze(1)
    if kind == "LSTM":
        if c0 is None:
            c0 = x.new_zeros(host.num_layers * dirs, batch, host.hidden_size)
        elif not batched:
            c0 = c0.unsqueeze(1)
    nonlin = host.nonlinearity if kind == "RNN" else ""

    def direction(d, gi, hh, hr, h, c):
        ys = [None] * seq
        for t in (range(seq - 1, -1, -1) if d == 1 else range(seq)):
            h, c = _cell_step(kind, nonlin, gi[:, t], h, c, hh)
            if hr is not None:
                h = hr(h)
            ys[t] = h
        return torch.stack(ys), h, c

    # one input-map call per layer and direction: [B, T, G·H]
    out, h_n, c_n = _rnn_layers(host, views, x, h0, c0, lambda t: t.transpose(0, 1), direction)
    if not batched:
        out, h_n = out.squeeze(1), h_n.squeeze(1)
        c_n = c_n.squeeze(1) if c_n is not None else None
    elif host.batch_first:
        out = out.transpose(0, 1)
    return (out, (h_n, c_n)) if kind == "LSTM" else (out, h_n)


def _rnn_forward_packed(host, views: Dict[str, AffineView], x, hx):
    """``nn.RNN/LSTM/GRU.forward`` of a ``PackedSequence`` through the views, as torch's packed
    kernel computes it: the sequences are sorted by length (``x.sorted_indices``), and at step
    ``t`` only the first ``b_t = batch_sizes[t]`` are active. The input map is one call on the
    packed rows (``[Σ_t b_t, n]``: every valid step, no padding); the hidden map is called at every
    step on the ``b_t`` active states only. Forward in time a finished sequence keeps its last state
    (its ``h_n``); backward in time a sequence starts at its own last step from its ``h_0``. So the
    captured rows are exactly the valid steps, and a sample is a sequence (``packed_samples``)."""
    kind = _rnn_kind(host)
    data, sizes = x.data, x.batch_sizes.tolist()
    order, unorder = x.sorted_indices, x.unsorted_indices
    seq, batch = len(sizes), sizes[0]
    starts = [0]
    for b in sizes:
        starts.append(starts[-1] + b)
    dirs = 2 if host.bidirectional else 1
    proj = getattr(host, "proj_size", 0)
    h_out = proj if proj > 0 else host.hidden_size
    h0, c0 = (hx if hx is not None else (None, None)) if kind == "LSTM" else (hx, None)
    h0 = data.new_zeros(host.num_layers * dirs, batch, h_out) if h0 is None else \
        (h0.index_select(1, order) if order is not None else h0)
    if kind == "LSTM":
        c0 = data.new_zeros(host.num_layers * dirs, batch, host.hidden_size) if c0 is None else \
            (c0.index_select(1, order) if order is not None else c0)
    nonlin = host.nonlinearity if kind == "RNN" else ""

    def direction(d, gi, hh, hr, hs, cs):
        ys = [None] * seq
        if d == 0:
            h, c = hs, cs
            for t in range(seq):
                b = sizes[t]
                ht, ct = _cell_step(kind, nonlin, gi[starts[t]:starts[t + 1]], h[:b],
                                    c[:b] if c is not None else None, hh)
                if hr is not None:
                    ht = hr(ht)
                ys[t] = ht
                h = torch.cat([ht, h[b:]]) if b < batch else ht  # finished sequences keep their state
                c = (torch.cat([ct, c[b:]]) if b < batch else ct) if c is not None else None
        else:
            h = c = None
            for t in range(seq - 1, -1, -1):
                b, was = sizes[t], (h.shape[0] if h is not None else 0)
                if b > was:  # sequences whose last step is t start from their h_0
                    h = hs[:b] if h is None else torch.cat([h, hs[was:b]])
                    if cs is not None:
                        c = cs[:b] if c is None else torch.cat([c, cs[was:b]])
                h, c = _cell_step(kind, nonlin, gi[starts[t]:starts[t + 1]], h, c, hh)
                if hr is not None:
                    h = hr(h)
                ys[t] = h
        return torch.cat(ys), h, c

    # one input-map call per layer and direction on the packed rows [Σ b_t, features]
    layer_in, h_n, c_n = _rnn_layers(host, views, data, h0, c0, lambda t: t, direction)
    if unorder is not None:
        h_n = h_n.index_select(1, unorder)
        c_n = c_n.index_select(1, unorder) if c_n is not None else None
    out = nn.utils.rnn.PackedSequence(layer_in, x.batch_sizes, order, unorder)
    return (out, (h_n, c_n)) if kind == "LSTM" else (out, h_n)


def _cell_forward(host, views: Dict[str, AffineView], args, kwargs):
    """``nn.RNNCell/LSTMCell/GRUCell.forward`` through the views."""
    x = args[0] if args else kwargs["input"]
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    kind = _rnn_kind(host)
    batched = x.dim() == 2
    if not batched:
        x = x.unsqueeze(0)
    if kind == "LSTM":
        h, c = hx if hx is not None else (None, None)
    else:
        h, c = hx, None
    h = x.new_zeros(x.shape[0], host.hidden_size) if h is None else (h if batched else h.unsqueeze(0))
    if kind == "LSTM":
        c = x.new_zeros(x.shape[0], host.hidden_size) if c is None else (c if batched else c.unsqueeze(0))
    h, c = _cell_step(kind, getattr(host, "nonlinearity", ""), views["ih"](x), h, c, views["hh"])
    if not batched:
        h = h.squeeze(0)
        c = c.squeeze(0) if c is not None else None
    return (h, c) if kind == "LSTM" else h


# ----------------------------------------------------------------------------- mixture of experts

_MIXTRAL = "transformers.models.mixtral.modeling_mixtral."


def _experts_views(host) -> List[Tuple[str, AffineView]]:
    return [("gate_up_proj", RoutedView(host.gate_up_proj)), ("down_proj", RoutedView(host.down_proj))]


def _experts_forward(host, views, args, kwargs):
    """Mixtral's ``MixtralExperts.forward``: each token goes to its top-k experts, ``act(gate)·up``
    of ``gate_up_proj[e]``, then ``down_proj[e]``, weighted by the routing weight and summed."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    hidden, index, weights = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))
    count = host.num_experts
    tokens = torch.arange(hidden.shape[0], device=hidden.device).repeat_interleave(index.shape[1])
    experts, w = index.reshape(-1), weights.reshape(-1)
    keep = experts < count  # index == num_experts marks a token routed nowhere (expert parallelism)
    tokens, experts, w = tokens[keep], experts[keep], w[keep]
    h = _unblock(views["gate_up_proj"](_blocks(hidden[tokens], experts, count), experts), experts, count)
    gate, up = h.chunk(2, dim=-1)
    a = host.act_fn(gate) * up
    y = _unblock(views["down_proj"](_blocks(a, experts, count), experts), experts, count)
    y = y * w[:, None]
    return torch.zeros_like(hidden).index_add_(0, tokens, y.to(hidden.dtype))


def _router_forward(host, views, args, kwargs):
    """Mixtral's ``MixtralTopKRouter.forward`` with ``F.linear(x, weight)`` through the view."""
    x = (args[0] if args else kwargs["hidden_states"]).reshape(-1, host.hidden_dim)
    logits = views[""](x)
    probs = F.softmax(logits.float(), dim=-1)
    top, idx = torch.topk(probs, host.top_k, dim=-1)
    top = top / top.sum(dim=-1, keepdim=True)
    return logits, top, idx


# --------------------------------------------------------------------------------------- hosts

#: host class → (views builder, unrolled forward); by class for torch, by qualified name otherwise
_HOSTS: Dict[type, Tuple[Callable, Callable]] = {
    nn.RNN: (_rnn_views, _rnn_forward), nn.LSTM: (_rnn_views, _rnn_forward), nn.GRU: (_rnn_views, _rnn_forward),
    nn.RNNCell: (_cell_views, _cell_forward), nn.LSTMCell: (_cell_views, _cell_forward),
    nn.GRUCell: (_cell_views, _cell_forward),
    nn.Bilinear: (lambda host: [("", BilinearView(host))], _bilinear_forward),
    nn.EmbeddingBag: (lambda host: [("", EmbeddingBagView(host))], _embedding_bag_forward),
    nn.ConvTranspose1d: (_conv_transpose_views, _conv_transpose_forward),
    nn.ConvTranspose2d: (_conv_transpose_views, _conv_transpose_forward),
    nn.ConvTranspose3d: (_conv_transpose_views, _conv_transpose_forward),
}
_HOSTS_BY_NAME: Dict[str, Tuple[Callable, Callable]] = {
    _MIXTRAL + "MixtralTopKRouter": (lambda host: [("", LinearView(host.weight, None))], _router_forward),
}


def _is_fused_experts(module: nn.Module) -> bool:
    """Experts in the layout of transformers' ``@use_experts_implementation`` (Mixtral, Qwen2-MoE,
    …) that :func:`_experts_forward` computes: ``gate_up_proj [E, 2F, d]`` (gate and up
    concatenated, not transposed), ``down_proj [E, d, F]``, no biases, no post-expert norm."""
    w1, w2 = module._parameters.get("gate_up_proj"), module._parameters.get("down_proj")
    if w1 is None or w2 is None or w1.dim() != 3 or w2.dim() != 3 or not hasattr(module, "act_fn"):
        return False
    layout = dict(has_gate=True, is_concatenated=True, is_transposed=False, has_bias=False,
                  has_post_expert_norm=False)
    if any(getattr(module, k, None) is not v for k, v in layout.items()):
        return False
    e, f2, d = w1.shape
    return getattr(module, "num_experts", None) == e and tuple(w2.shape) == (e, d, f2 // 2) \
        and set(module._parameters) == {"gate_up_proj", "down_proj"}


def _host_spec(module: nn.Module):
    t = type(module)
    spec = _HOSTS.get(t)
    if spec is not None:
        if unsupported_reason(module) is not None:
            return None  # e.g. EmbeddingBag(mode="max"): the fallback
        return spec
    spec = _HOSTS_BY_NAME.get(f"{t.__module__}.{t.__qualname__}")
    if spec is None and _is_fused_experts(module):
        spec = (_experts_views, _experts_forward)
    return spec


def _mismatch(ours, theirs) -> Optional[float]:
    """The largest relative difference between two (nested) outputs, or None when they agree to the
    precision of their dtype."""
    if isinstance(theirs, (tuple, list)):
        if not isinstance(ours, (tuple, list)) or len(ours) != len(theirs):
            return float("inf")
        worst = [_mismatch(a, b) for a, b in zip(ours, theirs)]
        worst = [w for w in worst if w is not None]
        return max(worst) if worst else None
    if not isinstance(theirs, Tensor) or not theirs.is_floating_point():
        return None if not isinstance(theirs, Tensor) or torch.equal(ours, theirs) else float("inf")
    if ours.shape != theirs.shape:
        return float("inf")
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(theirs.dtype, 2e-2)
    a, b = ours.detach().double(), theirs.detach().double()
    err = float((a - b).abs().max()) / (float(b.abs().max()) + 1e-30) if b.numel() else 0.0
    return err if err > tol else None


class _HostHook:
    """Forward hook of a host: the unrolled output while its views are being captured. The first
    such call is checked against the host's own output (a host whose library changed its forward
    would otherwise be trained on a model that is not the user's): a mismatch raises."""

    __slots__ = ("views", "forward", "checked")

    def __init__(self, views: Dict[str, AffineView], forward: Callable):
        self.views, self.forward, self.checked = views, forward, False

    def __call__(self, host, args, kwargs, output):
        if not host.training or not torch.is_grad_enabled():
            return None
        if not any(v._forward_hooks for v in self.views.values()):
            return None
        for v in self.views.values():
            v.training = True
        ours = self.forward(host, self.views, args, kwargs)
        if not self.checked and not getattr(host, "dropout", 0):  # dropout draws its own mask
            err = _mismatch(ours, output)
            if err is not None:
                raise RuntimeError(
                    f"pmptrain: the unrolled forward of {type(host).__name__} differs from the module's own "
                    f"forward (relative difference {err:.2e}); please report it, and pass exclude=[<its name>] "
                    "to train it by the fallback meanwhile")
            self.checked = True
        return ours

    def __reduce__(self):
        from .capture import _Inert

        return (_Inert, ())


#: host → (its views in order, the hook handle); rebuilt when the host's parameters were replaced
_VIEWS: "weakref.WeakKeyDictionary[nn.Module, Tuple[List[Tuple[str, AffineView]], object]]" = \
    weakref.WeakKeyDictionary()


def views_of(module: nn.Module) -> Optional[List[Tuple[str, AffineView]]]:
    """``[(suffix, view)]`` of a host module (None for any other module); the unit of a view is
    named ``host_name.suffix`` (the host's own name for suffix ``""``). The first call installs the
    host's forward hook (inert until an optimizer captures the views, and in copies of the model)."""
    spec = _host_spec(module)
    if spec is None:
        return None
    build, forward = spec
    own = [id(p) for p in module.parameters(recurse=False)]
    cached = _VIEWS.get(module)
    if cached is not None:
        views, handle = cached
        if sorted(id(p) for _, v in views for p in v.parameters()) == sorted(own):
            return views
        handle.remove()
    views = build(module)
    # prepended: the user's own forward hooks see the unrolled output (equal to the fused one)
    handle = module.register_forward_hook(_HostHook(dict(views), forward), with_kwargs=True, prepend=True)
    _VIEWS[module] = (views, handle)
    return views


def unrolled_forward(module: nn.Module, *args, **kwargs):
    """The host's forward computed through its views (what the optimizer uses while capturing);
    for tests and benchmarks."""
    spec = _host_spec(module)
    if spec is None:
        raise TypeError(f"{type(module).__name__} is not a module with affine views")
    views = dict(views_of(module))
    return spec[1](module, views, args, kwargs)
