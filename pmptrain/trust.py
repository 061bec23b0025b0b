r"""The trust region of a closed-form E-MSA step — a pure function of tensors.

A closed-form rule maximises the concave quadratic augmented Hamiltonian of one unit,
``H̃(Δ) = ⟨s, Δ⟩ − ½ΔᵀAΔ`` with ``s = −∇_θJ`` and ``A = ρ(C_x ⊕ C_p) + δI`` (docs/algorithms.md §2),
at ``Δ* = A⁻¹s``. ``H̃`` is only a model of the loss: its penalties measure how far the step moves the
layer's own states and costates under the *current* statistics, and nothing bounds what the step
does to the layers after it once ``ρ·C`` is small against the gradient (a small costate under
``rho_scale="costate"``, a large ``lr``). The safeguard is a trust region in the unit's own units,

.. math::

    ‖Δ‖ ≤ τ·s·\max(‖θ_k‖, ‖θ‖_0),\qquad ‖θ‖_0^2 = Σ_{p∈unit} \mathrm{rows}(p),

(``τ`` = ``max_step``, ``s = lr/base_lr`` the schedule's factor, ``‖θ‖_0`` the norm of a unit whose
every output row has norm 1: the floor for zero-initialised and tiny parameters), enforced by
shortening the maximiser along itself, ``Δ = α Δ*`` with
``α = min(1, τ s max(‖θ_k‖, ‖θ‖_0)/‖Δ*‖)``. Shortening keeps the step an ascent step of ``H̃``:
``H̃(αΔ*) = α(1 − α/2)⟨s, Δ*⟩ ≥ 0`` for ``α ∈ [0, 1]`` (so also ``⟨−∇J, αΔ*⟩ ≥ 0``: the first-order
predicted change of the loss is never an increase), and the schedule's factor keeps "a schedule
scales every closed-form step exactly by s". Everything here imports only torch.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["trust_region_factor", "unit_floor_sq", "gain_factor"]


def unit_floor_sq(params: Sequence[Tensor]) -> float:
    """``‖θ‖_0² = Σ_p rows(p)``: the squared norm of a unit whose every output row (the first
    dimension of each parameter; 1 for a scalar) has norm 1."""
    return float(sum(p.shape[0] if p.dim() else 1 for p in params))


def trust_region_factor(step_sq: Tensor, param_sq: Tensor, floor_sq: float, radius: float) -> Tensor:
    r"""``α = min(1, radius·max(‖θ‖, ‖θ‖_0)/‖Δ*‖)`` as a 0-dim tensor (no host synchronisation).

    Args:
        step_sq: ``‖Δ*‖²``, the squared norm of the unit's unconstrained maximiser (0-dim tensor).
        param_sq: ``‖θ_k‖²``, the squared norm of the unit's parameters (0-dim tensor).
        floor_sq: ``‖θ‖_0²`` (:func:`unit_floor_sq`), ≥ 0.
        radius: ``τ·s`` ≥ 0 (0 freezes the unit: ``α = 0`` unless ``Δ* = 0``).

    ``α = 1`` when ``Δ* = 0`` or the step is inside the region; ``α ∈ [0, 1]`` always (NaN only
    for a non-finite ``Δ*``, which the shell then skips as a non-finite step).
    """
    if radius < 0:
        raise ValueError(f"trust_region_factor: radius must be >= 0, got {radius!r}")
    ref = torch.clamp(param_sq, min=floor_sq).sqrt() * radius
    norm = step_sq.sqrt()
    return torch.where(norm > ref, ref / torch.clamp(norm, min=torch.finfo(norm.dtype).tiny), torch.ones_like(norm))


def gain_factor(gain: float, loss: float, kappa: float) -> float:
    r"""``a = min(1, κ·J/G)``: the factor that keeps a whole step's predicted decrease of the loss
    within a fraction of the loss (docs/algorithms.md §5, "The predicted-gain guard").

    Every unit maximises its own ``H̃``, whose penalties see only how the unit's own states and
    costates move; the units' steps add up. Their first-order prediction of the loss change is
    ``J(θ + Δ) ≈ J(θ) − G`` with ``G = Σ_units ⟨−∇J, Δ_unit⟩`` (the step's Hamiltonian gain). For a
    loss bounded below by 0 (cross-entropy, squared error) a prediction ``G > J`` lies below the
    bound: the linear model — and every unit's ``H̃``, which is its first-order term plus penalties —
    is used outside where it can hold. The guard shortens the whole step along itself,
    ``Δ ← aΔ``, to ``G ≤ κJ``: each unit's step stays an ascent step of its ``H̃`` (as under the
    trust region, ``H̃(aΔ*) ≥ 0`` for ``a ∈ [0, 1]``) and the predicted decrease a fraction ``κ`` of
    what is left to gain.

    Args:
        gain: ``G`` (the step's first-order gain, ``−Σ⟨∇J, Δθ⟩``).
        loss: ``J``, the loss the gradient is of; ``J ≤ 0`` or non-finite: ``a = 1`` (no bound known).
        kappa: ``κ > 0``.
    """
    if kappa <= 0:
        raise ValueError(f"gain_factor: kappa must be > 0, got {kappa!r}")
    if not (loss > 0.0 and gain > kappa * loss) or loss != loss or loss == float("inf"):
        return 1.0
    return kappa * loss / gain
