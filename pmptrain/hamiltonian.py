r"""The augmented Hamiltonian of E-MSA and its maximisers — pure functions of tensors.

Notation (docs/algorithms.md §1–2). A controlled affine module maps a *state row* ``x`` (n features)
to ``y = W x + b`` (m features). The backward passes since the last reset of the statistics give
``N = B·L`` rows from ``B`` samples (``L`` rows per sample: 1 for a Linear on ``[B, n]``, the number
of output positions for a convolution):

* ``X`` (N×n) — the state rows;
* ``P̂`` (N×m) — the costate rows ``p̂ = −B·∂J/∂y``;
* ``C_x = XᵀX/B``, ``x̄ = Xᵀ1/B``, ``C_p = P̂ᵀP̂/B`` — the curvature statistics;
* ``G = −∇_W J`` and ``g_b = −∇_b J`` — the *linear* term, taken from the parameters' ``.grad``
  (after unscaling), never rebuilt from the rows: clipping, accumulation, noise or any other edit
  of ``.grad`` acts on the update exactly as it does on an SGD step.

The augmented Hamiltonian of one module, as a function of the step ``(ΔW, Δb)`` from ``(W_k, b_k)``,
is the concave quadratic

.. math::

    \tilde H(ΔW, Δb) = ⟨G, ΔW⟩ + ⟨g_b, Δb⟩
        − \tfrac{ρ}{2}\,\tfrac1B Σ_{rows}‖ΔW x + Δb‖²
        − \tfrac{ρ}{2}\,\tfrac1B Σ_{rows}‖ΔWᵀ p̂‖²
        − \tfrac{δ_W}{2}‖ΔW‖² − \tfrac{δ_b}{2}‖Δb‖²

(``δ = 1/lr``; weight and bias may have their own ``lr``). Eliminating the bias,
``Δb = (g_b − ρΔWx̄)/(ρL + δ_b)``, leaves the Sylvester equation

.. math::

    ρ\,C_p ΔW + ρ\,ΔW C'_x + δ_W ΔW = S,\qquad C'_x = C_x − c\,x̄x̄ᵀ,\quad S = G − c\,g_b x̄ᵀ,
    \quad c = ρ/(ρL + δ_b).

:func:`solve_sylvester` solves ``ρ L ΔW + ρ ΔW R + δ ΔW = S`` exactly for any right-hand side ``S``
and PSD operators ``L`` (m×m), ``R`` (n×n) given as :class:`Curvature` — a multiple of the identity,
a diagonal, a dense matrix or a Gram factor ``AᵀA`` of rows — choosing the cheapest exact route for
the pair (eigenbases, Woodbury identities with N×N solves, or one SPD solve). The isotropic costate
approximation (``C_p ≈ tr(C_p)/m · I``), embeddings (diagonal input statistics) and tied weights
(sums of several modules' operators) are all instances. The derivations are in
``docs/algorithms.md``; ``tests/test_hamiltonian.py`` checks every route against a dense float64
solve and against a numerical maximiser of :func:`affine_augmented_hamiltonian`.

Everything here imports only torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _deferred
from ._profile import phase
from .symmetric import sym_gram

__all__ = [
    "Curvature",
    "affine_augmented_hamiltonian",
    "bias_coupling",
    "bias_step",
    "center_rows",
    "choose_side",
    "eigh_psd",
    "curvature_eig",
    "solve_sylvester",
    "sylvester_in_eigenbases",
    "dense_sylvester_reference",
    "AffineMember",
    "costate_rms",
    "affine_system",
    "affine_bias_steps",
    "solve_channel_affine",
    "solve_grouped_affine",
    "augmented_hamiltonian",
    "iterative_maximise",
]


# ----------------------------------------------------------------------------------------------
# statistics and the objective itself
# ----------------------------------------------------------------------------------------------


def bias_coupling(rho: float, delta_b: float, rows_per_sample: float, has_bias: bool) -> float:
    """``c = ρ/(ρL + δ_b)``: how much of ``x̄x̄ᵀ`` the bias absorbs (0 without a bias). ``rho`` may
    be a 0-dim tensor (``rho_scale="costate"`` on the fast path): then so is ``c``."""
    if not has_bias or _is_zero(rho):
        return 0.0
    return rho / (rho * rows_per_sample + delta_b)


def _is_zero(x) -> bool:
    """``x == 0`` for a Python number; False for a tensor (read without a host synchronisation:
    the formulas that take the shortcut for 0 are exact for 0 as well)."""
    return not isinstance(x, Tensor) and x == 0.0


def _check_delta(delta: float, name: str = "delta") -> None:
    if not delta > 0.0:
        raise ValueError(f"{name} must be > 0 for a well-posed maximisation, got {delta}")


def bias_step(g_b: Tensor, dW: Tensor, x_mean: Tensor, rho: float, rows_per_sample: float, delta_b: float) -> Tensor:
    """The exact bias step given the weight step: ``Δb = (g_b − ρ ΔW x̄) / (ρL + δ_b)``
    (``g_b`` = −∇_b J, ``x_mean`` = x̄, ``rows_per_sample`` = L)."""
    return (g_b - rho * torch.mv(dW, x_mean)) / (rho * rows_per_sample + delta_b)


def affine_augmented_hamiltonian(
    dW: Tensor,
    db: Optional[Tensor],
    x_rows: Tensor,
    p_rows: Tensor,
    batch_size: int,
    rho: float,
    delta: float,
    grad_w: Optional[Tensor] = None,
    grad_b: Optional[Tensor] = None,
    delta_b: Optional[float] = None,
) -> Tensor:
    r"""Value of :math:`\tilde H(W_k+ΔW, b_k+Δb) − \tilde H(W_k, b_k)` for an affine module, evaluated
    directly from its definition (the slow, obviously-correct reference for the closed forms).

    Args: ``dW`` (m×n) = ΔW, ``db`` (m or None) = Δb, ``x_rows`` (N×n) = X, ``p_rows`` (N×m) = P̂,
    ``batch_size`` = B, ``rho`` = ρ, ``delta`` = δ_W, ``delta_b`` = δ_b (default δ_W).
    ``grad_w`` / ``grad_b``: ``∇_W J`` / ``∇_b J`` for the linear term ``⟨−∇J, Δθ⟩`` (default: the
    captured Hamiltonian gain ``(1/B)Σ p̂·(ΔWx + Δb)``, which equals it for an unmodified gradient).
    """
    b = float(batch_size)
    dy = x_rows @ dW.T
    if db is not None:
        dy = dy + db
    if grad_w is None:
        gain = (p_rows * dy).sum() / b
    else:
        gain = -(grad_w * dW).sum()
        if db is not None:
            gain = gain - (grad_b * db).sum()
    state_pen = dy.pow(2).sum() / b
    costate_pen = (p_rows @ dW).pow(2).sum() / b
    db_delta = delta if delta_b is None else delta_b
    prox = delta * dW.pow(2).sum() + (db_delta * db.pow(2).sum() if db is not None else 0.0)
    return gain - 0.5 * rho * state_pen - 0.5 * rho * costate_pen - 0.5 * prox


# ----------------------------------------------------------------------------------------------
# curvature operators and eigensolves
# ----------------------------------------------------------------------------------------------


@dataclass
class Curvature:
    r"""A positive semi-definite operator on ℝᵏ in structured form:

    .. math:: C = s\,I + \mathrm{diag}(d) + D + AᵀA

    with ``scalar`` = s (float or 0-dim tensor), ``diag`` = d (k-vector), ``dense`` = D (k×k) and
    ``rows`` = A (N×k); absent parts are None/0. ``a + b`` adds operators (Gram rows are stacked:
    ``AᵀA + A'ᵀA' = [A; A']ᵀ[A; A']``). The structure decides the route of :func:`solve_sylvester`.
    """

    dim: int
    scalar: Any = 0.0
    diag: Optional[Tensor] = None
    dense: Optional[Tensor] = None
    rows: Optional[Tensor] = None

    def __add__(self, other: "Curvature") -> "Curvature":
        if self.dim != other.dim:
            raise ValueError(f"cannot add curvatures of dimension {self.dim} and {other.dim}")

        def add(a, b):
            return b if a is None else (a if b is None else a + b)

        rows = self.rows
        if other.rows is not None:
            rows = other.rows if rows is None else torch.cat([rows, other.rows])
        return Curvature(self.dim, self.scalar + other.scalar, add(self.diag, other.diag),
                         add(self.dense, other.dense), rows)

    def kind(self) -> str:
        """``"scalar"``, ``"diag"``, ``"dense"`` or ``"gram"`` (rows plus an optional scalar)."""
        if self.dense is not None or (self.rows is not None and self.diag is not None):
            return "dense"
        if self.rows is not None:
            return "gram"
        if self.diag is not None:
            return "diag"
        return "scalar"

    def to_dense(self, like: Tensor) -> Tensor:
        """The k×k matrix (dtype/device of ``like``)."""
        out = torch.zeros(self.dim, self.dim, dtype=like.dtype, device=like.device)
        if self.dense is not None:
            out += self.dense
        if self.rows is not None:
            sym_gram(self.rows, out)
        diag = out.diagonal()
        if self.diag is not None:
            diag += self.diag
        diag += self.scalar
        return out

    def diagonal_vector(self, like: Tensor) -> Tensor:
        """``s + d`` as a k-vector (only for kinds ``"scalar"`` and ``"diag"``)."""
        base = torch.zeros(self.dim, dtype=like.dtype, device=like.device)
        if self.diag is not None:
            base += self.diag
        return base + self.scalar


def eigh_psd(mat: Tensor, floor: float = 0.0, float64: bool = False) -> Tuple[Tensor, Tensor]:
    """Eigendecomposition ``mat = U diag(λ) Uᵀ`` of a symmetric PSD matrix with ``λ ≥ floor``.

    ``float64=True`` solves in float64 and casts back (accuracy for tiny or ill-conditioned
    problems). Rounding can make tiny eigenvalues slightly negative; they are clamped at ``floor``
    (default 0: the proximal weight δ > 0 already keeps every denominator positive).

    LAPACK's divide-and-conquer eigensolver can fail on a finite matrix with (numerically)
    repeated eigenvalues — a rank-1 statistic such as one sample's ``xxᵀ`` or a batch of equal
    rows: it either raises or, depending on the thread count, silently returns NaN. Both are
    detected and the same matrix is solved in float64 (docs/algorithms.md, "Stable
    factorisations"). Raises ``torch.linalg.LinAlgError`` only for non-finite input, or if the
    float64 solve fails too.
    """
    work = mat.double() if (float64 and mat.dtype != torch.float64) else mat
    work = 0.5 * (work + work.mT)  # also a batch of matrices
    if _deferred.active():  # the step's one deferred check decides (pmptrain._deferred)
        with phase("factorise"):
            evals, evecs = torch.linalg.eigh(work)
        _deferred.defer(evals.sum() + evecs.sum())  # non-finite iff an entry is (or the sum overflows)
        return evals.clamp_min(floor).to(mat.dtype), evecs.to(mat.dtype)
    with phase("factorise"):
        try:
            evals, evecs = torch.linalg.eigh(work)
            ok = bool(torch.isfinite(evals).all()) and bool(torch.isfinite(evecs).all())
        except torch.linalg.LinAlgError:
            ok = False
        if not ok:
            if not bool(torch.isfinite(work).all()):
                raise torch.linalg.LinAlgError("eigh_psd: the matrix has non-finite entries")
            evals, evecs = torch.linalg.eigh(work.double())
            if not (bool(torch.isfinite(evals).all()) and bool(torch.isfinite(evecs).all())):
                raise torch.linalg.LinAlgError("eigh_psd: the float64 eigensolver failed on a finite matrix")
    evals = evals.clamp_min(floor)
    return evals.to(mat.dtype), evecs.to(mat.dtype)


def _spd_solve_right(b: Tensor, mat: Tensor) -> Tensor:
    """``b · mat⁻¹ = (mat⁻¹ bᵀ)ᵀ`` for a symmetric positive definite ``mat``: an LU solve (LAPACK
    ``getrf``/``getrs``; on this machine's MKL 1.2–1.9× faster than ``potrf``/``potrs`` for
    128 ≤ n ≤ 2048 on one thread, docs/performance.md); eigendecomposition if the factorisation
    reports a singular matrix. Inside :func:`pmptrain._deferred.collecting`:
    :func:`_spd_solve_right_deferred`."""
    if _deferred.active():
        return _spd_solve_right_deferred(b, mat)
    with phase("factorise"):
        x, info = torch.linalg.solve_ex(mat, b.T)
        # a singular report, or a non-finite solution of finite data (a pivot that underflowed)
        ok = int(info) == 0 and bool(torch.isfinite(x).all())
    if ok:
        return x.T
    lam, u = eigh_psd(mat)
    return ((b @ u) / lam.clamp_min(torch.finfo(mat.dtype).tiny)) @ u.T


def _spd_solve_right_deferred(b: Tensor, mat: Tensor) -> Tensor:
    """``b · mat⁻¹`` for a symmetric positive definite ``mat`` without a host synchronisation: a
    Cholesky factorisation ``mat = LLᵀ`` whose ``info`` is deferred (:mod:`pmptrain._deferred`), then
    ``b·(LLᵀ)⁻¹`` by two triangular solves from the right (``trsm``, which checks nothing: no
    synchronisation on a GPU either, unlike ``cholesky_inverse``). On this machine's MKL (one
    thread, 128×128, 256 right-hand sides) 0.35 ms against 0.80 ms for ``getrf``/``getrs`` on the
    transposed right-hand side: the triangular solves, not the factorisation, were the cost
    (docs/performance.md, "Speed per second")."""
    with phase("factorise"):
        chol, info = torch.linalg.cholesky_ex(mat)
        _deferred.defer_info(info)
        y = torch.linalg.solve_triangular(chol.mT, b, upper=True, left=False)
        return torch.linalg.solve_triangular(chol, y, upper=False, left=False)


def _host(x):
    """A scalar as a Python float, or — inside :func:`pmptrain._deferred.collecting` — as it is (a
    0-dim tensor stays on its device: no host synchronisation)."""
    return x if (_deferred.active() or not isinstance(x, Tensor)) else float(x)


def choose_side(dim: int, rows: int, route: str) -> bool:
    """True if a side of size ``dim`` with ``rows`` rows should use its Gram (rows×rows) form.

    ``route``: ``"auto"`` (Gram iff rows < dim: the smaller eigenproblem), ``"primal"``, ``"gram"``.
    """
    if route == "auto":
        return rows < dim
    if route == "gram":
        return True
    if route == "primal":
        return False
    raise ValueError(f"route must be 'auto', 'primal' or 'gram', got {route!r}")


def center_rows(x_rows: Tensor, batch_size: float, c_times_l: float) -> Tensor:
    r"""``A = K½ X`` with ``K½ = (I − α·11ᵀ/N)/√B``, ``α = 1 − √(1 − cL)``: the Gram factor of
    ``C'_x = C_x − c x̄x̄ᵀ`` (``AᵀA = XᵀX/B − (c/B²) Xᵀ11ᵀX``). ``c_times_l`` = cL ∈ [0, 1) (a
    0-dim tensor when ρ is one: then so is α)."""
    if isinstance(c_times_l, Tensor):
        alpha = 1.0 - (1.0 - c_times_l.clamp_max(1.0)).sqrt()
    else:
        alpha = 1.0 - math.sqrt(1.0 - min(c_times_l, 1.0))
    scale = 1.0 / math.sqrt(batch_size)
    if _is_zero(alpha):
        return x_rows * scale
    # s·x − (α·s)·x̄ in one pass over the N×n rows (the broadcast row is 1×n)
    return torch.add(x_rows.mean(0, keepdim=True).mul_(-alpha * scale), x_rows, alpha=scale)


# ----------------------------------------------------------------------------------------------
# the Sylvester solve  ρ L ΔW + ρ ΔW R + δ ΔW = S
# ----------------------------------------------------------------------------------------------


def sylvester_in_eigenbases(
    s: Tensor,
    eig_left: Tuple[Tensor, Optional[Tensor]],
    eig_right: Tuple[Tensor, Optional[Tensor]],
    rho: float,
    delta: float,
    bound=0.0,
) -> Tensor:
    r"""``ΔW = V[(VᵀSU) ⊘ (ρ(μ_i + λ_j) + δ)]Uᵀ`` from eigendecompositions ``L = V diag(μ) Vᵀ``,
    ``R = U diag(λ) Uᵀ`` (``eig_left = (μ, V)``, ``eig_right = (λ, U)``; a basis of None is the
    identity, i.e. a diagonal operator). Exact for the given eigendecompositions (stale ones with
    running averages, see docs/algorithms.md).

    ``bound = κ > 0`` (a float or a 0-dim tensor; default 0: off) raises each divisor to ``ρ·max(μ_i + λ_j, κ|S̃_ij|) + δ``,
    ``S̃ = VᵀSU``: the maximiser of the amortised Hamiltonian of docs/algorithms.md, "Amortised
    curvature", whose kept curvature is lifted to the Cauchy–Schwarz bound ``μ_i + λ_j ≥
    2√k|S̃_ij|`` that this step's own gradient implies (``κ = 2√k``, ``k = ρ_p/ρ_x``). Where a side's
    kept eigenvalues are (numerically) zero — the null space of a rank-deficient statistic, whose
    basis the eigensolver chooses arbitrarily — ``|S̃_ij|`` is replaced by the norm of ``S̃`` over
    that null block (:func:`_bound_magnitudes`), so the step does not depend on that choice."""
    mu, v = eig_left
    lam, u = eig_right
    core = s if v is None else v.T @ s
    core = core if u is None else core @ u
    curv = mu[:, None] + lam[None, :]
    if isinstance(bound, Tensor) or bound > 0.0:  # a 0-dim tensor (a device scalar) is taken as given
        curv = torch.maximum(curv, bound * _bound_magnitudes(core, mu if v is not None else None,
                                                             lam if u is not None else None))
    core = core / (rho * curv + delta)
    core = core if v is None else v @ core
    return core if u is None else core @ u.T

def _bound_magnitudes(core: Tensor, mu: Optional[Tensor], lam: Optional[Tensor]) -> Tensor:
    """``|S̃_ij|`` for the bound of :func:`sylvester_in_eigenbases`, invariant to the basis of each
    side's null space: ``N_L = {i : μ_i ≤ √ε·max μ}`` (likewise ``N_R`` for ``λ``; None: an identity
    basis, nothing to choose) — for ``i ∈ N_L, j ∉ N_R`` the norm of column ``j`` over ``N_L``, for
    ``i ∉ N_L, j ∈ N_R`` the norm of row ``i`` over ``N_R``, on ``N_L × N_R`` the Frobenius norm of
    the block. A column (row) norm is the largest ``|vᵀS̃u_j|`` over unit ``v`` in the null space, so
    it is the Cauchy–Schwarz bound of the worst direction there; elsewhere (and wherever a side has
    no null eigenvalue) the entries as they are. Rotating a null basis ``V_N → V_N Q`` changes
    ``S̃``'s null rows to ``QᵀS̃_N`` and leaves these norms, so the step, unchanged (tested)."""
    out = core.abs()
    masks = []
    for eig in (mu, lam):
        if eig is None or eig.numel() < 2:
            masks.append(None)
            continue
        tol = math.sqrt(torch.finfo(eig.dtype).eps) * eig.max().clamp_min(torch.finfo(eig.dtype).tiny)
        masks.append(eig <= tol)
    a, b = masks
    if a is None and b is None:
        return out
    sq = core.square()
    zero = torch.zeros((), dtype=torch.bool, device=core.device)
    a2 = a[:, None] if a is not None else zero
    b2 = b[None, :] if b is not None else zero
    if a is not None:
        out = torch.where(a2, (sq * a2).sum(0, keepdim=True).sqrt(), out)
    if b is not None:
        out = torch.where(b2, (sq * b2).sum(1, keepdim=True).sqrt(), out)
    if a is not None and b is not None:
        out = torch.where(a2 & b2, (sq * (a2 & b2)).sum().sqrt(), out)
    return out



