"""Fallback steps for parameters without a closed form: gradient ascent on H by Adam or SGD.

The Hamiltonian gradient of a parameter is ``−∇J`` (ALGORITHMS.md §1), so a descent step on the
loss is an ascent step on H. These are pure functions returning the parameter change and the new
state (nothing is modified in place), so the optimizer can discard a step that turns out
non-finite.
"""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

__all__ = ["adam_delta", "sgd_delta"]


def adam_delta(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    lr: float,
    betas: Tuple[float, float],
    eps: float,
    weight_decay: float,
    param: Tensor,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Adam (Kingma & Ba 2015) with decoupled weight decay (AdamW) when ``weight_decay > 0``.

    ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``, ``Δθ = −lr·(m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε)
    − lr·wd·θ`` with ``t = step`` (1-based). Returns ``(Δθ, m, v)``.
    """
    beta1, beta2 = betas
    m = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1)
    v = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    denom = (v / bc2).sqrt_().add_(eps)
    delta = (m / bc1).div_(denom).mul_(-lr)
    if weight_decay != 0.0:
        delta.add_(param, alpha=-lr * weight_decay)
    return delta, m, v


def sgd_delta(
    grad: Tensor,
    momentum_buffer: Optional[Tensor],
    lr: float,
    momentum: float,
    weight_decay: float,
    param: Tensor,
) -> Tuple[Tensor, Optional[Tensor]]:
    r"""SGD with heavy-ball momentum (torch convention ``b ← μb + g``, ``Δθ = −lr·b``) and L2 weight
    decay ``g ← g + wd·θ``. ``momentum_buffer=None`` starts the buffer at ``g``. Returns
    ``(Δθ, b)`` (``b`` is None without momentum)."""
    if weight_decay != 0.0:
        grad = grad.add(param, alpha=weight_decay)
    if momentum == 0.0:
        return grad.mul(-lr), None
    buf = grad.clone() if momentum_buffer is None else momentum_buffer.mul(momentum).add_(grad)
    return buf.mul(-lr), buf
