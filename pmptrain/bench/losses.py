"""Per-sample training losses of the bench, by name."""

from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F

__all__ = ["LOSSES", "squared_hinge_loss"]


def squared_hinge_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample squared hinge loss on one-hot ±1 targets (Courbariaux et al.; Li & Hao 2018).

    With ``t_k = +1`` for the true class and ``−1`` otherwise,
    ``ℓ_s = (1/K) Σ_k max(0, 1 − t_k · logits_sk)²``; the batch mean of ``ℓ_s`` is then the mean
    over all ``B·K`` entries, as in the reference code ``mean(sqr(maximum(0, 1 − t·y)))``.
    """
    t = torch.full_like(logits, -1.0).scatter_(1, y.view(-1, 1), 1.0)
    return torch.clamp(1.0 - t * logits, min=0.0).pow(2).mean(dim=1)


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


#: Per-sample losses by name: ``fn(logits, labels) -> (B,)``.
LOSSES: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross-entropy": _cross_entropy,
    "squared-hinge": squared_hinge_loss,
}
