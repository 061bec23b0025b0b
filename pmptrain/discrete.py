"""Discrete-weight MSA: grids, the EMA accumulator, the relative penalty and the elementwise argmax.

Pure mathematics: functions of tensors and scalars, importing only torch. The rules are those of
docs/discrete.md and of

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
    "sign_nonzero",
    "ema_accumulate_",
    "ema_accumulate",
    "penalty_scale",
    "relative_lambda",
    "discrete_argmax",
    "discrete_msa_step",
    "discrete_msa_delta",
    "initial_accumulator",
    "ACC_INIT_MODES",
    "WRONG_SETS",
    "has_fast_path",
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
        """The grid of :meth:`to_dict`'s mapping: ``values`` a list of finite numbers, ``name`` a
        string, ``bits`` an int; anything else (other types, other keys) is a ``ValueError`` naming
        the field."""
        if not isinstance(d, dict):
            raise ValueError(f"grid: must be a mapping {{values, name, bits}}, got {d!r}")
        unknown = sorted(set(d) - {"values", "name", "bits"})
        if unknown:
            raise ValueError(f"grid: unknown field(s) {unknown}")
        values, name, bits = d.get("values"), d.get("name", "custom"), d.get("bits", 0)
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in values):
            raise ValueError(f"grid values: must be a list of numbers, got {values!r}")
        if not isinstance(name, str):
            raise ValueError(f"grid name: must be a string, got {name!r}")
        if isinstance(bits, bool) or not isinstance(bits, int):
            raise ValueError(f"grid bits: must be an int, got {bits!r}")
        return cls(tuple(values), name=name, bits=bits)


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


def sign_nonzero(x: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``sign`` with the convention of the whole package: ``sign(0) = +1`` (never 0; ``-0.0`` too),
    as larq; ±inf give ±1; NaN stays NaN (so a non-finite guard downstream still sees it).
    ``out``: a tensor of ``x``'s shape to write into (default: a new one).

    Computed as ``sign(x) + 1{x = 0}`` with NaN put back (``torch.sign(NaN)`` is 0): three
    elementwise passes, a third of the cost of two nested ``torch.where``."""
    s = torch.sign(x, out=out) if out is not None else torch.sign(x)
    return s.add_(x == 0).masked_fill_(torch.isnan(x), float("nan"))


#: Initial accumulators (``mode`` of :func:`initial_accumulator`).
ACC_INIT_MODES = ("sign", "uniform")


def initial_accumulator(weight: Tensor, scale: float, mode: str = "sign", seed: Optional[int] = None) -> Tensor:
    """The accumulator ``M_0`` of a discrete tensor before any data.

    * ``mode="sign"`` (the package default): ``M_0 = scale·sgn(W)`` with ``sgn(0) = +1`` —
      deterministic, agreeing with the current codes (a binary code is never "wrong" before data).
    * ``mode="uniform"`` (the reference code, LiQianxiao/discrete-MSA ``layers.py``:
      ``random_uniform_initializer(-1e-6, 1e-6)``): ``M_0 ~ U(−scale, scale)`` i.i.d., drawn in
      float64 on the CPU from a private ``torch.Generator`` seeded with ``seed`` (so the same seed
      gives the same ``M_0`` on every rank and device, and torch's global RNG is not consumed),
      then cast to ``weight``'s dtype and device. About half the codes start "wrong"; until the
      EMA of the gradient outgrows ``scale`` these random entries decide which codes flip.

    Args:
        weight: the codes W (shape, dtype and device of the result).
        scale: ``> 0``, the magnitude (reference 1e-6).
        mode: ``"sign"`` or ``"uniform"``.
        seed: an int in ``[0, 2^32)`` (torch's CPU generator keeps 32 bits of a seed), required
            for ``"uniform"`` (ignored for ``"sign"``).
    """
    if mode not in ACC_INIT_MODES:
        raise ValueError(f"mode: expected 'sign' or 'uniform', got {mode!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: must be a finite number > 0, got {scale!r}")
    w = weight.detach()
    if mode == "sign":
        return sign_nonzero(w).mul_(float(scale))
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed: 'uniform' needs an int in [0, 2^32), got {seed!r}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.rand(w.shape, generator=gen, dtype=torch.float64, device="cpu").mul_(2.0).sub_(1.0).mul_(float(scale))
    return u.to(dtype=w.dtype, device=w.device)


