r"""The augmented Hamiltonian of E-MSA and its maximisers — pure functions of tensors.

Notation (``ALGORITHMS.md`` §1–2). A controlled affine module maps a *state row* ``x`` (n features)
to ``y = W x + b`` (m features). One mini-batch of ``B`` samples gives ``N = B·L`` rows (``L`` rows
per sample: 1 for a Linear on ``[B, n]``, the number of output positions for a convolution):

* ``X`` (N×n) — the state rows, argument ``x_rows``;
* ``P̂`` (N×m) — the costate rows ``p̂ = −B·∂J/∂y``, argument ``p_rows``;
* ``C_x = (1/B) XᵀX``, ``x̄ = (1/B) Xᵀ1``, ``C_p = (1/B) P̂ᵀP̂``, ``G = (1/B) P̂ᵀX = −∇_W J``,
  ``g_b = (1/B) P̂ᵀ1 = −∇_b J``.

The augmented Hamiltonian of one module, as a function of the step ``(ΔW, Δb)`` from the current
``(W_k, b_k)``, is the concave quadratic

.. math::

    \tilde H(ΔW, Δb) = ⟨G, ΔW⟩ + ⟨g_b, Δb⟩
        − \tfrac{ρ}{2}\,\tfrac1B Σ_{rows}‖ΔW x + Δb‖²
        − \tfrac{ρ}{2}\,\tfrac1B Σ_{rows}‖ΔWᵀ p̂‖²
        − \tfrac{δ}{2}(‖ΔW‖² + ‖Δb‖²)

(up to the constant ``H(W_k, b_k)``). Setting its gradient to zero gives (with ``c = ρ/(ρL + δ)``)

.. math::

    Δb = (g_b − ρ ΔW x̄) / (ρL + δ),\qquad
    ρ C_p ΔW + ρ ΔW C'_x + δ ΔW = G',\quad C'_x = C_x − c x̄x̄ᵀ,\ G' = G − c g_b x̄ᵀ,

a Sylvester equation solved exactly in the eigenbases of ``C'_x = UΛUᵀ`` and ``C_p = VMVᵀ``:
``ΔW = V[(VᵀG'U) ⊘ (ρ(μ_i + λ_j) + δ)]Uᵀ``. :func:`solve_affine_rows` does this from rows, choosing
for each side independently the *primal* form (eigendecompose the n×n / m×m matrix) or the *Gram*
form (eigendecompose an N×N Gram matrix, exact because ``C'_x``, ``C_p`` have rank ≤ N and ``G'``
lies in their ranges). :func:`solve_affine_stats` does it from (possibly running-average)
statistics. The derivation is written out in ``docs/algorithms.md``.

Everything here imports only torch and is checked in ``tests/test_hamiltonian.py`` against a
numerical maximiser of :func:`affine_augmented_hamiltonian`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "AffineStats",
    "affine_stats",
    "affine_augmented_hamiltonian",
    "bias_coupling",
    "bias_step",
    "choose_side",
    "eigh_psd",
    "solve_affine_rows",
    "solve_affine_stats",
    "solve_affine_rows_isotropic",
    "augmented_hamiltonian",
    "iterative_maximise",
]


# ----------------------------------------------------------------------------------------------
# statistics and the objective itself
# ----------------------------------------------------------------------------------------------


@dataclass
class AffineStats:
    """Second-moment statistics of one affine module for one step (all divided by ``B``).

    ``cxx`` = C_x (n×n), ``x_mean`` = x̄ (n), ``cpp`` = C_p (m×m), ``rows_per_sample`` = L = N/B.
    The gradient ``G`` is not stored: it is the parameter gradient (``−weight.grad``).
    """

    cxx: Tensor
    x_mean: Tensor
    cpp: Tensor
    rows_per_sample: float


def affine_stats(x_rows: Tensor, p_rows: Tensor, batch_size: int) -> AffineStats:
    """``C_x = XᵀX/B``, ``x̄ = Xᵀ1/B``, ``C_p = P̂ᵀP̂/B`` and ``L = N/B`` from rows ``X`` (N×n),
    ``P̂`` (N×m) of a batch of ``B = batch_size`` samples."""
    b = float(batch_size)
    return AffineStats(
        cxx=x_rows.T @ x_rows / b,
        x_mean=x_rows.sum(0) / b,
        cpp=p_rows.T @ p_rows / b,
        rows_per_sample=x_rows.shape[0] / b,
    )


def bias_coupling(rho: float, delta: float, rows_per_sample: float, has_bias: bool) -> float:
    """``c = ρ/(ρL + δ)``: how much of ``x̄x̄ᵀ`` the bias absorbs (0 without a bias)."""
    if not has_bias or rho == 0.0:
        return 0.0
    return rho / (rho * rows_per_sample + delta)


def _check_delta(delta: float) -> None:
    if delta <= 0.0:
        raise ValueError(f"delta must be > 0 for a well-posed maximisation, got {delta}")


def bias_step(g_b: Tensor, dW: Tensor, x_mean: Tensor, rho: float, rows_per_sample: float, delta: float) -> Tensor:
    """The exact bias step given the weight step: ``Δb = (g_b − ρ ΔW x̄) / (ρL + δ)``
    (``g_b`` = −∇_b J, ``x_mean`` = x̄, ``rows_per_sample`` = L)."""
    return (g_b - rho * torch.mv(dW, x_mean)) / (rho * rows_per_sample + delta)


def affine_augmented_hamiltonian(
    dW: Tensor,
    db: Optional[Tensor],
    x_rows: Tensor,
    p_rows: Tensor,
    batch_size: int,
    rho: float,
    delta: float,
) -> Tensor:
    r"""Value of :math:`\tilde H(W_k+ΔW, b_k+Δb) − H(W_k, b_k)` for an affine module, evaluated
    directly from the rows (the slow, obviously-correct reference for the closed forms).

    Args: ``dW`` (m×n) = ΔW, ``db`` (m or None) = Δb, ``x_rows`` (N×n) = X, ``p_rows`` (N×m) = P̂,
    ``batch_size`` = B, ``rho`` = ρ, ``delta`` = δ.
    """
    b = float(batch_size)
    dy = x_rows @ dW.T
    if db is not None:
        dy = dy + db
    gain = (p_rows * dy).sum() / b
    state_pen = dy.pow(2).sum() / b
    costate_pen = (p_rows @ dW).pow(2).sum() / b
    prox = dW.pow(2).sum() + (db.pow(2).sum() if db is not None else 0.0)
    return gain - 0.5 * rho * state_pen - 0.5 * rho * costate_pen - 0.5 * delta * prox


# ----------------------------------------------------------------------------------------------
# eigensolves
# ----------------------------------------------------------------------------------------------


def eigh_psd(
    mat: Tensor, floor: float = 0.0, float64: bool = False
) -> Tuple[Tensor, Tensor]:
    """Eigendecomposition ``mat = U diag(λ) Uᵀ`` of a symmetric PSD matrix with ``λ ≥ floor``.

    ``float64=True`` solves in float64 and casts back (accuracy for tiny or ill-conditioned
    problems). Rounding can make tiny eigenvalues slightly negative; they are clamped at ``floor``
    (default 0: the proximal weight δ > 0 already keeps every denominator positive).
    Raises ``torch.linalg.LinAlgError`` only for non-finite input (after a float64 retry).
    """
    work = mat.double() if (float64 and mat.dtype != torch.float64) else mat
    work = 0.5 * (work + work.T)
    try:
        evals, evecs = torch.linalg.eigh(work)
    except torch.linalg.LinAlgError:
        if not bool(torch.isfinite(work).all()):
            raise
        # LAPACK's divide-and-conquer can fail on (numerically) repeated eigenvalues; a float64
        # solve of the same matrix is the documented remedy.
        evals, evecs = torch.linalg.eigh(work.double())
    evals = evals.clamp_min(floor)
    return evals.to(mat.dtype), evecs.to(mat.dtype)


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


def _center_half(v: Tensor, alpha: float, batch_size: float) -> Tensor:
    """Apply ``K½ = (I − α·11ᵀ/N)/√B`` to the rows of ``v`` (N×k)."""
    if alpha != 0.0:
        v = v - alpha * v.mean(0, keepdim=True)
    return v / math.sqrt(batch_size)


# ----------------------------------------------------------------------------------------------
# closed-form maximisers
# ----------------------------------------------------------------------------------------------


def solve_affine_rows(
    x_rows: Tensor,
    p_rows: Tensor,
    batch_size: int,
    rho: float,
    delta: float,
    has_bias: bool,
    route_in: str = "auto",
    route_out: str = "auto",
    eig_floor: float = 0.0,
    eig_float64: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    r"""Exact maximiser ``(ΔW, Δb)`` of the augmented Hamiltonian of an affine module, from rows.

    Args:
        x_rows: X, the N×n state rows (inputs; im2col patches for convolutions).
        p_rows: P̂, the N×m costate rows ``−B·∂J/∂y``.
        batch_size: B, the number of samples the rows came from (``N = B·L``).
        rho: ρ ≥ 0, weight of the two feasibility penalties.
        delta: δ > 0, weight of the proximal term (``1/lr``).
        has_bias: whether the module has a bias (Δb is then returned, else ``None``).
        route_in / route_out: ``"auto"`` | ``"primal"`` | ``"gram"`` for the input (n) side and the
            output (m) side; ``"auto"`` uses the Gram form iff ``N < n`` (resp. ``N < m``).
        eig_floor: lower clamp of the eigenvalues (default 0).
        eig_float64: eigensolves in float64 (default False).

    With ``K½ = (I − (1−√(1−cL))·11ᵀ/N)/√B``, ``A = K½X`` (so ``C'_x = AᵀA``), ``P_k = K½P̂``
    (so ``G' = P_kᵀA``), the Gram eigenproblems are ``AAᵀ = QΛQᵀ`` and ``P̂P̂ᵀ/B = RMRᵀ``, and

    * input side: Gram → rotation ``Q`` on the left of the core, output factor ``QᵀA``;
      primal → ``C'_x = UΛUᵀ``, rotation ``AU``, output factor ``Uᵀ``;
    * output side: Gram → rotation ``K½R``, output factor ``P̂ᵀR``;
      primal → ``C_p = VMVᵀ``, rotation ``P_kV``, output factor ``V``;

    ``ΔW = F_out [ (R_outᵀ R_in) ⊘ (ρ(μ_i+λ_j)+δ) ] F_in`` and ``Δb = (g_b − ρΔWx̄)/(ρL+δ)``.
    """
    _check_delta(delta)
    n_rows = x_rows.shape[0]
    b = float(batch_size)
    L = n_rows / b
    c = bias_coupling(rho, delta, L, has_bias)
    cl = min(c * L, 1.0)
    alpha = 1.0 - math.sqrt(1.0 - cl)
    n_in = x_rows.shape[1]
    n_out = p_rows.shape[1]
    gram_in = choose_side(n_in, n_rows, route_in)
    gram_out = choose_side(n_out, n_rows, route_out)

    a_rows = _center_half(x_rows, alpha, b)  # A = K½ X
    pk_rows = _center_half(p_rows, alpha, b)  # P_k = K½ P̂

    if not gram_in and not gram_out:
        # both primal: go through the m×n matrix G' = P_kᵀ A (cheapest when N ≥ m + n)
        lam, u = eigh_psd(a_rows.T @ a_rows, eig_floor, eig_float64)
        mu, v = eigh_psd(p_rows.T @ p_rows / b, eig_floor, eig_float64)
        core = v.T @ (pk_rows.T @ a_rows) @ u
        dW = v @ (core / (rho * (mu[:, None] + lam[None, :]) + delta)) @ u.T
    else:
        if gram_in:
            lam, q = eigh_psd(a_rows @ a_rows.T, eig_floor, eig_float64)
            rot_in, out_in = q, q.T @ a_rows
        else:
            lam, u = eigh_psd(a_rows.T @ a_rows, eig_floor, eig_float64)
            rot_in, out_in = a_rows @ u, u.T
        if gram_out:
            mu, r = eigh_psd(p_rows @ p_rows.T / b, eig_floor, eig_float64)
            rot_out, out_out = _center_half(r, alpha, b), p_rows.T @ r
        else:
            mu, v = eigh_psd(p_rows.T @ p_rows / b, eig_floor, eig_float64)
            rot_out, out_out = pk_rows @ v, v
        core = rot_out.T @ rot_in
        dW = out_out @ (core / (rho * (mu[:, None] + lam[None, :]) + delta)) @ out_in

    db = None
    if has_bias:
        db = bias_step(p_rows.sum(0) / b, dW, x_rows.sum(0) / b, rho, L, delta)
    return dW, db


def solve_affine_stats(
    grad_w: Tensor,
    grad_b: Optional[Tensor],
    stats: AffineStats,
    rho: float,
    delta: float,
    eig_in: Optional[Tuple[Tensor, Tensor]] = None,
    eig_out: Optional[Tuple[Tensor, Tensor]] = None,
    eig_floor: float = 0.0,
    eig_float64: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    r"""Primal-route maximiser from statistics (exact for the given statistics).

    Args:
        grad_w: ``∇_W J`` (m×n), i.e. ``−G``; ``grad_b``: ``∇_b J`` (m) or None (no bias).
        stats: :class:`AffineStats` (C_x, x̄, C_p, L) — one batch's or running averages.
        rho, delta: ρ ≥ 0 and δ > 0.
        eig_in: optional precomputed ``(λ, U)`` of ``C'_x = C_x − c x̄x̄ᵀ`` (stale eigenbases with
            running averages); eig_out: optional ``(μ, V)`` of ``C_p``. Computed here if None.

    ``ΔW = V[(VᵀG'U) ⊘ (ρ(μ_i+λ_j)+δ)]Uᵀ``, ``G' = G − c g_b x̄ᵀ``, ``Δb = (g_b − ρΔWx̄)/(ρL+δ)``.
    """
    _check_delta(delta)
    has_bias = grad_b is not None
    L = stats.rows_per_sample
    c = bias_coupling(rho, delta, L, has_bias)
    g = -grad_w
    if has_bias:
        g_b = -grad_b
        g = g - c * torch.outer(g_b, stats.x_mean)
    if eig_in is None:
        eig_in = eigh_psd(
            stats.cxx - c * torch.outer(stats.x_mean, stats.x_mean), eig_floor, eig_float64
        )
    if eig_out is None:
        eig_out = eigh_psd(stats.cpp, eig_floor, eig_float64)
    lam, u = eig_in
    mu, v = eig_out
    core = v.T @ g @ u
    dW = v @ (core / (rho * (mu[:, None] + lam[None, :]) + delta)) @ u.T
    db = bias_step(g_b, dW, stats.x_mean, rho, L, delta) if has_bias else None
    return dW, db


def solve_affine_rows_isotropic(
    x_rows: Tensor,
    p_rows: Tensor,
    batch_size: int,
    rho: float,
    delta: float,
    has_bias: bool,
) -> Tuple[Tensor, Optional[Tensor]]:
    r"""Fast approximate maximiser: the costate penalty ``ρ C_p`` replaced by its isotropic part.

    ``ρ C_p ΔW ≈ ρ·(tr C_p / m)·ΔW``, so the Sylvester equation becomes
    ``ΔW (ρ C'_x + δ_e I) = G'`` with ``δ_e = δ + ρ tr(C_p)/m``. With ``A = K½X``, ``P_k = K½P̂``
    (see :func:`solve_affine_rows`) the push-through identity gives

    * Gram form (N < n): ``ΔW = [(ρAAᵀ + δ_e I)⁻¹ P_k]ᵀ A`` — one N×N Cholesky solve;
    * primal form: ``ΔW = G'(ρC'_x + δ_e I)⁻¹`` — one n×n Cholesky solve.

    ``A`` is never formed: ``AAᵀ`` and ``(·)ᵀA`` are computed from ``X`` with rank-one
    corrections for the centring ``K½``. Exact when ``C_p`` is a multiple of the identity, and
    close when ``ρ‖C_p‖ ≪ ρλ(C'_x) + δ`` (see docs/algorithms.md). Bias: exactly as in
    :func:`solve_affine_rows`. Arguments as in :func:`solve_affine_rows`.
    """
    _check_delta(delta)
    n_rows, n_in = x_rows.shape
    n_out = p_rows.shape[1]
    b = float(batch_size)
    L = n_rows / b
    c = bias_coupling(rho, delta, L, has_bias)
    delta_e = delta + rho * torch.linalg.vector_norm(p_rows).square() / (b * n_out)
    p_sum = p_rows.sum(0) if has_bias else None
    x_mean = x_rows.sum(0).div_(b) if has_bias else None
    if n_rows < n_in:
        # K½ = (I − α11ᵀ/N)/√B is applied to N-vectors only (never to the N×n matrix X)
        alpha = 1.0 - math.sqrt(1.0 - min(c * L, 1.0))
        gram = x_rows @ x_rows.T
        pk = p_rows
        if alpha != 0.0:
            r = gram.mean(1)
            gram.sub_(r[:, None], alpha=alpha).sub_(r[None, :], alpha=alpha).add_(r.mean() * alpha * alpha)
            pk = p_rows - (alpha / n_rows) * p_sum
        gram.mul_(rho / b).diagonal().add_(delta_e)
        y = torch.cholesky_solve(pk, torch.linalg.cholesky(gram))  # (ρAAᵀ + δ_e I)⁻¹ P_k·√B
        if alpha != 0.0:
            y.sub_(y.mean(0), alpha=alpha)
        dW = torch.mm(y.mul_(1.0 / b).T, x_rows)  # = [(ρAAᵀ + δ_e I)⁻¹ P_k]ᵀ A
    else:
        g = torch.mm(p_rows.T, x_rows).div_(b)
        mat = torch.mm(x_rows.T, x_rows).mul_(rho / b)
        if c != 0.0:
            g.addr_(p_sum, x_mean, alpha=-c / b)
            mat.addr_(x_mean, x_mean, alpha=-rho * c)
        mat.diagonal().add_(delta_e)
        dW = torch.cholesky_solve(g.T, torch.linalg.cholesky(mat)).T
    db = bias_step(p_sum / b, dW, x_mean, rho, L, delta) if has_bias else None
    return dW, db


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
) -> Tensor:
    r"""The augmented Hamiltonian of a general module, up to a constant, differentiable in ``theta``:

    .. math::

        \tilde H(θ) = \tfrac1B Σ_s p̂_s·f(x_s, θ)
            − \tfrac{ρ}{2}\tfrac1B Σ_s ‖f(x_s, θ) − f(x_s, θ_k)‖²
            − \tfrac{ρ}{2}\tfrac1B Σ_s ‖∇_x[p̂_s·f(x_s, θ)] − ∇_x[p̂_s·f(x_s, θ_k)]‖²
            − \tfrac{δ}{2}‖θ − θ_k‖²

    Args:
        fn: ``fn(θ, x, extra) → y``, the module as a function of its parameters
            (``torch.func.functional_call``); ``extra`` carries any further inputs of the call.
        theta / theta_k: parameter dicts θ (requires grad) and θ_k (current, fixed).
        calls: per recorded call ``(x, p̂, extra, y_k, gx_k)`` with ``y_k = f(x, θ_k)`` and
            ``gx_k = ∇_x[p̂·f(x, θ_k)]`` (None when ρ = 0), as prepared by :func:`iterative_maximise`.
        batch_size: B; rho: ρ; delta: δ.

    The costate penalty differentiates the module output with respect to its first input exactly
    (double backward), including overlapping convolution patches.
    """
    b = float(batch_size)
    total = None
    for x, p, extra, y_k, gx_k in calls:
        xr = x.detach().requires_grad_(rho > 0.0)
        y = fn(theta, xr, extra)
        term = (p * y).sum() / b
        if rho > 0.0:
            term = term - 0.5 * rho * _sum_pow2(y - y_k) / b
            (gx,) = torch.autograd.grad((p * y).sum(), xr, create_graph=True)
            term = term - 0.5 * rho * _sum_pow2(gx - gx_k) / b
        total = term if total is None else total + term
    prox = sum(_sum_pow2(theta[k] - theta_k[k]) for k in theta)
    return total - 0.5 * delta * prox


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
) -> Dict[str, Tensor]:
    """Maximise :func:`augmented_hamiltonian` by ``steps`` iterations of an inner optimiser.

    Args:
        fn, theta_k, batch_size, rho, delta: as in :func:`augmented_hamiltonian`.
        calls: ``(x, p̂, extra)`` per recorded call (module input, costate at its output, the
            call's further inputs passed through to ``fn``).
        steps: inner iterations (default 10, the budget of the reference implementation).
        lr: inner step size (default 1.0, L-BFGS's natural scale).
        method: ``"lbfgs"`` (default: ``steps`` iterations with a strong-Wolfe line search),
            ``"adam"`` or ``"sgd"`` (``steps`` steps of gradient ascent).

    Returns the new parameters θ (detached), started from θ_k.
    """
    prepared = []
    for x, p, extra in calls:
        with torch.enable_grad():
            xr = x.detach().requires_grad_(rho > 0.0)
            y_k = fn(theta_k, xr, extra)
            gx_k = torch.autograd.grad((p * y_k).sum(), xr)[0].detach() if rho > 0.0 else None
        prepared.append((x, p, extra, y_k.detach(), gx_k))
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in theta_k.items()}
    params = list(theta.values())
    if method == "adam":
        inner = torch.optim.Adam(params, lr=lr)
    elif method == "sgd":
        inner = torch.optim.SGD(params, lr=lr)
    elif method == "lbfgs":
        inner = torch.optim.LBFGS(params, lr=lr, max_iter=steps, line_search_fn="strong_wolfe")
    else:
        raise ValueError(f"method must be 'adam', 'sgd' or 'lbfgs', got {method!r}")

    def closure():
        inner.zero_grad()
        with torch.enable_grad():
            loss = -augmented_hamiltonian(fn, theta, theta_k, prepared, batch_size, rho, delta)
            loss.backward()
        return loss

    for _ in range(1 if method == "lbfgs" else steps):
        inner.step(closure)
    return {k: v.detach() for k, v in theta.items()}
