r"""Closed-loop control at inference: per-input controls that pull the input and chosen hidden states
back towards embedding manifolds of clean data, solved by the method of successive approximations.

Chen, Li & Zhang, "Towards Robust Neural Networks via Close-loop Control" (ICLR 2021) and
"Self-Healing Robust Neural Networks via Closed-Loop Control" (JMLR 2022). The trained network is
a fixed dynamical system; at the controlled points ``t = 0..T−1`` (the input, and the outputs of the
chosen layers) a control ``u_t`` is added to the state:

.. math::

    s_t = x_t + u_t,\qquad x_{t+1} = F_t(s_t)\quad (F_t:\ \text{the layers between point } t \text{ and } t+1),

    J(u) = \sum_t \big[\,\ell_t(s_t) + \tfrac{c}{2}\|u_t\|^2\big],\qquad
    \ell_t(s) = \tfrac12\|(I - V_tV_t^\top)(s - \mu_t)\|^2,

with ``μ_t``, ``V_t`` the mean and the leading principal directions of the clean states at point t
(``manifold="pca"``): ``ℓ_t`` is the squared distance of the controlled state from the affine PCA
manifold. The controls minimise J per input. MSA (``outer`` iterations): a forward pass with the
current controls gives the states; a backward pass gives the costates
``p_{t+1} = −∂(Σ_{τ>t} ℓ_τ)/∂x_{t+1}``; then each point's control maximises its Hamiltonian

.. math::

    H_t(u) = p_{t+1}\cdot F_t(x_t + u) - \ell_t(x_t + u) - \tfrac{c}{2}\|u\|^2

with the states and costates frozen (no ``p`` term at the last point), by ``inner`` steps of
:func:`pmptrain.hamiltonian.iterative_maximise`. The running cost enters the Hamiltonian the usual
way — as an extra state coordinate ``z_{t+1} = z_t + ℓ_t(s_t)`` whose costate is −1 — so the
module function handed to the maximiser returns ``[F_t(x + u), ℓ_t(x + u)]`` and the costate is
``[p_{t+1}, −1]``; ``c`` is its ``l2`` term, and its ``rho`` (default 1) the E-MSA state-feasibility
penalty. Each sample's Hamiltonian is independent (``batch_size = 1`` in its normalisation: the
sum over samples), and plain gradient ascent (``method="sgd"``) keeps the samples uncoupled.

The model must be an ``nn.Sequential`` (points are between its children); it is run in eval mode.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..hamiltonian import iterative_maximise

__all__ = ["PCAManifold", "ClosedLoopController"]


class PCAManifold:
    """The affine manifold ``μ + span(V)`` of clean states at one point (flattened per sample).

    ``fit(states)``: ``μ`` the mean; ``V`` the leading right singular vectors of the centred states
    (``torch.pca_lowrank`` with ``q = min(max_rank, N, d)``), keeping the fewest that explain
    ``energy`` of the total variance (or ``rank`` of them if given)."""

    def __init__(self, energy: float = 0.95, rank: Optional[int] = None, max_rank: int = 256):
        if not (0.0 < energy <= 1.0):
            raise ValueError(f"energy must be in (0, 1], got {energy!r}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            raise ValueError(f"rank must be an integer >= 0 or None, got {rank!r}")
        self.energy, self.rank, self.max_rank = energy, rank, max_rank
        self.mean: Optional[Tensor] = None
        self.basis: Optional[Tensor] = None  # d × k, orthonormal columns
        self.explained = float("nan")

    @torch.no_grad()
    def fit(self, states: Tensor) -> "PCAManifold":
        z = states.flatten(1).to(torch.float64)
        n, d = z.shape
        self.mean = z.mean(0)
        c = z - self.mean
        total = float(c.pow(2).sum()) / max(n, 1)
        q = min(self.max_rank, n, d) if self.rank is None else min(self.rank, n, d)
        if q == 0 or total == 0.0:
            self.basis, self.explained = z.new_zeros(d, 0), 1.0
            return self
        gen = torch.Generator().manual_seed(0)
        state = torch.random.get_rng_state()
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        try:
            _, s, v = torch.pca_lowrank(c, q=q, center=False, niter=4)
        finally:
            torch.random.set_rng_state(state)
        var = s.pow(2) / max(n, 1)
        if self.rank is None:
            cum = torch.cumsum(var, 0) / total
            k = int((cum < self.energy).sum()) + 1
            k = min(k, q)
        else:
            k = q
        self.basis = v[:, :k].contiguous()
        self.explained = float(var[:k].sum() / total)
        return self

    def residual(self, s: Tensor) -> Tensor:
        """``(I − VVᵀ)(s − μ)`` per sample (flattened), in ``s``'s dtype."""
        c = s.flatten(1) - self.mean.to(s.dtype)
        v = self.basis.to(s.dtype)
        return c - (c @ v) @ v.T

    def cost(self, s: Tensor) -> Tensor:
        """``ℓ(s) = ½‖(I − VVᵀ)(s − μ)‖²`` per sample."""
        return 0.5 * self.residual(s).pow(2).sum(1)