def _check_ema(acc: Tensor, grad: Tensor, a: float, name: str) -> float:
    a = float(a)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"a: EMA rate must lie in [0, 1], got {a}")
    if acc.shape != grad.shape:
        raise ValueError(f"{name}: shape {tuple(grad.shape)} != acc shape {tuple(acc.shape)}")
    return a


def ema_accumulate_(acc: Tensor, ham_grad: Tensor, a: float) -> Tensor:
    """In place ``M <- a·M + (1 - a)·g`` with ``M = acc``, ``g = ham_grad = -dJ/dW``.

    Args:
        acc: the accumulator M (modified in place and returned).
        ham_grad: the Hamiltonian gradient, i.e. *minus* the loss gradient.
        a: the EMA rate, in [0, 1] (close to 1, e.g. 0.999; docs/discrete.md).
    """
    a = _check_ema(acc, ham_grad, a, "ham_grad")
    return acc.mul_(a).add_(ham_grad, alpha=1.0 - a)


def ema_accumulate(acc: Tensor, loss_grad: Tensor, a: float, out: Tensor) -> Tensor:
    """``out <- a·M + (1 - a)·(-dJ/dW)`` with ``M = acc`` left unchanged: the same numbers as
    :func:`ema_accumulate_` on a copy of ``acc`` with ``ham_grad = -loss_grad``, bit for bit
    (``x + α·(−g) = x − α·g`` exactly), in two passes and without a copy or a negation.

    Args:
        acc: the accumulator M (read only).
        loss_grad: the loss gradient ``dJ/dW`` (not negated).
        a: the EMA rate, in [0, 1].
        out: where the new accumulator is written (same shape; not ``acc``).
    """
    a = _check_ema(acc, loss_grad, a, "loss_grad")
    return torch.mul(acc, a, out=out).sub_(loss_grad, alpha=1.0 - a)


def _check_rho_lam(rho: float, lam: float) -> None:
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 0):
        raise ValueError(f"rho: must be a finite number >= 0, got {rho!r}")
    if isinstance(lam, Tensor):
        if not bool(torch.isfinite(lam).all()) or bool((lam < 0).any()):
            raise ValueError(f"lam: must be finite and >= 0, got {lam!r}")
    elif not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam: must be a finite number >= 0, got {lam!r}")


_SCOPES = ("tensor", "channel")

#: Definitions of the wrong set (``wrong_set``): ``"hamiltonian"`` (default: ``W_ij`` is not a
#: maximiser of the unpenalised score ``M_ij q − λ|q|``) or ``"sign"`` (the reference code's
#: ``W_ij ≠ sign(M_ij)``, λ ignored; binary and ternary grids only).
WRONG_SETS = ("hamiltonian", "sign")


def _check_wrong_set(wrong_set: str, grid: "Grid") -> None:
    if wrong_set not in WRONG_SETS:
        raise ValueError(f"wrong_set: expected 'hamiltonian' or 'sign', got {wrong_set!r}")
    if wrong_set == "sign" and not (_is_binary(grid) or _is_ternary(grid)):
        raise ValueError(f"wrong_set: 'sign' is defined for the binary and ternary grids only, got "
                         f"{grid.name} {list(grid.values)}")


def _check_scope(scope: str, weight: Tensor) -> None:
    if scope not in _SCOPES:
        raise ValueError(f"scope: expected 'tensor' or 'channel', got {scope!r}")
    if scope == "channel" and weight.dim() < 2:
        raise ValueError(f"scope: 'channel' needs a weight with >= 2 dims (dim 0 = output channels), got shape {tuple(weight.shape)}")


def _rows(x: Tensor, scope: str) -> Tensor:
    """``x`` viewed as ``(R, n)``: one row per penalty scope (R = 1 for ``"tensor"``, ``C_out`` for
    ``"channel"``)."""
    return x.reshape(1, -1) if scope == "tensor" else x.reshape(x.shape[0], -1)


def _scope_shape(weight: Tensor, scope: str) -> Tuple[int, ...]:
    """Shape of a per-scope quantity (ρ_k, relative λ): ``()`` per tensor, ``[C_out, 1, ..., 1]`` per channel."""
    return () if scope == "tensor" else (weight.shape[0],) + (1,) * (weight.dim() - 1)


def _is_binary(grid: Grid) -> bool:
    return grid.values == (-1.0, 1.0)


