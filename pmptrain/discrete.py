"""Discrete-weight MSA: grids, the EMA accumulator, the relative penalty and the elementwise argmax.

Pure mathematics: functions of tensors and scalars, importing only torch. The rules are those of
``ALGORITHMS.md`` section 3 and of

    Q. Li and S. Hao, "An Optimal Control Approach to Deep Learning and Applications to
    Discrete-Weight Neural Networks", ICML 2018.

Conventions (used everywhere in this module):

* A discrete tensor ``W`` holds *unit-grid codes*: every entry is one of the values of a
  :class:`Grid` (``{-1,+1}``, ``{-1,0,+1}``, a symmetric uniform k-bit grid or a user grid). A scale
  ``alpha`` (per tensor or per output channel), if any, lives outside the tensor (see
  ``pmptrain.quant``); the rules here act on the codes.
* ``acc`` (``M``) is an EMA of the Hamiltonian gradient ``dH/dW = -dJ/dW``: positive entries push a
  weight up.
* Ties in every argmax keep the current value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "Grid",
    "binary_grid",
    "ternary_grid",
    "uniform_grid",
    "custom_grid",
    "make_grid",
    "nearest_on_grid",
    "grid_indices",
    "on_grid",
    "ema_accumulate_",
    "penalty_scale",
    "discrete_argmax",
    "discrete_msa_step",
    "DiscreteStepStats",
    "init_scale",
    "pack_codes",
    "unpack_codes",
    "packed_nbytes",
]

_MAX_LEVELS = 256  # codes are packed into at most 8 bits


# ----------------------------------------------------------------------------------------- grids


@dataclass(frozen=True)
class Grid:
    """A finite, sorted set of unit-grid values ``Q = {q_0 < q_1 < ... < q_{G-1}}``.

    Attributes:
        values: the grid values, strictly increasing python floats.
        name: a human-readable name (``"binary"``, ``"ternary"``, ``"uniform4"``, ``"custom"``).
        bits: bits per packed code, ``ceil(log2 G)`` (at least 1); a code is the index of a value.

    Build grids with :func:`make_grid` or the named constructors; the constructor validates.
    """

    values: Tuple[float, ...]
    name: str = "custom"
    bits: int = field(default=0)

    def __post_init__(self) -> None:
        vals = tuple(float(v) for v in self.values)
        if len(vals) < 2:
            raise ValueError(f"Grid values: need at least 2 levels, got {list(vals)}")
        if len(vals) > _MAX_LEVELS:
            raise ValueError(f"Grid values: at most {_MAX_LEVELS} levels (8 bits), got {len(vals)}")
        if not all(math.isfinite(v) for v in vals):
            raise ValueError(f"Grid values: must be finite, got {list(vals)}")
        if any(b <= a for a, b in zip(vals, vals[1:])):
            raise ValueError(f"Grid values: must be strictly increasing (sorted, distinct), got {list(vals)}")
        need = max(1, math.ceil(math.log2(len(vals))))
        bits = self.bits if self.bits else need
        if not isinstance(bits, int) or bits < need or bits > 8:
            raise ValueError(f"Grid bits: need an int in [{need}, 8] for {len(vals)} levels, got {self.bits!r}")
        object.__setattr__(self, "values", vals)
        object.__setattr__(self, "bits", bits)

    def __len__(self) -> int:
        return len(self.values)

    @property
    def has_zero(self) -> bool:
        return 0.0 in self.values

    def tensor(self, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        """The grid values as a 1-D tensor of the given dtype and device."""
        return torch.tensor(self.values, dtype=dtype, device=device)

    def to_dict(self) -> dict:
        return {"values": list(self.values), "name": self.name, "bits": self.bits}

    @classmethod
    def from_dict(cls, d: dict) -> "Grid":
        return cls(tuple(d["values"]), name=str(d.get("name", "custom")), bits=int(d.get("bits", 0)))


def binary_grid() -> Grid:
    """``Q = {-1, +1}`` (1 bit). Identical to ``uniform_grid(1)``."""
    return Grid((-1.0, 1.0), name="binary", bits=1)


def ternary_grid() -> Grid:
    """``Q = {-1, 0, +1}`` (2 bits per packed code). Identical to ``uniform_grid(2, zero=True)``."""
    return Grid((-1.0, 0.0, 1.0), name="ternary", bits=2)


def uniform_grid(bits: int, zero: bool = False) -> Grid:
    """Symmetric uniform k-bit grid in ``[-1, 1]``.

    Convention (default, ``zero=False``): ``2^k`` levels, symmetric, *without* zero,

        q_i = (2i + 1 - 2^k) / (2^k - 1),   i = 0, ..., 2^k - 1,

    i.e. ``{±1/(2^k-1)·(2j+1)}``, equally spaced by ``2/(2^k-1)``, extremes ``±1``. ``k = 1`` gives
    ``{-1, +1}`` (the binary grid); ``k = 2`` gives ``{-1, -1/3, 1/3, 1}``. All ``2^k`` codes are used.

    With ``zero=True`` (``k >= 2``): the odd grid ``{i/(2^{k-1}-1) : |i| <= 2^{k-1}-1}`` with
    ``2^k - 1`` levels including 0 (one code unused); ``k = 2`` is the ternary grid.

    Args:
        bits: k, an int in [1, 8].
        zero: whether the grid contains 0 (default False).
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"uniform_grid bits: need an int in [1, 8], got {bits!r}")
    if zero:
        if bits < 2:
            raise ValueError(f"uniform_grid bits: zero=True needs bits >= 2, got {bits}")
        h = 2 ** (bits - 1) - 1
        vals = tuple(i / h for i in range(-h, h + 1))
        return Grid(vals, name="ternary" if bits == 2 else f"uniform{bits}z", bits=bits)
    n = 2**bits
    vals = tuple((2 * i + 1 - n) / (n - 1) for i in range(n))
    return Grid(vals, name="binary" if bits == 1 else f"uniform{bits}", bits=bits)