def _gram_times_explicit(
    s: Tensor, rows: Tensor, shift, eig_other: Tuple[Tensor, Optional[Tensor]], rho: float, delta: float,
    floor: float, f64: bool,
) -> Tensor:
    r"""``ρ(AᵀA + s_A I)ΔW + ρΔW R + δΔW = S`` with the *left* operator in Gram form (rows A, N×m)
    and ``R = U diag(λ) Uᵀ`` explicit. In the eigenbasis of R the columns decouple:
    ``(ρAᵀA + d_j I) z_j = (SU)_j``, ``d_j = ρ(λ_j + s_A) + δ``, and Woodbury with
    ``AAᵀ = Q diag(μ) Qᵀ`` gives ``z_j = t_j/d_j − ρAᵀQ[(QᵀA t_j) ⊘ ((d_j + ρμ) d_j)]``."""
    lam, u = eig_other
    mu, q = eigh_psd(sym_gram(rows.T), floor, f64)
    t = s if u is None else s @ u
    d = rho * (lam + shift) + delta
    aq = rows.T @ q  # m×N
    core = (aq.T @ t) / ((d[None, :] + rho * mu[:, None]) * d[None, :])
    z = t / d[None, :] - rho * (aq @ core)
    return z if u is None else z @ u.T


def _gram_times_gram(
    s: Tensor, left: Tensor, shift_l, right: Tensor, shift_r, rho: float, delta: float, floor: float, f64: bool,
) -> Tensor:
    r"""Both sides in Gram form: ``ρ(PᵀP + s_L)ΔW + ρΔW(AᵀA + s_R) + δΔW = S``. With
    ``δ' = δ + ρ(s_L + s_R)``, ``f(a, b) = 1/(a + b + δ')`` and the eigenvalues ``a = ρμ`` of
    ``ρPPᵀ = ρRMRᵀ``, ``b = ρλ`` of ``ρAAᵀ = ρQΛQᵀ``, splitting ``f = h + f(a,0) + f(0,b) − f(0,0)``
    (h vanishes on the null spaces) gives, exactly and without inverse square roots,

    ``ΔW = (ρPᵀP + δ'I)⁻¹S + S(ρAᵀA + δ'I)⁻¹ − S/δ' + ρ² PᵀR[k ∘ (RᵀPSAᵀQ)]QᵀA``

    with ``k = h/(ab) = (a + b + 2δ') / (δ'(a + δ')(b + δ')(a + b + δ'))`` (docs/algorithms.md §2)."""
    dp = delta + rho * (shift_l + shift_r)
    mu, r = eigh_psd(sym_gram(left.T), floor, f64)
    lam, q = eigh_psd(sym_gram(right.T), floor, f64)
    a, b = rho * mu, rho * lam
    pr = left.T @ r   # m×N_L  (PᵀR)
    aq = right.T @ q  # n×N_R  (AᵀQ)
    rps = pr.T @ s    # N_L×n  (RᵀPS)
    saq = s @ aq      # m×N_R  (SAᵀQ)
    out = s - rho * (pr @ (rps / (dp + a)[:, None])) - rho * ((saq / (dp + b)[None, :]) @ aq.T)
    out = out / dp
    k = (a[:, None] + b[None, :] + 2 * dp) / (
        dp * (a[:, None] + dp) * (b[None, :] + dp) * (a[:, None] + b[None, :] + dp)
    )
    core = (rps @ aq) * (k * rho).mul_(rho)  # RᵀPSAᵀQ ∘ ρ²k (ρ² itself may exceed the float32 range)
    return out + pr @ core @ aq.T


