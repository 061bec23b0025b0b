"""White-box evasion attacks: FGSM and PGD-k with random restarts, in the ℓ∞ and ℓ2 balls.

The threat model: an input ``x`` may be replaced by any ``x' = x + δ`` with ``‖δ‖ ≤ ε`` (``norm``
``"linf"`` or ``"l2"``, the ℓ2 norm taken per sample over all its features) that stays in the valid
input box ``bounds = (lo, hi)`` (``None``: unbounded). The attacker maximises the loss
``L(f(x + δ), y)`` (cross-entropy by default).

* **FGSM** (Goodfellow et al., ICLR 2015): ``δ = Π(ε·s(∇_x L))``, one step of length ε;
* **PGD-k** (Madry et al., ICLR 2018): from ``δ₀`` (zero, or uniform in the ball with
  ``random_start``), ``k`` steps ``δ ← Π(δ + α·s(∇_δ L(x + δ)))``; with ``restarts = r`` the attack
  runs r times and keeps, per sample, a misclassified point if any restart found one, otherwise the
  one of highest loss.

``s(g)`` is the steepest-ascent direction of the norm: ``sign(g)`` for ℓ∞, ``g/‖g‖₂`` (per sample)
for ℓ2. ``Π`` projects onto the ε-ball, then clips ``x + δ`` into the box. The box clip cannot leave
the ball: it moves each coordinate of ``x + δ`` towards ``x`` (``x`` lies in the box), which
shrinks every ``|δ_i|``. Conventions: ``sign(0) = 0`` (a zero gradient does not move the point);
``‖g‖₂ = 0`` gives a zero ℓ2 step.

The model is evaluated in whatever mode it is in (call ``model.eval()`` first for an evaluation); a
``model`` may be any callable mapping a batch to logits (a controlled model, :mod:`.closed_loop`).
Gradients are taken with :func:`torch.autograd.grad` with respect to δ only: no parameter ``.grad``
is touched.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["NORMS", "check_threat", "project", "clip_box", "random_delta", "ascent_direction",
           "fgsm", "pgd", "accuracy", "robust_accuracy"]

NORMS = ("linf", "l2")
Bounds = Optional[Tuple[float, float]]


def check_threat(eps, norm: str, bounds: Bounds = (0.0, 1.0), where: str = "attack") -> None:
    """Raise ``ValueError`` naming the argument if ``eps``, ``norm`` or ``bounds`` are invalid."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{where}: eps must be a finite number >= 0, got {eps!r}")
    if norm not in NORMS:
        raise ValueError(f"{where}: norm must be one of {NORMS}, got {norm!r}")
    if bounds is not None:
        if len(bounds) != 2 or not all(math.isfinite(float(b)) for b in bounds) or not bounds[0] < bounds[1]:
            raise ValueError(f"{where}: bounds must be (lo, hi) with lo < hi finite, or None; got {bounds!r}")


def _per_sample_norm(t: Tensor) -> Tensor:
    """‖t_s‖₂ per sample, shaped to broadcast against ``t``."""
    n = t.flatten(1).norm(dim=1)
    return n.view(-1, *([1] * (t.dim() - 1)))