def custom_grid(values: Iterable[float], name: str = "custom") -> Grid:
    """A user grid: the values are sorted; they must be finite, distinct, 2 to 256 of them."""
    try:
        vals = sorted(float(v) for v in values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"custom_grid values: need a sequence of numbers, got {values!r}") from e
    if len(set(vals)) != len(vals):
        raise ValueError(f"custom_grid values: duplicates in {vals}")
    return Grid(tuple(vals), name=name)


def make_grid(levels: Union[str, int, Sequence[float], Grid, Tensor]) -> Grid:
    """Build a grid from ``"binary"``, ``"ternary"``, an int k (:func:`uniform_grid`), a sequence
    of values (:func:`custom_grid`) or a :class:`Grid` (returned as is)."""
    if isinstance(levels, Grid):
        return levels
    if isinstance(levels, str):
        key = levels.lower()
        if key == "binary":
            return binary_grid()
        if key == "ternary":
            return ternary_grid()
        raise ValueError(f"levels: unknown grid name {levels!r} (use 'binary', 'ternary', an int k or values)")
    if isinstance(levels, bool):
        raise ValueError(f"levels: got a bool {levels!r}")
    if isinstance(levels, int):
        return uniform_grid(levels)
    if isinstance(levels, Tensor):
        return custom_grid(levels.detach().flatten().tolist())
    if isinstance(levels, (list, tuple)):
        return custom_grid(levels)
    raise ValueError(f"levels: expected 'binary', 'ternary', an int or a sequence of values, got {levels!r}")


def grid_indices(weight: Tensor, grid: Grid) -> Tensor:
    """Index (int64) of each entry of ``weight`` in ``grid``; raises ValueError if an entry is off the grid."""
    q = grid.tensor(weight.dtype, weight.device)
    idx = torch.searchsorted(q, weight.detach().contiguous()).clamp_(max=len(grid) - 1)
    if not bool((q[idx] == weight).all()):
        bad = weight[q[idx] != weight].flatten()[:5].tolist()
        raise ValueError(f"weight: entries not on the {grid.name} grid {list(grid.values)}, e.g. {bad}")
    return idx


def on_grid(weight: Tensor, grid: Grid) -> bool:
    """Whether every entry of ``weight`` is (exactly) a value of ``grid``."""
    q = grid.tensor(weight.dtype, weight.device)
    idx = torch.searchsorted(q, weight.detach().contiguous()).clamp_(max=len(grid) - 1)
    return bool((q[idx] == weight).all())


def nearest_on_grid(x: Tensor, grid: Grid) -> Tensor:
    """Project onto the grid: ``argmin_{q∈Q} |x - q|``; an exact midpoint goes to the *larger* value
    (so ``0 -> +1`` on the binary grid: sign(0) = +1)."""
    q = grid.tensor(x.dtype, x.device)
    mid = (q[1:] + q[:-1]) / 2
    idx = torch.searchsorted(mid, x.detach().contiguous(), right=True)
    return q[idx]