def _is_ternary(grid: Grid) -> bool:
    return grid.values == (-1.0, 0.0, 1.0)


def _argmax_ternary(w: Tensor, m: Tensor, rho_k, lam: float) -> Tensor:
    """Closed form of the ternary rule (exact arithmetic, ``r = ρ_k``). For ``W = ±1`` with
    ``u = M W``: ``-W`` if ``u < -(λ + 3r/2)``, else ``0`` if ``u < λ - r/2``, else ``W``. For
    ``W = 0``: ``sign(M)`` if ``|M| > λ + r/2``, else 0. (From ``s(q) - s(W)``; ties keep ``W``, and
    the 0/-W tie goes to 0, the closer value.)"""
    r = rho_k
    u = m * w
    out = torch.where(u < -(lam + 1.5 * r), -w, torch.where(u < lam - 0.5 * r, torch.zeros_like(w), w))
    jump = m.abs() > lam + 0.5 * r
    return torch.where(w == 0, torch.where(jump, torch.sign(m), w), out)


def _score(m: Tensor, w: Tensor, q: float, rho_k, lam: float) -> Tensor:
    """``S = (M q - λ|q|) - (ρ_k/2)(q - W)^2`` elementwise for one grid value ``q``.

    The brute-force reference in the tests evaluates exactly these operations in this order."""
    d = q - w
    return (m * q - lam * abs(q)) - (0.5 * rho_k) * (d * d)


def _argmax_general(w: Tensor, m: Tensor, grid: Grid, rho_k, lam: float) -> Tensor:
    """Elementwise argmax over the grid, one grid value at a time (memory O(n)). Tie rule: the current
    value if it is a maximiser, else the maximiser closest to ``W``, then smaller ``|q|``, then smaller ``q``."""
    best_q = w.clone()
    # the current value's score: W is on the grid, so this equals the score of that grid value
    d0 = torch.zeros_like(w)
    best = (m * w - lam * w.abs()) - (0.5 * rho_k) * (d0 * d0)
    best_dist = torch.zeros_like(w)
    for q in grid.values:
        sq = _score(m, w, q, rho_k, lam)
        dist = (q - w).abs()
        closer = (dist < best_dist) | ((dist == best_dist) & ((abs(q) < best_q.abs()) | ((abs(q) == best_q.abs()) & (q < best_q))))
        take = (sq > best) | ((sq == best) & closer)
        best = torch.where(take, sq, best)
        best_q = torch.where(take, torch.full_like(w, q), best_q)
        best_dist = torch.where(take, dist, best_dist)
    return best_q


def _unpenalised_wrong(w: Tensor, m: Tensor, grid: Grid, lam: float) -> Tensor:
    """Mask of entries whose current value is *not* a maximiser of ``M q - λ|q|`` over the grid."""
    best = None
    for q in grid.values:
        sq = m * q - lam * abs(q)
        best = sq if best is None else torch.maximum(best, sq)
    return (m * w - lam * w.abs()) < best


def _lam_rows(lam, rows: Tensor):
    """λ as a number or as a ``(R, 1)`` column matching ``rows`` (a per-scope tensor λ)."""
    if isinstance(lam, Tensor):
        return lam.detach().to(rows.dtype).reshape(-1, 1) if lam.numel() > 1 else lam.detach().to(rows.dtype).reshape(())
    return lam


def relative_lambda(acc: Tensor, lam: float, scope: str = "tensor") -> Tensor:
    """The relative sparsity weight ``λ_k = λ · max |M|`` over the penalty scope.

    ``scope="tensor"``: one value, the maximum over the whole tensor (a 0-dim tensor);
    ``scope="channel"``: one value per output channel (maximum over dims 1..), shape
    ``[C_out, 1, ..., 1]``. Like ρ_k it makes λ scale-free in the loss: a zero code becomes non-zero
    only if ``|M_ij| > λ_k + ρ_k/2``, i.e. above the fraction ``λ + ρ·max_wrong|M|/(2 max|M|)`` of the
    largest accumulator. ``λ`` is a number >= 0 (``λ >= 1`` keeps every zero code at 0).
    """
    _check_rho_lam(0.0, lam)
    _check_scope(scope, acc)
    m = acc.detach()
    if m.numel() == 0:
        return torch.zeros(_scope_shape(m, scope), dtype=m.dtype, device=m.device)
    mx = m.abs().amax() if scope == "tensor" else _rows(m, scope).abs().amax(dim=1)
    return (mx * lam).reshape(_scope_shape(m, scope))