def _children(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"ClosedLoopController: model must be an nn.Sequential (controls sit between its "
                        f"children), got {type(model).__name__}")
    return list(model.named_children())


class ClosedLoopController:
    """Per-input closed-loop control of a trained ``nn.Sequential`` (Chen, Li & Zhang 2021/2022).

    Args:
        model: the trained network, an ``nn.Sequential``; used in eval mode, never modified.
        layers: names (or integer positions) of children whose *outputs* are controlled, in addition
            to the input (default: none — the input only).
        manifold: ``"pca"`` (the only embedding implemented; the papers also use autoencoders).
        control_input: control the input itself (default True).
        energy: fraction of the clean states' variance the PCA manifold keeps (default 0.95).
        rank: fixed number of principal directions instead (default None). max_rank: 256.
        outer: MSA iterations (default 3). inner: gradient-ascent steps per Hamiltonian maximisation
            (default 10) — the papers' 3 × 10.
        lr: inner step size (default 0.2). reg: c, the control cost (default 0.1). rho: the E-MSA
            state-feasibility penalty ``(ρ/2)‖F_t(x+u) − F_t(x+u_k)‖²`` of the maximiser (default 1;
            0 is basic MSA, which overshot on a small CNN at lr 0.5).

    After each MSA iteration a sample keeps its new controls only if its ``J`` did not increase,
    so ``J(u*) ≤ J(0)`` for every input.
        bounds: clip the controlled input into this box (default None).
    """

    def __init__(self, model: nn.Module, layers: Sequence[Union[str, int]] = (), manifold: str = "pca",
                 control_input: bool = True, energy: float = 0.95, rank: Optional[int] = None,
                 max_rank: int = 256, outer: int = 3, inner: int = 10, lr: float = 0.2, reg: float = 0.1,
                 rho: float = 1.0, bounds: Optional[Tuple[float, float]] = None):
        kids = _children(model)
        if manifold != "pca":
            raise ValueError(f"manifold: only 'pca' is implemented, got {manifold!r}")
        names = [n for n, _ in kids]
        points = [0] if control_input else []
        for l in layers:
            if isinstance(l, int) and not isinstance(l, bool):
                if not 0 <= l < len(kids) - 1:
                    raise ValueError(f"layers: position {l} is not a child before the last of the model "
                                     f"({len(kids)} children)")
                points.append(l + 1)
            elif isinstance(l, str) and l in names[:-1]:
                points.append(names.index(l) + 1)
            else:
                raise ValueError(f"layers: {l!r} is not the name of a child before the last; children: {names}")
        if not points:
            raise ValueError("ClosedLoopController: nothing to control (control_input=False and no layers)")
        for name, v in (("outer", outer), ("inner", inner)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        for name, v in (("lr", lr), ("reg", reg), ("rho", rho)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if reg == 0.0 and inner > 0:
            raise ValueError("reg must be > 0 (the control cost is the inner maximiser's proximal term)")
        self.model = model
        self.mods = [m for _, m in kids]
        self.points = sorted(set(points))
        self.manifolds = [PCAManifold(energy, rank, max_rank) for _ in self.points]
        self.outer, self.inner, self.lr, self.reg, self.rho = outer, inner, float(lr), float(reg), float(rho)
        self.bounds = bounds
        self.fitted = False

    # ------------------------------------------------------------------ the dynamics
    def _stage(self, i: int, s: Tensor) -> Tensor:
        """``F_i``: children from point i to point i+1 (to the end for the last point)."""
        hi = self.points[i + 1] if i + 1 < len(self.points) else len(self.mods)
        for mod in self.mods[self.points[i]:hi]:
            s = mod(s)
        return s

    def _prefix(self, x: Tensor) -> Tensor:
        for mod in self.mods[:self.points[0]]:
            x = mod(x)
        return x

    def _clip(self, i: int, x: Tensor, u: Tensor) -> Tensor:
        if i == 0 and self.points[0] == 0 and self.bounds is not None:
            return (x + u).clamp(self.bounds[0], self.bounds[1]) - x
        return u

    def rollout(self, x: Tensor, controls: Optional[List[Tensor]] = None) -> Tuple[List[Tensor], Tensor]:
        """Pre-control states ``[x_0..x_{T−1}]`` at the points and the logits, with ``controls``
        (default none). Differentiable (no ``no_grad`` inside)."""
        states = []
        h = self._prefix(x)
        for i in range(len(self.points)):
            states.append(h)
            s = h if controls is None else h + self._clip(i, h, controls[i])
            h = self._stage(i, s)
        return states, h

    def objective(self, x: Tensor, controls: List[Tensor]) -> Tensor:
        """``J(u)`` per sample (the quantity the controls minimise)."""
        with torch.no_grad(), _eval(self.model):
            states, _ = self.rollout(x, controls)
            return sum(m.cost(h + self._clip(i, h, u)) + 0.5 * self.reg * u.flatten(1).pow(2).sum(1)
                       for i, (m, h, u) in enumerate(zip(self.manifolds, states, controls)))

    # ------------------------------------------------------------------ fit and solve
    @torch.no_grad()
    def fit(self, x: Tensor, batch_size: int = 500) -> "ClosedLoopController":
        """Fit the PCA manifold of every controlled point on clean inputs ``x``."""
        with _eval(self.model):
            parts: List[List[Tensor]] = [[] for _ in self.points]
            for k in range(0, x.shape[0], batch_size):
                states, _ = self.rollout(x[k:k + batch_size])
                for i, s in enumerate(states):
                    parts[i].append(s.detach())
        for m, p in zip(self.manifolds, parts):
            m.fit(torch.cat(p))
        self.fitted = True
        return self

    def solve(self, x: Tensor) -> List[Tensor]:
        """The controls ``u*(x)`` by ``outer`` MSA iterations of ``inner`` steps each (detached)."""
        if not self.fitted:
            raise RuntimeError("ClosedLoopController: call fit(clean_inputs) before using it")
        x = x.detach()
        with _eval(self.model), _no_param_grad(self.model):
            states, _ = self.rollout(x)
            controls = [torch.zeros_like(s) for s in states]
            last = len(self.points) - 1
            for _ in range(self.outer):
                with torch.enable_grad():
                    h = self._prefix(x)
                    xs, cost = [], 0.0
                    for i in range(len(self.points)):
                        if i == 1:  # a leaf here: later points are intermediates whose .grad is the total derivative
                            h = h.detach().requires_grad_(True)
                        xs.append(h)
                        s = h + self._clip(i, h, controls[i])
                        cost = cost + self.manifolds[i].cost(s).sum()
                        if i < last:
                            h = self._stage(i, s)
                    costates = [None] * len(self.points)
                    if last > 0:
                        grads = torch.autograd.grad(cost, xs[1:], allow_unused=True)
                        costates[1:] = [None if g is None else -g.detach() for g in grads]
                states = [h.detach() for h in xs]
                proposal = [self._maximise(i, states[i], controls[i], costates[i + 1] if i < last else None)
                            for i in range(len(self.points))]
                # accept per sample only if J did not increase (basic MSA can overshoot; this keeps
                # every iteration a descent step of the controls' own objective)
                better = self.objective(x, proposal) <= self.objective(x, controls)
                controls = [torch.where(better.view(-1, *([1] * (u.dim() - 1))), v, u)
                            for u, v in zip(controls, proposal)]
        return controls

    def _maximise(self, i: int, x: Tensor, u: Tensor, p_next: Optional[Tensor]) -> Tensor:
        """``argmax_u H_i(u)`` by ``inner`` ascent steps from the current ``u``."""
        if self.inner == 0:
            return u
        man, n = self.manifolds[i], x.shape[0]

        def fn(theta, xin, extra):
            s = xin + self._clip(i, xin, theta["u"])
            run = man.cost(s).unsqueeze(1)
            if p_next is None:
                return run
            return torch.cat([self._stage(i, s).flatten(1), run], dim=1)

        minus_one = -torch.ones(n, 1, dtype=x.dtype, device=x.device)
        p_hat = minus_one if p_next is None else torch.cat([p_next.flatten(1), minus_one], dim=1)
        # δ → 0: iterative_maximise asks for a proximal term with plain gradient ascent; the control
        # cost c (its l2 term) already keeps the ascent bounded, so δ is set negligibly small.
        out = iterative_maximise(fn, {"u": u.detach()}, [(x, p_hat, None)], batch_size=1, rho=self.rho,
                                 delta=1e-12, steps=self.inner, lr=self.lr, method="sgd", l2=self.reg,
                                 rho_costate=0.0)
        return out["u"]

    # ------------------------------------------------------------------ use
    def __call__(self, x: Tensor) -> Tensor:
        """Controlled logits (no gradient)."""
        controls = self.solve(x)
        with torch.no_grad(), _eval(self.model):
            return self.rollout(x, controls)[1]

    def bpda(self, x: Tensor) -> Tensor:
        """Controlled logits, differentiable in ``x`` with the solved controls held as constants in
        the backward pass (BPDA, Athalye et al. 2018): the adaptive attacker's model."""
        controls = [u.detach() for u in self.solve(x)]
        with _eval(self.model):
            return self.rollout(x, controls)[1]


class _eval:
    """Context: the model in eval mode, restored afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.was = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was)


class _no_param_grad:
    """Context: parameters do not require grad (the solve differentiates in the states only)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self.flags:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, f in self.flags:
            p.requires_grad_(f)