# ------------------------------------------------------------------------------- the MSA rule


def ema_accumulate_(acc: Tensor, ham_grad: Tensor, a: float) -> Tensor:
    """In place ``M <- a·M + (1 - a)·g`` with ``M = acc``, ``g = ham_grad = -dJ/dW``.

    Args:
        acc: the accumulator M (modified in place and returned).
        ham_grad: the Hamiltonian gradient, i.e. *minus* the loss gradient.
        a: the EMA rate, in [0, 1] (``ALGORITHMS.md``: close to 1, e.g. 0.999).
    """
    a = float(a)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"a: EMA rate must lie in [0, 1], got {a}")
    if acc.shape != ham_grad.shape:
        raise ValueError(f"ham_grad: shape {tuple(ham_grad.shape)} != acc shape {tuple(acc.shape)}")
    return acc.mul_(a).add_(ham_grad, alpha=1.0 - a)


def _check_rho_lam(rho: float, lam: float) -> None:
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 0):
        raise ValueError(f"rho: must be a finite number >= 0, got {rho!r}")
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam: must be a finite number >= 0, got {lam!r}")


def _tie_rank(grid: Grid, device=None) -> Tensor:
    """Tie-break rank of each grid value: smaller |q| first, then the smaller value."""
    v = grid.values
    order = sorted(range(len(v)), key=lambda i: (abs(v[i]), v[i]))
    rank = [0] * len(v)
    for r, i in enumerate(order):
        rank[i] = r
    return torch.tensor(rank, dtype=torch.long, device=device)