def penalty_scale(acc: Tensor, weight: Tensor, grid: Grid, rho: float, lam=0.0,
                  scope: str = "tensor", wrong_set: str = "hamiltonian") -> Tuple[Tensor, bool]:
    """The per-step relative penalty ``ρ_k = ρ · max{ |M_ij| : W_ij ∉ argmax_{q∈Q} [M_ij q - λ|q|] }``.

    The set is the *wrong set*: entries whose current value is not a maximiser of the unpenalised
    Hamiltonian (for binary: ``M_ij W_ij < 0``; an exact tie counts as right). ``ρ`` is relative to
    the largest wrong accumulator, hence scale-free in the loss.

    ``scope`` is the set the maximum runs over: ``"tensor"`` (the reference, Li & Hao: one ρ_k per
    tensor, a 0-dim result) or ``"channel"`` (one ρ_k per output channel ``i`` = row of a Linear
    weight / output filter of a conv, over the entries ``ij`` of that row; result shape
    ``[C_out, 1, ..., 1]``, 0 for a row whose wrong set is empty).

    Binary fast path (exact arithmetic; λ is a constant there): ``ρ_k = ρ · max(0, max(-M∘W))``.
    Other grids compare ``M W - λ|W|`` with ``max_q (M q - λ|q|)`` in floating point.

    Args:
        acc: the accumulator M (same shape as ``weight``).
        weight: current codes W (on ``grid``).
        grid: the grid Q.
        rho: ρ >= 0 (reference: 0.5).
        lam: λ >= 0, the sparsity weight (default 0): a number, or a tensor of the scope's shape
            (e.g. :func:`relative_lambda`).
        scope: ``"tensor"`` (default) or ``"channel"``.
        wrong_set: ``"hamiltonian"`` (default, the set above) or ``"sign"``: the reference code's
            ``W_ij ≠ sign(M_ij)`` with ``sign(0) = 0`` (LiQianxiao/discrete-MSA ``layers.py``,
            ``TernaryFullyConnectedLayer``), which ignores λ. On the binary grid both give the same
            ``ρ_k`` (they differ only where ``M_ij = 0``, which adds 0 to the maximum); on the
            ternary grid they differ when λ > 0: a ±1 code with ``0 ≤ M W < λ`` is wrong only for
            ``"hamiltonian"``, a 0 code with ``0 < |M| ≤ λ`` only for ``"sign"``.

    Returns:
        ``(rho_k, empty)``: ``rho_k`` a tensor in ``acc``'s dtype of the scope's shape (0 where the
        set is empty) and ``empty`` (bool) whether the wrong set of the whole tensor is empty.
    """
    _check_rho_lam(rho, lam)
    if acc.shape != weight.shape:
        raise ValueError(f"acc: shape {tuple(acc.shape)} != weight shape {tuple(weight.shape)}")
    _check_scope(scope, weight)
    _check_wrong_set(wrong_set, grid)
    dtype = torch.promote_types(acc.dtype, weight.dtype)
    shape = _scope_shape(weight, scope)
    if weight.numel() == 0:
        return torch.zeros(shape, dtype=dtype, device=acc.device), True
    w = _rows(weight.detach().to(dtype), scope)
    m = _rows(acc.detach().to(dtype), scope)
    lr = _lam_rows(lam, w)
    if _is_binary(grid):
        worst = (m * w).neg_().clamp_(min=0).amax(dim=1)  # = max |M| over M W < 0, or 0
        empty = not bool((worst > 0).any())
    else:
        if wrong_set == "sign":  # the reference: W != sign(M), sign(0) = 0
            wrong = w != torch.sign(m)
        elif _is_ternary(grid):  # closed form: W = ±1 is right iff M W >= λ; W = 0 iff |M| <= λ
            wrong = torch.where(w == 0, m.abs() > lr, m * w < lr)
        else:
            wrong = _unpenalised_wrong(w, m, grid, lr)
        worst = torch.where(wrong, m.abs(), torch.zeros_like(m)).amax(dim=1)
        empty = not bool(wrong.any())
    return (rho * worst).reshape(shape), empty


