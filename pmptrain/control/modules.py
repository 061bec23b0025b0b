r"""Control modules: what :func:`pmptrain.control.attach` puts into a frozen network.

Fine-tuning as optimal control (docs/control.md): the pretrained network is a frozen dynamical
system ``x_{t+1} = f_t(x_t)`` and fine-tuning adds a control ``u_t`` to it,

* :class:`LoRALinear` — a *linear control on a Linear's state*: ``y = W x + b + (α/r)·B A x``
  (Hu et al., ICLR 2022, read as a control by Zhang, Cheng, Xu & Li, ICML 2024), i.e. the weight
  delta ``ΔW = (α/r)·B A``;
* :class:`ParallelControl` — a *state-based control spanning a block* ``F`` (a residual block
  ``F(x) = x + f(x)``): ``y = F(x) + (α/r)·B A x`` (Zhang, Ren, Cheng & Li, ICML 2025);
* :class:`NonlinearControl` — the nonlinear controller of Zhang, Cheng, Xu & Li (ICML 2024) in
  parallel with a block: ``v = B(A x + a) + b``, ``u = v + softmax(v vᵀ) v`` (the affinity runs over
  the token axis, causally masked with ``causal=True``), ``y = F(x) + α·u``;
* :class:`BinaryControl` (``kind="binary"``/``"ternary"``) — a high-rank control
  ``y = F(x) + s_B·B_q (s_A·A_q x)`` whose matrices ``A_q, B_q`` hold codes exactly on a grid
  (ECCV 2024, "An Optimal Control View of LoRA and Binary Controller Design for Vision
  Transformers"), discretised with :func:`pmptrain.quant.attach_discrete`, so ``DiscreteMSA`` trains
  them as bang-bang controls and ``export_packed`` bit-packs them.

Every control is made of ``nn.Linear`` pieces named ``A`` and ``B``: pmptrain's capture and
closed-form rules see each as an affine unit with its own state (``x`` for ``A``, ``A x`` for
``B``) and costate, and the frozen base keeps no optimizer state and no captured statistics (its
parameters are in no param group, so no unit and no hook is made for them).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..discrete import make_grid
from ..quant import DiscreteSpec, attach_discrete

__all__ = ["ControlBase", "LoRALinear", "ParallelControl", "NonlinearControl", "BinaryControl",
           "linear_shape", "is_transposed"]


def is_transposed(module: nn.Module) -> bool:
    """Whether ``module`` is a GPT-2-style ``Conv1D`` (weight stored ``[in, out]``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_shape(module: nn.Module):
    """``(in_features, out_features)`` of an ``nn.Linear`` or a GPT-2 ``Conv1D``, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_transposed(module) and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)
    return None


def _low_rank(d_in: int, rank: int, d_out: int, bias: bool, like: Tensor):
    """``(A, B)``: ``A`` Kaiming-uniform (a = √5, torch's Linear default), ``B`` zero — the control
    starts at ``u = 0``, so the attached model reproduces the base model exactly."""
    a = nn.Linear(d_in, rank, bias=bias, device=like.device, dtype=like.dtype)
    b = nn.Linear(rank, d_out, bias=bias, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        if bias:
            a.bias.zero_()
            b.bias.zero_()
    return a, b


def _first_param(module: nn.Module) -> Tensor:
    for p in module.parameters():
        return p
    for b in module.buffers():
        return b
    return torch.empty(0)


class ControlBase(nn.Module):
    """A frozen module ``base`` plus a control; ``kind`` and :meth:`config` describe it for export."""

    kind = "?"

    def control_parameters(self):
        """The control's own parameters (every parameter outside ``base``)."""
        return [p for n, p in self.named_parameters() if not n.startswith("base.")]

    def config(self) -> dict:
        raise NotImplementedError

    def delta_weight(self) -> Optional[Tensor]:
        """The exact weight delta of the base's ``[out, in]`` weight, or None (not a weight delta)."""
        return None

    def merge_reason(self) -> Optional[str]:
        """None when the control folds exactly into the base weights, else why not."""
        return "it is not a weight delta of one linear map"


class LoRALinear(ControlBase):
    r"""``y = W x + b + (α/r)·B(A(dropout(x)))``: a low-rank linear control of a Linear's state.

    Args:
        base: the frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) with weight ``W`` and bias ``b``.
        rank: r ≥ 1, the inner dimension of ``A: d_in → r`` and ``B: r → d_out``.
        alpha: α (default ``rank``: scale 1), the output scale is ``α/r``.
        dropout: dropout probability on the control's input (default 0).

    ``B`` starts at zero, so the model is unchanged until the control is trained. The weight delta
    ``ΔW = (α/r)·B A`` is exact (:meth:`delta_weight`); :func:`pmptrain.control.merge` folds it in.
    """

    kind = "lora"

    def __init__(self, base: nn.Module, rank: int, alpha: Optional[float] = None, dropout: float = 0.0):
        super().__init__()
        shape = linear_shape(base)
        if shape is None:
            raise TypeError(f"kind='lora' needs an nn.Linear or a GPT-2 Conv1D, got {type(base).__name__}")
        self.base = base
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / self.rank
        self.dropout = float(dropout)
        self.A, self.B = _low_rank(shape[0], self.rank, shape[1], False, base.weight)

    def forward(self, x: Tensor) -> Tensor:
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x
        return self.base(x) + self.B(self.A(h)) * self.scale

    def config(self) -> dict:
        return {"kind": self.kind, "rank": self.rank, "alpha": self.alpha, "dropout": self.dropout}

    def delta_weight(self) -> Tensor:
        return (self.B.weight @ self.A.weight) * self.scale

    def merge_reason(self) -> Optional[str]:
        return None


class ParallelControl(ControlBase):
    r"""``y = F(x) + (α/r)·B(A x)``: a state-based control spanning the block ``F``.

    When ``F(x) = x + f(x)`` is a residual block this is ``x + f(x) + u(x)`` (Zhang, Ren, Cheng & Li,
    ICML 2025). ``x`` is the block's first positional argument (or its ``hidden_states`` keyword);
    a tuple output (Hugging Face layers) gets the control added to its first entry.

    Args:
        base: the frozen block ``F``; its input and output have ``d`` features (``dim``).
        rank, alpha, dropout: as :class:`LoRALinear`.
        dim: ``d`` (default: found from the first Linear / LayerNorm of the block).
        bias: biases on ``A`` and ``B`` (default False).

    Memory (docs/control.md, "The memory argument"): autograd keeps only ``x`` and ``A x`` for the
    control, and nothing of the block that the frozen block's own input gradient would not keep
    anyway; a weight control inside each Linear of the block keeps each Linear's input.
    """

    kind = "parallel"

    def __init__(self, base: nn.Module, rank: int, alpha: Optional[float] = None, dropout: float = 0.0,
                 dim: Optional[int] = None, bias: bool = False):
        super().__init__()
        self.base = base
        self.dim = int(dim if dim is not None else _block_dim(base))
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / self.rank
        self.dropout = float(dropout)
        self.bias = bool(bias)
        self.A, self.B = _low_rank(self.dim, self.rank, self.dim, self.bias, _first_param(base))

    def control(self, x: Tensor) -> Tensor:
        """``u(x) = (α/r)·B(A(dropout(x)))``."""
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x
        return self.B(self.A(h)) * self.scale

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        return _add_to_output(self.base(*args, **kwargs), self.control(x))

    def config(self) -> dict:
        return {"kind": self.kind, "rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "dim": self.dim, "bias": self.bias}


class NonlinearControl(ParallelControl):
    r"""The nonlinear controller of Zhang, Cheng, Xu & Li (ICML 2024) in parallel with a block.

    ``v = B(A x + a) + b`` (``A: d → r``, ``B: r → d``, with biases; ``B`` and ``b`` start at
    zero), ``u = v + softmax(v vᵀ) v`` with the affinity ``v vᵀ`` over the token axis (dim −2 of a
    ``[..., T, d]`` state; a ``[N, d]`` state is one token per sample, where ``u = 2v``), and
    ``y = F(x) + α·u``.

    Args:
        base, rank, dim, dropout: as :class:`ParallelControl`.
        alpha: α (default 1.0).
        causal: mask the affinity so that token t mixes tokens ≤ t only (default False, the paper;
            a causal language model needs True, otherwise the control reads the future).

    Note: the paper's controller (czhang024/ICML-ANC) has no causal mask and no α; both are
    additions for decoder models.
    """

    kind = "nonlinear"

    def __init__(self, base: nn.Module, rank: int, alpha: Optional[float] = None, dropout: float = 0.0,
                 dim: Optional[int] = None, causal: bool = False):
        super().__init__(base, rank, 1.0 if alpha is None else alpha, dropout, dim, bias=True)
        self.scale = self.alpha  # no 1/r: α multiplies u
        self.causal = bool(causal)

    def control(self, x: Tensor) -> Tensor:
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x
        v = self.B(self.A(h))
        if v.dim() < 3:
            return (v + v) * self.scale  # one token: softmax over one entry is 1
        scores = v @ v.transpose(-1, -2)
        if self.causal:
            t = v.shape[-2]
            mask = torch.ones(t, t, dtype=torch.bool, device=v.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        return (v + torch.softmax(scores, dim=-1) @ v) * self.scale

    def config(self) -> dict:
        return {**super().config(), "causal": self.causal}


class BinaryControl(ControlBase):
    r"""A high-rank control with weights on a grid: ``y = F(x) + s_B·B_q(s_A·A_q x)``.

    ``A_q: d_in → R`` and ``B_q: R → d_out`` hold codes exactly on ``levels`` (binary ``{−1, +1}``
    or ternary ``{−1, 0, +1}``), registered with :func:`pmptrain.quant.attach_discrete` (scale
    parametrization ``weight = s·codes``): ``s_A = 1/√d_in`` is a fixed buffer (``A_q x`` has unit
    scale per entry), ``s_B`` is a trainable scalar that starts at 0, so the model is unchanged
    until trained. :class:`~pmptrain.DiscreteMSA` trains the codes — with box constraints PMP's
    maximiser is bang-bang, at a vertex of the box, i.e. a code — and its fallback trains ``s_B``.

    Args:
        base: the frozen Linear/``Conv1D`` (``target="linear"``: the control acts on its input and adds
            to its output) or block (``target="block"``: in parallel with it, as
            :class:`ParallelControl`).
        rank: R, the inner dimension (high rank is cheap: 1–2 bits per entry).
        levels: ``"binary"`` or ``"ternary"`` (any grid ``pmptrain.make_grid`` accepts).
        dim: the feature dimension of a block (default: found from the block).
        seed: the seed of the codes' initial draw (uniform over the grid; default 0).
    """

    def __init__(self, base: nn.Module, rank: int, levels="binary", dim: Optional[int] = None, seed: int = 0):
        super().__init__()
        self.base = base
        shape = linear_shape(base)
        self.on_linear = shape is not None
        if shape is None:
            d = int(dim if dim is not None else _block_dim(base))
            shape = (d, d)
        self.d_in, self.d_out = shape
        self.rank = int(rank)
        self.grid = make_grid(levels)
        self.kind = self.grid.name if self.grid.name in ("binary", "ternary") else "discrete"
        self.levels = levels if isinstance(levels, (str, int)) else list(self.grid.values)
        self.seed = int(seed)
        like = _first_param(base)
        self.A = nn.Linear(self.d_in, self.rank, bias=False, device=like.device, dtype=like.dtype)
        self.B = nn.Linear(self.rank, self.d_out, bias=False, device=like.device, dtype=like.dtype)
        gen = torch.Generator().manual_seed(self.seed)
        q = self.grid.tensor(like.dtype)
        codes_a = q[torch.randint(0, len(q), (self.rank, self.d_in), generator=gen)].to(like.device)
        codes_b = q[torch.randint(0, len(q), (self.d_out, self.rank), generator=gen)].to(like.device)
        s_a = torch.tensor(1.0 / math.sqrt(self.d_in), dtype=like.dtype, device=like.device)
        s_b = torch.zeros((), dtype=like.dtype, device=like.device)
        attach_discrete(self.A, DiscreteSpec(self.grid, "tensor", False), codes_a, s_a)
        attach_discrete(self.B, DiscreteSpec(self.grid, "tensor", True), codes_b, s_b)

    def control(self, x: Tensor) -> Tensor:
        return self.B(self.A(x))

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        return _add_to_output(self.base(*args, **kwargs), self.control(x))

    def config(self) -> dict:
        return {"kind": self.kind, "rank": self.rank, "levels": self.levels, "dim": self.d_in,
                "seed": self.seed}

    def delta_weight(self) -> Optional[Tensor]:
        if not self.on_linear:
            return None
        return self.B.weight @ self.A.weight

    def merge_reason(self) -> Optional[str]:
        if self.on_linear:
            return None
        return "it spans a block (a state-based control), not a weight delta of one linear map"


def _add_to_output(out, u: Tensor):
    if isinstance(out, Tensor):
        return out + u
    if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
        return (out[0] + u,) + tuple(out[1:])
    if hasattr(out, "last_hidden_state"):  # a ModelOutput
        out.last_hidden_state = out.last_hidden_state + u
        return out
    raise TypeError(f"a parallel control adds to a tensor (or the first entry of a tuple) output, got "
                    f"{type(out).__name__}")


def _block_dim(block: nn.Module) -> int:
    """The feature dimension of a residual block: the input size of its first Linear/Conv1D, else
    the size of its first LayerNorm/RMSNorm."""
    for m in block.modules():
        shape = linear_shape(m)
        if shape is not None:
            return shape[0]
        w = getattr(m, "weight", None)
        if "Norm" in type(m).__name__ and isinstance(w, Tensor) and w.dim() == 1:
            return int(w.numel())
    raise ValueError(f"cannot find the feature dimension of {type(block).__name__}: pass dim=")
