"""Gradient steps for parameters without a maximiser: ascent on H by Adam or SGD with momentum.

The Hamiltonian gradient of a parameter is ``−∇J`` (docs/algorithms.md §1), so a descent step on
the loss is an ascent step on H. These are pure functions returning the parameter change and the
new moments (nothing is modified in place), so the optimizer can discard a step that turns out
non-finite. Weight decay is not part of them: the optimizer applies it, decoupled, to every rule
alike (docs/algorithms.md, "Weight decay").
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
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
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Adam (Kingma & Ba 2015).

    ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``,
    ``Δθ = −lr·(m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε)`` with ``t = step`` (1-based), ``g = grad``,
    ``m = exp_avg``, ``v = exp_avg_sq``, ``(β₁, β₂) = betas``, ``ε = eps``. Returns ``(Δθ, m, v)``.
    A complex parameter is updated as torch's ``Adam`` does: on its real view (the real and
    imaginary parts are two real entries, each with its own ``v``, kept in a complex tensor).
    """
    if grad.is_complex():
        real = torch.view_as_real
        d, m, v = adam_delta(real(grad), real(exp_avg), real(exp_avg_sq), step, lr, betas, eps)
        return torch.view_as_complex(d), torch.view_as_complex(m), torch.view_as_complex(v)
    beta1, beta2 = betas
    m = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1)
    v = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    denom = (v / bc2).sqrt_().add_(eps)
    delta = (m / bc1).div_(denom).mul_(-lr)
    return delta, m, v


def sgd_delta(
    grad: Tensor,
    momentum_buffer: Optional[Tensor],
    lr: float,
    momentum: float,
) -> Tuple[Tensor, Optional[Tensor]]:
    r"""SGD with heavy-ball momentum, torch's convention: ``b ← μb + g`` (``b = g`` on the first
    step, ``momentum_buffer=None``), ``Δθ = −lr·b``; ``μ = momentum``. Returns ``(Δθ, b)`` (``b`` is
    None without momentum)."""
    if momentum == 0.0:
        return grad.mul(-lr), None
    buf = grad.clone() if momentum_buffer is None else momentum_buffer.mul(momentum).add_(grad)
    return buf.mul(-lr), buf