def discrete_argmax(weight: Tensor, acc: Tensor, grid: Grid, rho_k, lam=0.0) -> Tensor:
    """Elementwise ``W_ij <- argmax_{q∈Q} [ M_ij q - λ|q| - (ρ_k/2)(q - W_ij)^2 ]``.

    Ties keep the current value (``W`` must be on the grid); among other tied maximisers the one
    closest to ``W_ij`` wins, then the smaller ``|q|``, then the smaller ``q``. General grids are
    evaluated one grid value at a time with exactly the brute-force score expression.

    Binary fast path: ``W_ij`` flips iff ``-M_ij W_ij > ρ_k`` (the exact-arithmetic form of the rule,
    which does not depend on λ). Ternary fast path: thresholds on ``M W`` (see ``_argmax_ternary``).
    Fast paths can differ from a floating-point evaluation of the scores only within rounding of
    an exact tie (tests: identical on random float64 inputs and on exact dyadic ties). For a uniform
    grid the result is ``W + M/ρ_k`` rounded to the grid after the λ shrinkage. ``rho_k = None`` (an
    empty wrong set) returns an unchanged copy.

    Args:
        weight: current codes W (any shape, on ``grid``).
        acc: the accumulator M (same shape).
        grid: Q.
        rho_k: the absolute penalty ρ_k >= 0: a float, a 0-dim tensor, or a per-channel tensor of
            shape ``[C_out, 1, ..., 1]`` (see :func:`penalty_scale` with ``scope="channel"``).
        lam: λ >= 0 (default 0): a number, a 0-dim or a per-channel tensor (:func:`relative_lambda`).

    Returns:
        A new tensor of ``weight``'s dtype and shape.
    """
    if acc.shape != weight.shape:
        raise ValueError(f"acc: shape {tuple(acc.shape)} != weight shape {tuple(weight.shape)}")
    if rho_k is None:
        return weight.detach().clone()
    if isinstance(rho_k, Tensor):
        ok_shape = rho_k.numel() == 1 or (weight.dim() >= 2 and tuple(rho_k.shape) == _scope_shape(weight, "channel"))
        if not ok_shape or not bool(torch.isfinite(rho_k).all()) or bool((rho_k < 0).any()):
            raise ValueError(f"rho_k: must be a finite scalar or per-channel [C_out, 1, ...] tensor >= 0, got {rho_k!r}")
    elif not (isinstance(rho_k, (int, float)) and math.isfinite(rho_k) and rho_k >= 0):
        raise ValueError(f"rho_k: must be a finite number >= 0, got {rho_k!r}")
    _check_rho_lam(0.0, lam)
    dtype = torch.promote_types(acc.dtype, weight.dtype)
    per_row = (isinstance(rho_k, Tensor) and rho_k.numel() > 1) or (isinstance(lam, Tensor) and lam.numel() > 1)
    scope = "channel" if per_row else "tensor"
    w = _rows(weight.detach().to(dtype), scope)
    m = _rows(acc.detach().to(dtype), scope)
    r = rho_k.detach().to(dtype).reshape(-1, 1) if isinstance(rho_k, Tensor) else rho_k
    lr = _lam_rows(lam, w)
    if _is_binary(grid):
        out = torch.where((m * w).neg_() > r, w.neg(), w)
    elif _is_ternary(grid):
        out = _argmax_ternary(w, m, r, lr)
    else:
        out = _argmax_general(w, m, grid, r, lr)
    return out.reshape(weight.shape).to(weight.dtype)


def has_fast_path(grid: Grid) -> bool:
    """Whether :func:`discrete_msa_delta` supports ``grid`` (the binary and the ternary grid)."""
    return _is_binary(grid) or _is_ternary(grid)


def _rowmax(x: Tensor, scope: str):
    """``(min, max)`` over the whole tensor (0-dim) or per row of ``x`` (``(R, 1)``)."""
    if scope == "tensor":
        return torch.aminmax(x)
    return torch.aminmax(x, dim=1, keepdim=True)


def _buffer(buf: Optional[Tensor], like: Tensor) -> Tensor:
    if buf is None:
        return torch.empty_like(like)
    if buf.numel() < like.numel() or buf.dtype != like.dtype or buf.device != like.device:
        raise ValueError(f"buffer: need >= {like.numel()} elements of {like.dtype} on {like.device}, got "
                         f"{buf.numel()} of {buf.dtype} on {buf.device}")
    return buf.reshape(-1)[: like.numel()].view(like.shape)