def _chunks(n: int, g: int, budget: int = 1 << 22):
    step = max(1, budget // max(g, 1))
    for s in range(0, n, step):
        yield s, min(n, s + step)


def _scores(w: Tensor, m: Tensor, q: Tensor, qabs: Tensor, rho_k, lam: float) -> Tensor:
    """``S[i, g] = M_i q_g - λ|q_g| - (ρ_k/2)(q_g - W_i)^2`` for 1-D ``w``, ``m`` (a [n, G] tensor).

    The brute-force reference in the tests evaluates exactly these operations in this order."""
    d = q - w.unsqueeze(-1)
    s = m.unsqueeze(-1) * q - lam * qabs
    return s - (0.5 * rho_k) * (d * d)


def _argmax_keep(w: Tensor, s: Tensor, q: Tensor, rank: Tensor) -> Tensor:
    """Row-wise argmax of ``s`` over the grid with the tie rule: the current value ``w`` if it is a
    maximiser, else the maximiser closest to ``w``, then the one of smaller |q|, then the smaller q."""
    best = s.max(dim=-1, keepdim=True).values
    cand = s == best
    dist = (q - w.unsqueeze(-1)).abs()
    dist = torch.where(cand, dist, torch.full_like(dist, math.inf))
    cand = cand & (dist == dist.min(dim=-1, keepdim=True).values)
    big = torch.full_like(rank, q.numel()).expand_as(cand)
    pick = torch.where(cand, rank.expand_as(cand), big).argmin(dim=-1)
    return q[pick]


def _unpenalised_wrong(w: Tensor, m: Tensor, q: Tensor, qabs: Tensor, lam: float) -> Tensor:
    """Mask of entries whose current value is *not* a maximiser of ``M q - λ|q|`` over the grid."""
    s = m.unsqueeze(-1) * q - lam * qabs
    cur = m * w - lam * w.abs()
    return cur < s.max(dim=-1).values


def penalty_scale(acc: Tensor, weight: Tensor, grid: Grid, rho: float, lam: float = 0.0) -> Tuple[Tensor, bool]:
    """The per-step relative penalty ``ρ_k = ρ · max{ |M_ij| : W_ij ∉ argmax_{q∈Q} [M_ij q - λ|q|] }``.

    The set is the *wrong set*: entries whose current value is not a maximiser of the unpenalised
    Hamiltonian (for binary: ``M_ij W_ij < 0``; an exact tie counts as right). ``ρ`` is relative to
    the largest wrong accumulator, hence scale-free in the loss.

    Args:
        acc: the accumulator M (same shape as ``weight``).
        weight: current codes W (on ``grid``).
        grid: the grid Q.
        rho: ρ >= 0 (reference: 0.5).
        lam: λ >= 0, the sparsity weight (default 0).

    Returns:
        ``(rho_k, empty)``: ``rho_k`` a 0-dim tensor in ``acc``'s dtype (0 if the set is empty) and
        ``empty`` (bool) whether the wrong set is empty.
    """
    _check_rho_lam(rho, lam)
    if acc.shape != weight.shape:
        raise ValueError(f"acc: shape {tuple(acc.shape)} != weight shape {tuple(weight.shape)}")
    dtype = torch.promote_types(acc.dtype, weight.dtype)
    q = grid.tensor(dtype, acc.device)
    qabs = q.abs()
    w = weight.detach().reshape(-1).to(dtype)
    m = acc.detach().reshape(-1).to(dtype)
    worst = torch.zeros((), dtype=dtype, device=acc.device)
    any_wrong = False
    for s, e in _chunks(w.numel(), len(grid)):
        wrong = _unpenalised_wrong(w[s:e], m[s:e], q, qabs, lam)
        if bool(wrong.any()):
            any_wrong = True
            worst = torch.maximum(worst, m[s:e].abs()[wrong].max())
    return rho * worst, not any_wrong


def discrete_argmax(weight: Tensor, acc: Tensor, grid: Grid, rho_k, lam: float = 0.0) -> Tensor:
    """Elementwise ``W_ij <- argmax_{q∈Q} [ M_ij q - λ|q| - (ρ_k/2)(q - W_ij)^2 ]``.

    Ties keep the current value (``W`` must be on the grid); among other tied maximisers the one
    closest to ``W_ij`` wins, then the smaller ``|q|``, then the smaller ``q``. Evaluated as a
    ``[n, G]`` score table in chunks, which is exactly the brute-force rule.

    Special cases: binary flips ``W_ij`` iff ``-M_ij W_ij > ρ_k``; for a uniform grid the result is
    ``W + M/ρ_k`` rounded to the grid after the λ shrinkage. ``rho_k = None`` (an empty wrong set)
    returns an unchanged copy.

    Args:
        weight: current codes W (any shape, on ``grid``).
        acc: the accumulator M (same shape).
        grid: Q.
        rho_k: the absolute penalty ρ_k >= 0 (float or 0-dim tensor), see :func:`penalty_scale`.
        lam: λ >= 0 (default 0).

    Returns:
        A new tensor of ``weight``'s dtype and shape.
    """
    if acc.shape != weight.shape:
        raise ValueError(f"acc: shape {tuple(acc.shape)} != weight shape {tuple(weight.shape)}")
    if rho_k is None:
        return weight.detach().clone()
    if isinstance(rho_k, Tensor):
        if rho_k.numel() != 1 or not bool(torch.isfinite(rho_k).all()) or float(rho_k) < 0:
            raise ValueError(f"rho_k: must be a finite scalar >= 0, got {rho_k!r}")
    elif not (isinstance(rho_k, (int, float)) and math.isfinite(rho_k) and rho_k >= 0):
        raise ValueError(f"rho_k: must be a finite number >= 0, got {rho_k!r}")
    _check_rho_lam(0.0, lam)
    dtype = torch.promote_types(acc.dtype, weight.dtype)
    q = grid.tensor(dtype, acc.device)
    qabs, rank = q.abs(), _tie_rank(grid, acc.device)
    w = weight.detach().reshape(-1).to(dtype)
    m = acc.detach().reshape(-1).to(dtype)
    out = torch.empty_like(w)
    for s, e in _chunks(w.numel(), len(grid)):
        sc = _scores(w[s:e], m[s:e], q, qabs, rho_k, lam)
        out[s:e] = _argmax_keep(w[s:e], sc, q, rank)
    return out.reshape(weight.shape).to(weight.dtype)


@dataclass
class DiscreteStepStats:
    """Diagnostics of one discrete MSA step on one tensor (python numbers, ready for logging).

    flips: entries that changed; flip_ratio: flips / numel; density: fraction of non-zero codes after
    the step; rho_k: the absolute penalty used; empty: the wrong set was empty (tensor unchanged);
    acc_abs_mean / acc_abs_max: statistics of |M|.
    """

    flips: int
    numel: int
    flip_ratio: float
    density: float
    rho_k: float
    empty: bool
    acc_abs_mean: float
    acc_abs_max: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def discrete_msa_step(weight: Tensor, acc: Tensor, grid: Grid, rho: float, lam: float = 0.0) -> Tuple[Tensor, DiscreteStepStats]:
    """One discrete MSA update of one tensor: :func:`penalty_scale` then :func:`discrete_argmax`.

    ``ρ_k = ρ · max_{wrong} |M|``; ``W <- argmax_q [M q - λ|q| - (ρ_k/2)(q - W)^2]``; empty wrong set
    => W unchanged. The accumulator must already contain this step's gradient
    (:func:`ema_accumulate_`).

    Returns:
        ``(new_weight, stats)``; ``weight`` itself is not modified.
    """
    rho_k, empty = penalty_scale(acc, weight, grid, rho, lam)
    new = weight.detach().clone() if empty else discrete_argmax(weight, acc, grid, rho_k, lam)
    n = weight.numel()
    flips = int((new != weight).sum()) if not empty else 0
    a = acc.detach().abs()
    stats = DiscreteStepStats(
        flips=flips,
        numel=n,
        flip_ratio=flips / n if n else 0.0,
        density=float((new != 0).sum()) / n if n else 0.0,
        rho_k=float(rho_k),
        empty=bool(empty),
        acc_abs_mean=float(a.mean()) if n else 0.0,
        acc_abs_max=float(a.max()) if n else 0.0,
    )
    return new, stats


def init_scale(weight: Tensor, mode: str = "tensor") -> Tensor:
    """Scale ``α`` from init statistics: ``α = mean|W|`` per tensor (``mode="tensor"``, a 0-dim
    tensor) or per output channel (``mode="channel"``: mean over all dims but 0, shape
    ``[C_out, 1, ..., 1]``). ``α = mean|W|`` is the L2-optimal scale of ``sign(W)`` (XNOR-Net).
    Zero means are replaced by 1."""
    w = weight.detach()
    if mode == "tensor":
        a = w.abs().mean()
    elif mode == "channel":
        if w.dim() < 2:
            raise ValueError(f"mode: 'channel' needs a weight with >= 2 dims, got shape {tuple(w.shape)}")
        a = w.abs().reshape(w.shape[0], -1).mean(dim=1).reshape((w.shape[0],) + (1,) * (w.dim() - 1))
    else:
        raise ValueError(f"mode: expected 'tensor' or 'channel', got {mode!r}")
    return torch.where(a > 0, a, torch.ones_like(a))


# ------------------------------------------------------------------------------------- packing


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes used by ``numel`` codes of ``bits`` bits: ``ceil(numel·bits/8)``."""
    return (numel * bits + 7) // 8


def _check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits: need an int in [1, 8], got {bits!r}")


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Bit-pack integer codes in ``[0, 2^bits)`` into a 1-D uint8 tensor.

    Layout (LSB-first bit stream): code ``i`` (flattened, C order) occupies stream bits
    ``i·bits .. i·bits + bits - 1``, its bit ``j`` at stream position ``i·bits + j``; stream bit ``s``
    is bit ``s % 8`` of byte ``s // 8``. Padding bits of the last byte are 0. Output length
    ``ceil(numel·bits/8)``.
    """
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes: need an integer tensor, got dtype {codes.dtype}")
    c = codes.detach().reshape(-1).to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise ValueError(f"codes: values must lie in [0, {2 ** bits}), got range [{int(c.min())}, {int(c.max())}]")
    if bits == 8:
        return c.to(torch.uint8).cpu()
    shifts = torch.arange(bits, dtype=torch.int64, device=c.device)
    stream = ((c.unsqueeze(-1) >> shifts) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    byte = (stream.reshape(-1, 8) << torch.arange(8, dtype=torch.int64, device=c.device)).sum(dim=1)
    return byte.to(torch.uint8).cpu()


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_codes`: ``numel`` int64 codes from a 1-D uint8 tensor of exactly
    ``ceil(numel·bits/8)`` bytes (ValueError otherwise)."""
    _check_bits(bits)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel: need an int >= 0, got {numel!r}")
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed: need a 1-D uint8 tensor, got dtype {packed.dtype}, shape {tuple(packed.shape)}")
    if packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(f"packed: {numel} codes of {bits} bits need {packed_nbytes(numel, bits)} bytes, got {packed.numel()}")
    p = packed.to(torch.int64)
    if bits == 8:
        return p.clone()
    stream = ((p.unsqueeze(-1) >> torch.arange(8, dtype=torch.int64)) & 1).reshape(-1)[: numel * bits]
    return (stream.reshape(numel, bits) << torch.arange(bits, dtype=torch.int64)).sum(dim=1)