def curvature_eig(c: Curvature, like: Tensor, floor: float = 0.0, f64: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """``(eigenvalues, eigenvectors)`` of a scalar, diagonal or dense :class:`Curvature` (vectors
    None for a diagonal one: the identity basis), for :func:`sylvester_in_eigenbases`."""
    if c.kind() in ("scalar", "diag"):
        return c.diagonal_vector(like), None
    return eigh_psd(c.to_dense(like), floor, f64)


def solve_sylvester(
    s: Tensor,
    left: Curvature,
    right: Curvature,
    rho: float,
    delta: float,
    eig_floor: float = 0.0,
    eig_float64: bool = False,
    overwrite_s: bool = False,
) -> Tensor:
    r"""The exact solution ``ΔW`` (m×n) of ``ρ L ΔW + ρ ΔW R + δ ΔW = S``.

    Args:
        s: S (m×n), the right-hand side — ``G' = −∇_W J − c g_b x̄ᵀ`` for an affine module.
        left: L (m×m) as a :class:`Curvature` (``C_p``, the costate side, for a Linear).
        right: R (n×n) as a :class:`Curvature` (``C'_x``, the state side, for a Linear).
        rho: ρ ≥ 0; delta: δ > 0 (``1/lr``).
        eig_floor: lower clamp of eigenvalues (default 0); eig_float64: eigensolves in float64.
        overwrite_s: S may be overwritten (default False; the Woodbury route of a contiguous
            right-hand side then writes ΔW into it: one m×n pass less, the same numbers).

    Routes, by the structure of the two operators (every one exact):

    * one side a multiple of the identity ``sI`` (the isotropic costate): the other side alone,
      ``ΔW(ρR + (ρs + δ)I) = S`` — one SPD solve of n×n (dense R), of N×N by Woodbury
      (Gram R: ``(ρAᵀA + dI)⁻¹ = (I − ρAᵀ(dI + ρAAᵀ)⁻¹A)/d``), or a division (diagonal R);
    * both diagonal: elementwise division;
    * both explicit (dense or diagonal): ``V[(VᵀSU) ⊘ (ρ(μ_i+λ_j)+δ)]Uᵀ``;
    * one Gram side, one explicit side: columns decouple in the explicit eigenbasis, Woodbury on
      the Gram side (:func:`_gram_times_explicit`);
    * both Gram: :func:`_gram_times_gram`.

    A non-finite result of finite float32 data (an intermediate that overflows or underflows,
    e.g. ``1/δ³`` of the two-sided Gram route when ``lr`` is huge) is recomputed in float64 and
    cast back (docs/algorithms.md, "Stable factorisations"); it stays non-finite only if the
    solution itself is beyond the range of ``s``'s dtype.
    """
    _check_delta(delta)
    out = _sylvester_routes(s, left, right, rho, delta, eig_floor, eig_float64, overwrite_s)
    if (s.dtype == torch.float64 or out.data_ptr() == s.data_ptr() or _deferred.active()
            or bool(torch.isfinite(out).all())):
        return out  # (deferred: a non-finite out fails the step's check, which redoes it carefully)
    parts = [s] + [t for c in (left, right) for t in (c.diag, c.dense, c.rows) if t is not None]
    if not all(bool(torch.isfinite(t).all()) for t in parts):
        return out  # non-finite data: the shell skips the step
    wide = _sylvester_routes(s.double(), _curvature_to(left, torch.float64), _curvature_to(right, torch.float64),
                             rho, delta, eig_floor, True, False)
    return wide.to(s.dtype)


def _curvature_to(c: Curvature, dtype) -> Curvature:
    def cast(t):
        return t.to(dtype) if isinstance(t, Tensor) else t

    return Curvature(c.dim, cast(c.scalar), cast(c.diag), cast(c.dense), cast(c.rows))


def _sylvester_routes(s, left, right, rho, delta, eig_floor, eig_float64, overwrite_s) -> Tensor:
    """The routes of :func:`solve_sylvester` (without its float64 retry)."""
    kl, kr = left.kind(), right.kind()
    if kl == "scalar" or kr == "scalar":
        if kl == "scalar" and kr != "scalar":
            return _one_sided(s, right, rho * _host(left.scalar) + delta, rho, "right", overwrite_s)
        if kr == "scalar" and kl != "scalar":
            return _one_sided(s, left, rho * _host(right.scalar) + delta, rho, "left", overwrite_s)
        return s / (rho * (_host(left.scalar) + _host(right.scalar)) + delta)
    if kl == "gram" and kr == "gram":
        return _gram_times_gram(s, left.rows, left.scalar, right.rows, right.scalar, rho, delta,
                                eig_floor, eig_float64)
    if kl == "gram":
        eig = curvature_eig(right, s, eig_floor, eig_float64)
        return _gram_times_explicit(s, left.rows, left.scalar, eig, rho, delta, eig_floor, eig_float64)
    if kr == "gram":
        eig = curvature_eig(left, s, eig_floor, eig_float64)
        return _gram_times_explicit(s.T, right.rows, right.scalar, eig, rho, delta, eig_floor,
                                    eig_float64).T
    return sylvester_in_eigenbases(s, curvature_eig(left, s, eig_floor, eig_float64),
                                   curvature_eig(right, s, eig_floor, eig_float64), rho, delta)


def _one_sided(s: Tensor, c: Curvature, d: float, rho: float, side: str, overwrite: bool = False) -> Tensor:
    r"""``ΔW(ρR + dI) = S`` (side ``"right"``) or ``(ρL + dI)ΔW = S`` (side ``"left"``); with
    ``overwrite`` the Gram route writes the result into ``s``."""
    t = s if side == "right" else s.T
    kind = c.kind()
    if kind == "diag":
        out = t / (rho * c.diagonal_vector(t) + d)[None, :]
    elif kind == "gram":
        if _deferred.active():
            out = _woodbury_right_deferred(t, c.rows, d + rho * c.scalar, rho, overwrite)
            return out if side == "right" else out.T
        a, shift = c.rows, float(c.scalar)
        d = float(d) + rho * shift
        gram = sym_gram(a.T)
        gram.mul_(rho).diagonal().add_(d)
        ta = t @ a.T  # m×N
        # (t − ρ·(ta K⁻¹)·a)/d as one product: no m×n temporaries (each would be a fresh allocation)
        y = _spd_solve_right(ta, gram)
        if overwrite and t.is_contiguous():  # (in place on a transposed view rounds differently)
            out = t.addmm_(y, a, beta=1.0 / d, alpha=-rho / d)
        else:
            out = torch.addmm(t, y, a, beta=1.0 / d, alpha=-rho / d)
    else:
        mat = c.to_dense(t).mul_(rho)
        mat.diagonal().add_(d)
        out = _spd_solve_right(t, mat)
    return out if side == "right" else out.T


def _woodbury_right_deferred(t: Tensor, a: Tensor, d, rho: float, overwrite: bool) -> Tensor:
    r"""``t(ρAᵀA + dI)⁻¹ = (t − ρ·(tAᵀ)K⁻¹A)/d`` with ``K = ρAAᵀ + dI`` (N×N), without a host
    synchronisation: ``d`` may be a 0-dim tensor (the isotropic costate's ``ρτ + δ``), whose
    ``1/d`` then costs one elementwise pass over ``t`` instead of a read of ``τ``. The same numbers
    as the careful route of :func:`_one_sided` up to rounding (Cholesky instead of LU)."""
    gram = sym_gram(a.T)
    gram.mul_(rho).diagonal().add_(d)
    y = _spd_solve_right(t @ a.T, gram)  # m×N
    inplace = overwrite and t.is_contiguous()
    if isinstance(d, Tensor):
        y.mul_(-rho / d)
        out = t.div_(d) if inplace else t / d
        return out.addmm_(y, a)
    if inplace:
        return t.addmm_(y, a, beta=1.0 / d, alpha=-rho / d)
    return torch.addmm(t, y, a, beta=1.0 / d, alpha=-rho / d)


def dense_sylvester_reference(s: Tensor, left: Tensor, right: Tensor, rho: float, delta: float) -> Tensor:
    """The slow reference: solve ``ρLΔW + ρΔWR + δΔW = S`` as one (mn)×(mn) linear system
    (Kronecker form, row-major ``vec``: ``vec(LX) = (L⊗I)vec X``, ``vec(XR) = (I⊗Rᵀ)vec X``)."""
    m, n = s.shape
    eye_m = torch.eye(m, dtype=s.dtype, device=s.device)
    eye_n = torch.eye(n, dtype=s.dtype, device=s.device)
    op = rho * torch.kron(left, eye_n) + rho * torch.kron(eye_m, right.T.contiguous()) + delta * torch.eye(m * n, dtype=s.dtype, device=s.device)
    return torch.linalg.solve(op, s.reshape(-1)).reshape(m, n)


# ----------------------------------------------------------------------------------------------
# affine units: bias elimination and the Sylvester system of one weight and its modules
# ----------------------------------------------------------------------------------------------


@dataclass
class AffineMember:
    r"""The statistics of one module using a weight, on the whole batch, in the module's own
    orientation ``y = W x + b`` (``W`` = the stored weight, or its transpose when ``transposed``:
    an embedding's ``E`` is stored V×d and ``W = Eᵀ``).

    ``samples`` = B; ``rows_per_sample`` = L. State side, one of: ``x_rows`` (X, N×n, uncentred),
    ``cxx`` (C_x), ``counts`` (the diagonal C_x of one-hot inputs: index counts / B); ``x_mean`` = x̄
    (None for index inputs). Costate side, one of: ``p_rows`` (``P̂/√B``, so ``C_p = p_rowsᵀp_rows``),
    ``cpp`` (C_p), ``tau`` (``tr(C_p)/m``: the isotropic approximation), or none (no costate penalty:
    an embedding's input is not differentiable). ``p_trace``: ``tr(C_p)`` recorded without a penalty
    (an embedding's output costates, for ``rho_scale="costate"``). Bias: ``grad_b`` = ∇_b J and
    ``delta_b`` = δ_b (both None when the module has no free bias).
    """

    samples: float
    rows_per_sample: float
    transposed: bool = False
    x_rows: Optional[Tensor] = None
    cxx: Optional[Tensor] = None
    counts: Optional[Tensor] = None
    x_mean: Optional[Tensor] = None
    p_rows: Optional[Tensor] = None
    cpp: Optional[Tensor] = None
    tau: Optional[float] = None
    grad_b: Optional[Tensor] = None
    delta_b: Optional[float] = None
    p_trace: Optional[float] = None

    def primal(self) -> bool:
        """Both sides explicit (no kept rows, no isotropic costate): the primal route."""
        return self.x_rows is None and self.p_rows is None and self.tau is None

    def costate_trace(self, m: int) -> Optional[float]:
        """``tr(C_p)`` (per sample) from whichever costate statistic was kept; None if none was
        (``m``: the output size of the module). A 0-dim tensor inside
        :func:`pmptrain._deferred.collecting` (no host synchronisation), else a float."""
        if self.tau is not None:
            return _host(self.tau) * m
        if self.p_rows is not None:
            return _host(self.p_rows.pow(2).sum())
        if self.cpp is not None:
            return _host(self.cpp.diagonal().sum())
        return None if self.p_trace is None else _host(self.p_trace)

    def coupling(self, rho: float) -> float:
        """``c = ρ/(ρL + δ_b)`` (0 without a free bias)."""
        if self.grad_b is None or self.delta_b is None:
            return 0.0
        return bias_coupling(rho, self.delta_b, self.rows_per_sample, True)

    def sides(self, n: int, m: int, rho: float) -> Tuple[Curvature, Curvature]:
        """``(C'_x, C_p)`` as :class:`Curvature` (n and m: input and output sizes of ``W``)."""
        c, L = self.coupling(rho), self.rows_per_sample
        if self.counts is not None:
            state = Curvature(n, diag=self.counts)
        elif self.x_rows is not None:
            state = Curvature(n, rows=center_rows(self.x_rows, self.samples, c * L))
        else:
            cx = self.cxx if _is_zero(c) else self.cxx - c * torch.outer(self.x_mean, self.x_mean)
            state = Curvature(n, dense=cx)
        if self.tau is not None:
            costate = Curvature(m, scalar=self.tau)
        elif self.p_rows is not None:
            costate = Curvature(m, rows=self.p_rows)
        elif self.cpp is not None:
            costate = Curvature(m, dense=self.cpp)
        else:
            costate = Curvature(m)
        return state, costate


def affine_system(grad_w: Tensor, members: Sequence[AffineMember], rho: float) -> Tuple[Tensor, Curvature, Curvature]:
    r"""The Sylvester system ``ρLΔW + ρΔWR + δΔW = S`` of one weight (storage orientation, 2-D
    ``grad_w`` = ∇J, the sum of every member's gradient) used by ``members`` — the maximiser of the
    sum of their augmented Hamiltonians with every free bias eliminated:

    * a member ``y = W x + b`` adds ``C_p`` to L, ``C'_x = C_x − c x̄x̄ᵀ`` to R and ``−c g_b x̄ᵀ`` to
      ``S = −∇J``;
    * a transposed member ``y = Wᵀx + b`` adds them the other way round (``C'_x`` to L, ``C_p`` to R,
      ``−c x̄ g_bᵀ`` to S).

    Returns ``(S, L, R)``; solve with :func:`solve_sylvester`, then :func:`affine_bias_steps`.
    """
    rows_s, cols_s = grad_w.shape
    s = None  # formed with the first bias coupling in one pass (−∇J + c∇_b J x̄ᵀ), or as −∇J
    left, right = Curvature(rows_s), Curvature(cols_s)
    for mb in members:
        m, n = (cols_s, rows_s) if mb.transposed else (rows_s, cols_s)
        state, costate = mb.sides(n, m, rho)
        c = mb.coupling(rho)
        if mb.transposed:
            left, right = left + state, right + costate
        else:
            left, right = left + costate, right + state
        if not _is_zero(c):
            u, v = (mb.x_mean, mb.grad_b) if mb.transposed else (mb.grad_b, mb.x_mean)
            if isinstance(c, Tensor):  # (ρ scaled on the device: c is a 0-dim tensor, not a number)
                u, c = u * c, 1.0
            s = torch.addr(grad_w, u, v, beta=-1, alpha=c) if s is None else s.addr_(u, v, alpha=c)
    return (-grad_w if s is None else s), left, right


def costate_rms(parts: Sequence[Tuple[float, float, float, float]]) -> float:
    r"""The root-mean-square costate entry of a unit, ``r = √(Σ_j B_j tr C_p^{(j)} / Σ_j B_j L_j m_j)``
    over its members ``j`` — the typical size of one entry of ``p̂`` in one row.

    ``parts``: ``(tr C_p, m, L, B)`` per member (``tr C_p`` per sample, ``m`` the output size,
    ``L`` rows per sample, ``B`` samples). ``rho_scale="costate"`` measures ρ in units of ``r``:
    ``ρ_t = ρ·r`` (docs/algorithms.md, "The units of ρ"). 0.0 when every costate is zero. A
    trace given as a 0-dim tensor (the optimizer's fast path) gives a 0-dim tensor on its device:
    no host synchronisation.
    """
    num = sum(b * tr for tr, _, _, b in parts)
    den = sum(b * rows * m for _, m, rows, b in parts)
    if den <= 0:
        raise ValueError("costate_rms: no member has a costate statistic")
    if isinstance(num, Tensor):
        return (num.clamp_min(0.0) / den).sqrt()
    return math.sqrt(max(num, 0.0) / den)


def affine_bias_steps(dw: Tensor, members: Sequence[AffineMember], rho: float) -> list:
    """``Δb = (g_b − ρΔW x̄)/(ρL + δ_b)`` of every member (None where there is no free bias), with
    ``ΔW`` in each member's own orientation (``dw``: storage orientation, 2-D)."""
    out = []
    for mb in members:
        if mb.grad_b is None or mb.delta_b is None:
            out.append(None)
            continue
        dw_nat = dw.T if mb.transposed else dw
        out.append(bias_step(-mb.grad_b, dw_nat, mb.x_mean, rho, mb.rows_per_sample, mb.delta_b))
    return out


# ----------------------------------------------------------------------------------------------
# per-channel affine (normalisation layers) and block-diagonal weights (grouped convolutions)
# ----------------------------------------------------------------------------------------------


def solve_channel_affine(
    g_scale: Optional[Tensor],
    g_shift: Optional[Tensor],
    x_sq: Tensor,
    x_sum: Tensor,
    p_sq: Tensor,
    rows: float,
    samples: float,
    rho: float,
    delta_scale: Optional[float],
    delta_shift: Optional[float],
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    r"""Exact maximiser of the augmented Hamiltonian of ``y = γ ⊙ x̂ + β`` (per channel ``c``).

    With the normalised state ``x̂`` fixed, both penalties are diagonal in the channels: per channel
    ``a = Σx̂²/B``, ``b = Σx̂/B``, ``L = N/B``, ``e = Σp̂²/B`` (the costate penalty: ``∇_x̂[p̂·y] = γ ⊙ p̂``
    changes by ``Δγ ⊙ p̂``), and

    .. math::

        \begin{pmatrix} ρ(a + e) + δ_γ & ρb \\ ρb & ρL + δ_β \end{pmatrix}
        \begin{pmatrix} Δγ \\ Δβ \end{pmatrix} = \begin{pmatrix} g_γ \\ g_β \end{pmatrix}.

    Args:
        g_scale / g_shift: ``−∇_γ J`` / ``−∇_β J`` (C-vectors; None: the parameter is absent or not
            trained, and the other is maximised alone).
        x_sq, x_sum: per-channel ``Σx̂²``, ``Σx̂`` over the N rows; p_sq: per-channel ``Σp̂²``.
        rows, samples: N and B. rho: ρ. delta_scale / delta_shift: ``δ = 1/lr`` of γ and β.

    Returns ``(Δγ, Δβ)`` (None where the parameter is absent).
    """
    b_ = float(samples)
    a, b, L, e = x_sq / b_, x_sum / b_, float(rows) / b_, p_sq / b_
    if g_scale is not None and g_shift is not None:
        m00 = rho * (a + e) + delta_scale
        m01 = rho * b
        m11 = rho * L + delta_shift
        det = m00 * m11 - m01 * m01
        return (m11 * g_scale - m01 * g_shift) / det, (m00 * g_shift - m01 * g_scale) / det
    if g_scale is not None:
        return g_scale / (rho * (a + e) + delta_scale), None
    return None, g_shift / (rho * L + delta_shift)


def solve_grouped_affine(
    grad_w: Tensor,
    grad_b: Optional[Tensor],
    cxx: Tensor,
    x_mean: Tensor,
    costate: Tensor,
    rows_per_sample: float,
    rho: float,
    delta_w: float,
    delta_b: Optional[float],
    eig_floor: float = 0.0,
    eig_float64: bool = False,
    eig: Optional[Tuple[Tuple[Tensor, Tensor], Optional[Tuple[Tensor, Tensor]]]] = None,
):
    r"""The exact maximiser for a block-diagonal weight: ``g`` independent affine blocks (a grouped or
    depthwise convolution) solved as one batch — for every group ``j`` the bias elimination and
    Sylvester solve (★) of docs/algorithms.md §2 with that group's statistics.

    Args:
        grad_w: ``∇_W J`` per group (g×m×n); grad_b: ``∇_b J`` (g×m) or None.
        cxx: ``C_x`` per group (g×n×n); x_mean: ``x̄`` (g×n).
        costate: ``C_p`` per group (g×m×m), or ``tr(C_p)/m`` per group (g: the isotropic costate).
        rows_per_sample: L. rho: ρ. delta_w / delta_b: δ of the weight / bias (delta_b None: no
            free bias). eig_floor, eig_float64: as :func:`eigh_psd`. eig: precomputed
            ``((λ, U), (μ, V) or None)`` of ``C'_x`` and ``C_p`` (stale eigenbases of running averages).

    Returns ``(ΔW, Δb, eig)`` with ``eig`` the eigendecompositions used.
    """
    _check_delta(delta_w)
    s = -grad_w
    if grad_b is not None and delta_b is not None:
        c = bias_coupling(rho, delta_b, rows_per_sample, True)
        s = s - c * (-grad_b)[:, :, None] * x_mean[:, None, :]
        cxx = cxx - c * x_mean[:, :, None] * x_mean[:, None, :]
    if eig is None:
        eig_in = eigh_psd(cxx, eig_floor, eig_float64)
        eig_out = eigh_psd(costate, eig_floor, eig_float64) if costate.dim() == 3 else None
        eig = (eig_in, eig_out)
    (lam, u), eig_out = eig
    if eig_out is None:  # isotropic: ΔW (ρC'_x + (ρτ + δ)I) = S, per group
        core = (s @ u) / (rho * (lam[:, None, :] + costate[:, None, None]) + delta_w)
        dw = core @ u.mT
    else:
        mu, v = eig_out
        core = v.mT @ s @ u
        dw = v @ (core / (rho * (mu[:, :, None] + lam[:, None, :]) + delta_w)) @ u.mT
    db = None
    if grad_b is not None and delta_b is not None:
        db = (-grad_b - rho * (dw @ x_mean[:, :, None])[..., 0]) / (rho * rows_per_sample + delta_b)
    return dw, db, eig


# ----------------------------------------------------------------------------------------------
# iterative maximiser (any module): the reference-style E-MSA
# ----------------------------------------------------------------------------------------------

ModuleFn = Callable[[Dict[str, Tensor], Tensor, Any], Tensor]


def _sum_pow2(t: Tensor) -> Tensor:
    return t.pow(2).sum()


def augmented_hamiltonian(
    fn: ModuleFn,
    theta: Dict[str, Tensor],
    theta_k: Dict[str, Tensor],
    calls: Sequence[Tuple[Tensor, Tensor, Any, Tensor, Optional[Tensor]]],
    batch_size: int,
    rho: float,
    delta: float,
    linear_correction: Optional[Dict[str, Tensor]] = None,
    rho_costate: Optional[float] = None,
    l2: float = 0.0,
) -> Tensor:
    r"""The augmented Hamiltonian of a general module, up to a constant, differentiable in ``theta``:

    .. math::

        \tilde H(θ) = \tfrac1B Σ_s p̂_s·f(x_s, θ) + ⟨e, θ − θ_k⟩
            − \tfrac{ρ_x}{2}\tfrac1B Σ_s ‖f(x_s, θ) − f(x_s, θ_k)‖²
            − \tfrac{ρ_p}{2}\tfrac1B Σ_s ‖∇_x[p̂_s·f(x_s, θ)] − ∇_x[p̂_s·f(x_s, θ_k)]‖²
            − \tfrac{δ}{2}‖θ − θ_k‖² − \tfrac{λ}{2}‖θ‖²

    Args:
        fn: ``fn(θ, x, extra) → y``, the module as a function of its parameters
            (``torch.func.functional_call``); ``extra`` carries any further inputs of the call.
        theta / theta_k: parameter dicts θ (requires grad) and θ_k (current, fixed).
        calls: per recorded call ``(x, p̂, extra, y_k, gx_k)`` with ``y_k = f(x, θ_k)`` and
            ``gx_k = ∇_x[p̂·f(x, θ_k)]`` (None when ρ_p = 0 or the input is not floating point), as
            prepared by :func:`iterative_maximise`.
        batch_size: B; rho: the state-penalty weight ρ_x; delta: δ ≥ 0 (0: no proximal term).
        linear_correction: ``e`` per parameter (default 0): shifts the linear term of H at θ_k so
            that it equals ``−∇J`` from ``.grad`` (see :func:`iterative_maximise`).
        rho_costate: the costate-penalty weight ρ_p (default None: ρ_p = ρ_x = ``rho``).
        l2: λ ≥ 0 of the L2 regulariser ``−(λ/2)‖θ‖²`` inside H (default 0; exact, not linearised:
            the reference E-MSA's ``msa_reg``).

    The costate penalty differentiates the module output with respect to its first input exactly
    (double backward), including overlapping convolution patches. A call whose input is not
    floating point (an embedding's indices: no earlier module receives a costate through it,
    docs/algorithms.md "Embeddings") has no costate penalty; its ``gx_k`` is None.
    """
    b = float(batch_size)
    rho_p = rho if rho_costate is None else rho_costate
    total = None
    for x, p, extra, y_k, gx_k in calls:
        costate_term = rho_p > 0.0 and gx_k is not None
        xr = x.detach().requires_grad_(costate_term)
        y = fn(theta, xr, extra)
        term = (p * y).sum() / b
        if rho > 0.0:
            term = term - 0.5 * rho * _sum_pow2(y - y_k) / b
        if costate_term:
            (gx,) = torch.autograd.grad((p * y).sum(), xr, create_graph=True)
            term = term - 0.5 * rho_p * _sum_pow2(gx - gx_k) / b
        total = term if total is None else total + term
    if delta > 0.0:
        total = total - 0.5 * delta * sum(_sum_pow2(theta[k] - theta_k[k]) for k in theta)
    if l2 > 0.0:
        total = total - 0.5 * l2 * sum(_sum_pow2(theta[k]) for k in theta)
    if linear_correction:
        total = total + sum((linear_correction[k] * (theta[k] - theta_k[k])).sum() for k in linear_correction)
    return total


def iterative_maximise(
    fn: ModuleFn,
    theta_k: Dict[str, Tensor],
    calls: Sequence[Tuple[Tensor, Tensor, Any]],
    batch_size: int,
    rho: float,
    delta: float,
    steps: int = 10,
    lr: float = 1.0,
    method: str = "lbfgs",
    ham_grad: Optional[Dict[str, Tensor]] = None,
    rho_costate: Optional[float] = None,
    l2: float = 0.0,
    theta_init: Optional[Dict[str, Tensor]] = None,
    max_eval: Optional[int] = None,
) -> Dict[str, Tensor]:
    r"""Maximise :func:`augmented_hamiltonian` by ``steps`` iterations of an inner optimiser.

    Args:
        fn, theta_k, batch_size, rho, delta: as in :func:`augmented_hamiltonian`.
        calls: ``(x, p̂, extra)`` per recorded call (module input, costate at its output, the
            call's further inputs passed through to ``fn``).
        steps: inner iterations (default 10, the budget of the reference implementation).
        lr: inner step size (default 1.0, L-BFGS's natural scale).
        method: ``"lbfgs"`` (default: ``steps`` iterations with a strong-Wolfe line search),
            ``"adam"`` or ``"sgd"`` (``steps`` steps of gradient ascent).
        ham_grad: ``g = −∇_θ J`` per parameter from ``.grad`` (default: None, the captured
            Hamiltonian's own gradient). When given, the Hamiltonian's first-order term at θ_k is
            replaced by ``⟨g, θ − θ_k⟩`` — ``H(θ) − ⟨∇H(θ_k), θ − θ_k⟩ + ⟨g, θ − θ_k⟩`` — so the
            curvature of H comes from the captured calls and the linear term from the gradient.
        rho_costate, l2: the costate-penalty weight ρ_p (default: ``rho``) and the L2 weight λ of
            :func:`augmented_hamiltonian`.
        theta_init: where the inner optimiser starts (default: θ_k; the reference E-MSA's toy
            starts L-BFGS from ``θ_k + a·U(−1, 1)``). The penalties stay centred at θ_k.
        max_eval: L-BFGS's bound on evaluations of the objective, line search included (default
            None: torch's ``1.25·steps``); ignored by Adam and SGD.

    ``delta = 0`` (no proximal term) is allowed with ``method="lbfgs"`` only: the line search keeps
    the inner problem's steps finite, a fixed-step Adam/SGD ascent of an unbounded H would not.

    Returns the new parameters θ (detached), started from ``theta_init`` (default θ_k).
    """
    if not (delta >= 0.0 and math.isfinite(delta)):
        raise ValueError(f"iterative_maximise: delta must be a finite number >= 0, got {delta!r}")
    if delta == 0.0 and method != "lbfgs":
        raise ValueError(f"iterative_maximise: delta = 0 (no proximal term) needs method='lbfgs', got {method!r}")
    rho_p = rho if rho_costate is None else rho_costate
    prepared = []
    for x, p, extra in calls:
        costate_term = rho_p > 0.0 and x.is_floating_point()  # integer indices: no costate penalty
        with torch.enable_grad():
            xr = x.detach().requires_grad_(costate_term)
            y_k = fn(theta_k, xr, extra)
            gx_k = torch.autograd.grad((p * y_k).sum(), xr)[0].detach() if costate_term else None
        prepared.append((x, p, extra, y_k.detach(), gx_k))
    correction = None
    if ham_grad is not None:
        with torch.enable_grad():
            th = {k: v.detach().clone().requires_grad_(True) for k, v in theta_k.items()}
            h = sum((p * fn(th, x, extra)).sum() for x, p, extra in calls) / float(batch_size)
            names = list(th)
            grads = torch.autograd.grad(h, [th[k] for k in names], allow_unused=True)
        correction = {
            k: ham_grad[k] - (g if g is not None else torch.zeros_like(ham_grad[k]))
            for k, g in zip(names, grads)
        }
    start = theta_k if theta_init is None else theta_init
    if set(start) != set(theta_k):
        raise ValueError(f"iterative_maximise: theta_init has keys {sorted(start)}, theta_k {sorted(theta_k)}")
    theta = {k: start[k].detach().clone().requires_grad_(True) for k in theta_k}
    params = list(theta.values())
    if method == "adam":
        inner = torch.optim.Adam(params, lr=lr)
    elif method == "sgd":
        inner = torch.optim.SGD(params, lr=lr)
    elif method == "lbfgs":
        inner = torch.optim.LBFGS(params, lr=lr, max_iter=steps, max_eval=max_eval, line_search_fn="strong_wolfe")
    else:
        raise ValueError(f"method must be 'adam', 'sgd' or 'lbfgs', got {method!r}")

    def closure():
        inner.zero_grad()
        with torch.enable_grad():
            loss = -augmented_hamiltonian(fn, theta, theta_k, prepared, batch_size, rho, delta, correction,
                                          rho_p, l2)
            loss.backward()
        return loss

    for _ in range(1 if method == "lbfgs" else steps):
        inner.step(closure)
    return {k: v.detach() for k, v in theta.items()}