def discrete_msa_delta(weight: Tensor, acc: Tensor, grid: Grid, rho: float, lam=0.0, scope: str = "tensor",
                       out: Optional[Tensor] = None, scratch: Sequence[Tensor] = (),
                       wrong_set: str = "hamiltonian") -> Tuple[Tensor, Tensor, Tensor]:
    """Fused, synchronisation-free form of :func:`penalty_scale` + :func:`discrete_argmax` for the
    binary and ternary grids (the optimizer's hot path).

    Same mathematics and *bit-identical decisions* as the reference functions (tested against them,
    ties included): with ``u = M∘W`` and ``r = ρ_k`` (per tensor, or per output row with
    ``scope="channel"``),

    * ``ρ_k = ρ · max{|M_ij| : ij wrong}`` (0 for an empty wrong set), never ``-0``;
    * binary: ``W_ij`` flips iff ``u_ij + ρ_k < 0`` (⇔ ``-M_ij W_ij > ρ_k``); the new code is
      ``W·copysign(1, u + ρ_k)``;
    * ternary, ``W = ±1``: the new code is ``W·sign(u − clamp(u, b, a⁻))`` with ``b = −(λ + 3r/2)`` and
      ``a⁻`` the float just below ``a = λ − r/2`` (so ``u < b → −W``, ``b ≤ u < a → 0``, ``u ≥ a → W``);
      ``W = 0``: ``sign(z − clamp(z, −t, t))`` with ``z = M`` there and ``t = λ + r/2`` (so ``sign(M)``
      iff ``|M| > t``). The sign of a float difference is the sign of the exact difference, so the
      thresholds are exact. (One corner differs from the reference: ``λ = r = 0`` and ``u`` equal to
      minus the smallest subnormal; then ``a = b = 0`` and that single value gives 0 instead of ``−W``.)

    An empty wrong set needs no branch: then ``ρ_k = 0`` and every ``W_ij`` already maximises the
    (unpenalised = penalised) score, so the tie rule keeps it. Only float arithmetic is used
    (comparisons and ``torch.where`` on bool tensors are several times slower on CPU). No ``.item()``.

    Args:
        weight: current codes W (on ``grid``), any shape.
        acc: the accumulator M, same shape and dtype as ``weight``.
        grid: the binary or ternary grid (ValueError otherwise; see :func:`has_fast_path`).
        rho: ρ >= 0. lam: λ >= 0 (default 0; no effect on the binary rule): a number, or a tensor of
            the scope's shape (:func:`relative_lambda`).
        scope: ``"tensor"`` (default, the reference) or ``"channel"`` (see :func:`penalty_scale`).
        out: optional buffer for ``delta`` (``>= numel`` elements, same dtype/device; reused, no
            allocation). scratch: optional buffers for the ternary rule (up to two, same rule).
        wrong_set: the set ``ρ_k``'s maximum runs over, ``"hamiltonian"`` (default) or ``"sign"``
            (the reference's ``W ≠ sign(M)``; see :func:`penalty_scale`).

    Returns:
        ``(delta, rho_k, acc_abs_max)``: ``delta = W_new - W`` (integers, so ``W + delta`` is exactly
        ``W_new``; it lives in ``out`` if given), ``ρ_k`` (0-dim, or ``[C_out, 1, ...]`` per channel)
        and the 0-dim ``max|M|`` (a by-product).
    """
    if not has_fast_path(grid):
        raise ValueError(f"grid: the fused rule supports the binary and ternary grids, got {grid.name} {list(grid.values)}")
    _check_rho_lam(rho, lam)
    if acc.shape != weight.shape or acc.dtype != weight.dtype:
        raise ValueError(f"acc: shape/dtype {tuple(acc.shape)}/{acc.dtype} != weight's {tuple(weight.shape)}/{weight.dtype}")
    _check_scope(scope, weight)
    _check_wrong_set(wrong_set, grid)
    shape = _scope_shape(weight, scope)
    w = weight.detach()
    m = acc.detach()
    if w.numel() == 0:
        z = torch.zeros(shape, dtype=w.dtype, device=w.device)
        return torch.zeros_like(w), z, torch.zeros((), dtype=w.dtype, device=w.device)
    w2, m2 = _rows(w, scope), _rows(m, scope)
    u = torch.mul(m2, w2, out=_buffer(out, w2))
    umin, umax = _rowmax(u, scope)
    worst = torch.clamp(-umin, min=0.0)  # max |M| over M W < 0 (W = ±1), or 0
    if _is_binary(grid):
        rho_k = (worst * rho).add_(0.0)  # + 0.0 turns a -0 into +0 (copysign below)
        acc_max = torch.maximum(-umin, umax).amax()
        # keep iff u + ρ_k >= +0: copysign gives +1 there (an exact tie sums to +0), -1 to flip
        u.add_(rho_k)
        s = torch.copysign(torch.ones((), dtype=w.dtype, device=w.device), u, out=u)  # no new buffer
        return s.sub_(1.0).mul_(w2).view(w.shape), rho_k.reshape(shape), acc_max
    s1 = _buffer(scratch[0] if len(scratch) > 0 else None, w2)
    s2 = _buffer(scratch[1] if len(scratch) > 1 else None, w2)
    lr = _lam_rows(lam, w2)
    # z = M on the W = 0 entries, +0 elsewhere (exact: (M W) W = M for W = ±1)
    z = torch.addcmul(m2, u, w2, value=-1.0, out=s1)
    zmin, zmax = _rowmax(z, scope)
    zabs = torch.maximum(-zmin, zmax)  # max |M| over W = 0 (0 if none)
    acc_max = torch.maximum(torch.maximum(-umin, umax), zabs).amax()
    if wrong_set == "sign":  # W != sign(M): M W < 0, or W = 0 with M != 0 (λ plays no part)
        worst = torch.maximum(worst, zabs)
    else:
        if isinstance(lam, Tensor) or lam > 0:  # W = ±1 with 0 <= u < λ are wrong too (|M| = u)
            low = torch.sub(lr, u, out=s2).sign_().clamp_(min=0.0).mul_(u)  # u·1{u < λ}
            worst = torch.maximum(worst, low.amax() if scope == "tensor" else low.amax(dim=1, keepdim=True))
        worst = torch.maximum(worst, zabs * (zabs > lr))  # W = 0 is wrong iff |M| > λ
    r = (rho * worst).add_(0.0)
    hi = torch.nextafter(lr - 0.5 * r, torch.tensor(-math.inf, dtype=w.dtype, device=w.device))
    lo = torch.minimum(-(lr + 1.5 * r), hi)
    # clamp(x, lo, hi) = min(max(x, lo), hi) (lo <= hi here); maximum/minimum with tensor bounds are
    # ~2.5x faster than torch.clamp with tensor bounds on CPU
    f = torch.sub(u, torch.minimum(torch.maximum(u, lo, out=s2), hi, out=s2), out=s2).sign_()  # ±1: new = W·f
    t = lr + 0.5 * r
    zn = torch.sub(z, torch.minimum(torch.maximum(z, -t, out=u), t, out=u), out=u).sign_()  # 0: new = zn
    delta = zn.addcmul_(w2, f).sub_(w2)
    return delta.view(w.shape), r.reshape(shape), acc_max


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