def project(delta: Tensor, eps: float, norm: str) -> Tensor:
    """The Euclidean projection of each sample's ``delta`` onto ``{‖δ‖ ≤ eps}``."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = _per_sample_norm(delta)
    return delta * torch.where(n > eps, eps / n.clamp_min(1e-30), torch.ones_like(n))


def clip_box(x: Tensor, delta: Tensor, bounds: Bounds) -> Tensor:
    """``δ`` changed so that ``x + δ`` lies in ``bounds`` (unchanged for ``None``)."""
    if bounds is None:
        return delta
    return (x + delta).clamp(bounds[0], bounds[1]) - x


def random_delta(x: Tensor, eps: float, norm: str, bounds: Bounds = (0.0, 1.0),
                 generator: Optional[torch.Generator] = None) -> Tensor:
    """A start inside the ball: ℓ∞ uniform in ``[−ε, ε]`` per coordinate; ℓ2 uniform in the ball
    (a Gaussian direction, radius ``ε·U^{1/d}``); then clipped into the box."""
    if norm == "linf":
        d = (torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device) * 2 - 1) * eps
    else:
        g = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        dim = x[0].numel()
        u = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, dtype=x.dtype, device=x.device)
        d = g / _per_sample_norm(g).clamp_min(1e-30) * eps * u.pow(1.0 / dim)
    return clip_box(x, d, bounds)


def ascent_direction(grad: Tensor, norm: str) -> Tensor:
    """The steepest-ascent unit step of ``norm``: ``sign(g)`` (ℓ∞) or ``g/‖g‖₂`` per sample (ℓ2)."""
    if norm == "linf":
        return grad.sign()
    return grad / _per_sample_norm(grad).clamp_min(1e-30)


def _loss_grad(model: Callable[[Tensor], Tensor], x: Tensor, delta: Tensor, y: Tensor, loss_fn) -> Tuple[Tensor, Tensor]:
    """Per-sample losses at ``x + δ``, ``∇_δ Σ_s L_s`` and the logits (all detached)."""
    with torch.enable_grad():
        d = delta.detach().requires_grad_(True)
        out = model(x + d)
        losses = loss_fn(out, y)
        (g,) = torch.autograd.grad(losses.sum(), d)
    return losses.detach(), g.detach(), out.detach()


def _ce(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y, reduction="none")


def fgsm(model, x: Tensor, y: Tensor, eps: float, norm: str = "linf", bounds: Bounds = (0.0, 1.0),
         loss_fn=_ce) -> Tensor:
    """FGSM: ``x + Π(ε·s(∇_x L(f(x), y)))``. ``loss_fn(logits, y)`` returns per-sample losses
    (default cross-entropy). Returns the adversarial batch (detached)."""
    check_threat(eps, norm, bounds, "fgsm")
    _, g, _ = _loss_grad(model, x, torch.zeros_like(x), y, loss_fn)
    delta = clip_box(x, project(eps * ascent_direction(g, norm), eps, norm), bounds)
    return (x + delta).detach()


def pgd(model, x: Tensor, y: Tensor, eps: float, alpha: Optional[float] = None, steps: int = 10,
        norm: str = "linf", restarts: int = 1, random_start: bool = True, bounds: Bounds = (0.0, 1.0),
        loss_fn=_ce, generator: Optional[torch.Generator] = None) -> Tensor:
    """PGD-``steps`` with ``restarts`` random restarts (Madry et al. 2018).

    Args:
        model: callable batch → logits (its mode is left as it is).
        x, y: inputs and integer labels.
        eps: radius ε. alpha: step α (default ``2.5·ε/steps``, Madry et al.'s rule; ``ε/4`` for
            ``steps ≤ 10`` would be the training setting). steps: k (default 10).
        norm: ``"linf"`` (default) or ``"l2"``. restarts: r ≥ 1 (default 1).
        random_start: start uniformly in the ball (default True); False starts at δ = 0 (then
            restarts > 1 repeat the same deterministic attack and are refused).
        bounds: the input box (default (0, 1)); None for none. loss_fn: per-sample loss (default
            cross-entropy). generator: for the random starts.

    Returns the adversarial batch (detached); per sample the first restart that misclassifies,
    otherwise the restart of highest final loss.
    """
    check_threat(eps, norm, bounds, "pgd")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"pgd: steps must be an integer >= 0, got {steps!r}")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"pgd: restarts must be an integer >= 1, got {restarts!r}")
    if restarts > 1 and not random_start:
        raise ValueError("pgd: restarts > 1 needs random_start=True (a deterministic start repeats itself)")
    alpha = 2.5 * eps / max(steps, 1) if alpha is None else float(alpha)
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"pgd: alpha must be a finite number >= 0, got {alpha!r}")
    best = x.detach().clone()
    best_loss = torch.full((x.shape[0],), -math.inf, dtype=x.dtype, device=x.device)
    best_wrong = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        delta = random_delta(x, eps, norm, bounds, generator) if random_start else torch.zeros_like(x)
        for _ in range(steps):
            _, g, _ = _loss_grad(model, x, delta, y, loss_fn)
            delta = clip_box(x, project(delta + alpha * ascent_direction(g, norm), eps, norm), bounds)
        with torch.no_grad():
            out = model(x + delta)
            loss = loss_fn(out, y)
            wrong = out.argmax(1) != y
        take = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
        best[take] = (x + delta)[take].detach()
        best_loss = torch.where(take, loss, best_loss)
        best_wrong = best_wrong | wrong
    return best


@torch.no_grad()
def accuracy(model, x: Tensor, y: Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` in batches (mode left as it is)."""
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    return correct / max(1, x.shape[0])


def robust_accuracy(model, x: Tensor, y: Tensor, attack: Callable[..., Tensor], batch_size: int = 500,
                    target=None) -> float:
    """Accuracy of ``target`` (default ``model``) on ``attack(model, xb, yb)`` per batch: the attack
    sees ``model``, the accuracy is measured on ``target`` (a defended model attacked through its
    undefended part: the closed-loop controller's "attack the uncontrolled model" protocol)."""
    target = model if target is None else target
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        xa = attack(model, xb, yb)
        with torch.no_grad():
            correct += int((target(xa).argmax(1) == yb).sum())
    return correct / max(1, x.shape[0])