def discrete_msa_step(weight: Tensor, acc: Tensor, grid: Grid, rho: float, lam: float = 0.0,
                      wrong_set: str = "hamiltonian") -> Tuple[Tensor, DiscreteStepStats]:
    """One discrete MSA update of one tensor: :func:`penalty_scale` then :func:`discrete_argmax`.

    ``ρ_k = ρ · max_{wrong} |M|``; ``W <- argmax_q [M q - λ|q| - (ρ_k/2)(q - W)^2]``; empty wrong set
    => W unchanged. The accumulator must already contain this step's gradient
    (:func:`ema_accumulate_`). ``wrong_set``: see :func:`penalty_scale`.

    Returns:
        ``(new_weight, stats)``; ``weight`` itself is not modified.
    """
    rho_k, empty = penalty_scale(acc, weight, grid, rho, lam, wrong_set=wrong_set)
    # an empty "hamiltonian" wrong set leaves every code a maximiser (unchanged); an empty "sign"
    # set (W = sign(M) everywhere) still lets λ > 0 zero a weakly supported code
    keep = empty and wrong_set == "hamiltonian"
    new = weight.detach().clone() if keep else discrete_argmax(weight, acc, grid, rho_k, lam)
    n = weight.numel()
    flips = int((new != weight).sum()) if not keep else 0
    a = acc.detach().abs()
    stats = DiscreteStepStats(
        flips=flips,
        numel=n,
        flip_ratio=flips / n if n else 0.0,
        density=(float(torch.count_nonzero(new)) / n if n else 0.0) if grid.has_zero else 1.0,
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
