"""Baseline optimizers for discrete-weight networks: BinaryConnect, TWN and Bop.

They exist for fair comparison with ``DiscreteMSA`` (same models, same data, same budget;
``ALGORITHMS.md`` §3) and share one interface:

* ``params`` is either a model (its discrete weights — see :func:`pmptrain.quant.discretize_` — are
  trained by the rule; **every other trainable parameter** — biases, norm affines, kept
  full-precision layers, trainable scales — by an internal ``torch.optim.Adam`` with learning rate
  ``fallback_lr``, default 1e-3; ``fallback_lr=None`` leaves them alone), or an iterable of
  :class:`~pmptrain.quant.DiscreteTensor`, tensors or param-group dicts (then only those are trained
  and there is no fallback).
* Non-finite gradients: if any gradient (discrete or fallback) contains NaN/Inf the whole step is
  skipped — weights and optimizer state untouched — and ``skipped_steps`` is incremented.
* ``state_dict()`` holds the per-weight state (latents, moments), the fallback's state and
  ``skipped_steps``; loading it into a freshly built optimizer resumes bit-exactly.
* A learning-rate scheduler attached to the optimizer schedules the discrete groups only; the
  fallback is reachable as ``opt.fallback``.

References:
    M. Courbariaux, Y. Bengio, J.-P. David, "BinaryConnect: Training Deep Neural Networks with
    binary weights during propagations", NeurIPS 2015.
    F. Li, B. Zhang, B. Liu, "Ternary Weight Networks", arXiv:1605.04711, 2016.
    K. Helwegen, J. Widdicombe, L. Geiger, Z. Liu, K.-T. Cheng, R. Nusselder, "Latent Weights Do Not
    Exist: Rethinking Binarized Neural Network Optimization", NeurIPS 2019 (arXiv:1906.02107).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .quant import DiscreteTensor, discrete_parameters

__all__ = ["BinaryConnect", "TWN", "Bop"]


def _sign(x: Tensor) -> Tensor:
    """sign with sign(0) = +1 (never 0)."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def _check(name: str, value, lo: float = 0.0, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name}: must be a number in {lb}{lo}, {hi}{rb}, got {value!r}")


class _DiscreteBaseline(Optimizer):
    """Shared plumbing: input parsing, fallback Adam, non-finite skip, state_dict extras."""

    _binary_only = False

    def __init__(self, params, defaults: Dict[str, Any], fallback_lr: Optional[float]) -> None:
        fallback_params: List[Tensor] = []
        self._scales: Dict[int, Optional[Tensor]] = {}
        if isinstance(params, nn.Module):
            dts = discrete_parameters(params)
            if not dts:
                raise ValueError("params: the model has no discrete weights; call pmptrain.discretize_ first")
            for d in dts:
                self._check_grid(d)
                self._scales[id(d.param)] = d.scale
            ids = {id(d.param) for d in dts}
            groups = [{"params": [d.param for d in dts]}]
            if fallback_lr is not None:
                _check("fallback_lr", fallback_lr, lo=0.0)
                fallback_params = [p for p in params.parameters() if p.requires_grad and id(p) not in ids]
        else:
            groups = []
            items = list(params)
            if not items:
                raise ValueError("params: got an empty parameter list")
            if all(isinstance(g, dict) for g in items):
                for g in items:
                    g = dict(g)
                    plist = g["params"]
                    plist = [plist] if isinstance(plist, (Tensor, DiscreteTensor)) else list(plist)
                    g["params"] = [self._unwrap(p) for p in plist]
                    groups.append(g)
            else:
                groups = [{"params": [self._unwrap(p) for p in items]}]
        super().__init__(groups, defaults)
        self.fallback: Optional[Optimizer] = torch.optim.Adam(fallback_params, lr=fallback_lr) if fallback_params else None
        self.skipped_steps = 0
        # fraction of discrete weights whose sign pattern changed in the last step (diagnostics)
        self.last_flip_ratio = 0.0

    def _check_grid(self, d: DiscreteTensor) -> None:
        if self._binary_only and d.grid.values != (-1.0, 1.0):
            raise ValueError(f"params: {type(self).__name__} needs binary weights, {d.name!r} has grid {d.grid.name}")

    def _unwrap(self, p) -> Tensor:
        if isinstance(p, DiscreteTensor):
            self._check_grid(p)
            self._scales[id(p.param)] = p.scale
            return p.param
        if not isinstance(p, Tensor):
            raise ValueError(f"params: expected tensors, DiscreteTensors or param groups, got {type(p).__name__}")
        return p

    def _all_grads_finite(self) -> bool:
        flags = [torch.isfinite(p.grad).all() for g in self.param_groups for p in g["params"] if p.grad is not None]
        if self.fallback is not None:
            flags += [torch.isfinite(p.grad).all() for g in self.fallback.param_groups for p in g["params"] if p.grad is not None]
        return bool(torch.stack(flags).all()) if flags else True

    @torch.no_grad()
    def step(self, closure=None):
        """One step of the rule on the discrete weights (and of the fallback on the rest)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._all_grads_finite():
            self.skipped_steps += 1
            return loss
        flips, total = 0, 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                old = p.detach().clone()
                self._update(p, group)
                flips += int((torch.sign(p) != torch.sign(old)).sum())
                total += p.numel()
        self.last_flip_ratio = flips / total if total else 0.0
        if self.fallback is not None:
            self.fallback.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        if self.fallback is not None:
            self.fallback.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        sd["skipped_steps"] = self.skipped_steps
        if self.fallback is not None:
            sd["fallback"] = self.fallback.state_dict()
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        sd = dict(state_dict)
        skipped = sd.pop("skipped_steps", 0)
        fb = sd.pop("fallback", None)
        if (fb is None) != (self.fallback is None):
            raise ValueError("state_dict: fallback optimizer state present in one of state_dict/optimizer only")
        super().load_state_dict(sd)
        with torch.no_grad():  # the weights are a function of the loaded latents: rewrite them exactly
            for group in self.param_groups:
                for p in group["params"]:
                    if "latent" in self.state.get(p, {}):
                        self._write(p, group)
        if fb is not None:
            self.fallback.load_state_dict(fb)
        self.skipped_steps = int(skipped)

    def _update(self, p: Tensor, group: Dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _write(self, p: Tensor, group: Dict[str, Any]) -> None:
        """Write the weight determined by the latent state (latent-based rules only)."""


def _adam_(latent: Tensor, g: Tensor, state: Dict[str, Any], lr: float, betas: Tuple[float, float], eps: float) -> None:
    """Adam (Kingma & Ba) on ``latent`` with bias correction: ``t += 1``;
    ``m <- β1 m + (1-β1) g``; ``v <- β2 v + (1-β2) g²``;
    ``latent <- latent - lr · (m/(1-β1^t)) / (sqrt(v/(1-β2^t)) + eps)``."""
    b1, b2 = betas
    state["step"] += 1
    t = state["step"]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (v / (1 - b2**t)).sqrt_().add_(eps)
    latent.addcdiv_(m, denom, value=-lr / (1 - b1**t))


def _check_adam(lr, betas, eps) -> None:
    _check("lr", lr, lo=0.0)
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas: expected a pair, got {betas!r}")
    _check("betas[0]", betas[0], 0.0, 1.0, hi_open=True)
    _check("betas[1]", betas[1], 0.0, 1.0, hi_open=True)
    _check("eps", eps, lo=0.0)


class BinaryConnect(_DiscreteBaseline):
    r"""BinaryConnect / straight-through estimator with Adam on latent real weights.

    For each binary weight tensor ``W`` (the parameter, entries ``±1``) a latent real tensor ``w̃``
    is kept in the optimizer state, initialised as ``w̃ = clip(latent_scale · W, -clip, clip)``
    when the optimizer is built. Each step, with ``g = ∂J/∂W`` (the gradient w.r.t. the *binary*
    weight, used straight through as the gradient of ``w̃``):

        w̃ <- Adam(w̃, g; lr, betas, eps)              (bias-corrected Adam)
        w̃ <- clip(w̃, -clip, clip)
        W <- sign(w̃)                                  (sign(0) = +1)

    The first step from zero moments moves each latent by ``lr · g/(|g| + eps)``.

    Args:
        params: a model (discrete weights by the rule, the rest by Adam at ``fallback_lr``), or
            DiscreteTensors / tensors / param groups (see module docstring).
        lr: Adam learning rate on the latents (default 1e-3).
        betas: Adam betas (default (0.9, 0.999)).
        eps: Adam epsilon (default 1e-8).
        clip: latent clipping bound (default 1.0, as Courbariaux et al.; None disables).
        latent_scale: multiplies the current weights to initialise the latents (default 1.0). Weights
            already binarised by ``discretize_`` are ``±1``, so with the default the latents start
            at the clipping bound; a small value (e.g. 0.05) mimics a fresh real-valued init.
        fallback_lr: Adam learning rate of the non-discrete parameters of a model (default 1e-3).

    Note: the paper also scales learning rates per layer by the Glorot factor and used SGD/ADAM;
    here it is plain Adam for all binary tensors.
    """

    _binary_only = True

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 clip: Optional[float] = 1.0, latent_scale: float = 1.0, fallback_lr: Optional[float] = 1e-3) -> None:
        _check_adam(lr, betas, eps)
        if clip is not None:
            _check("clip", clip, lo=0.0, lo_open=True)
        _check("latent_scale", latent_scale, lo=0.0, lo_open=True)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, clip=clip, latent_scale=latent_scale), fallback_lr)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    self._init_state(p, group)

    def _init_state(self, p: Tensor, group) -> None:
        latent = p.detach().clone().mul_(group["latent_scale"])
        if group["clip"] is not None:
            latent.clamp_(-group["clip"], group["clip"])
        self.state[p] = {"step": 0, "latent": latent, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        self._write(p, group)

    def _write(self, p: Tensor, group) -> None:
        p.copy_(_sign(self.state[p]["latent"]))

    def _update(self, p: Tensor, group) -> None:
        st = self.state[p]
        _adam_(st["latent"], p.grad, st, group["lr"], group["betas"], group["eps"])
        if group["clip"] is not None:
            st["latent"].clamp_(-group["clip"], group["clip"])
        self._write(p, group)


class TWN(_DiscreteBaseline):
    r"""Ternary Weight Networks (Li, Zhang & Liu 2016) with Adam on latent real weights and STE.

    Latent ``w̃`` (optimizer state, initialised as ``latent_scale · W``). Each step, with ``g`` the
    gradient w.r.t. the effective ternary weight (straight through):

        w̃ <- Adam(w̃, g; lr, betas, eps)
        Δ  = delta_factor · mean|w̃|                       (delta_factor = 0.7)
        I  = { i : |w̃_i| > Δ },   α = mean_{i∈I} |w̃_i|    (α = 0 if I is empty)
        W_eff <- α · t,   t_i = sign(w̃_i) · 1{i ∈ I}

    Where ``W_eff`` is stored: if the weight's layer has a fixed per-tensor scale buffer (from
    ``discretize_(..., scale="tensor")``), the parameter receives the ternary codes ``t`` (so it
    stays on the grid and ``export_packed`` works) and ``α`` is written into the scale buffer, and
    the gradient of the codes is divided by the current ``α`` to give ``g``. Otherwise the parameter
    receives ``α·t`` directly (then it is off the unit grid; export needs the scaled variant).
    The same ``α, Δ`` are also computed once when the optimizer is built.

    Args:
        params: as :class:`BinaryConnect`.
        lr, betas, eps: Adam on latents (defaults 1e-3, (0.9, 0.999), 1e-8).
        delta_factor: threshold factor (default 0.7, the paper's approximation).
        latent_scale: latent init multiplier (default 1.0).
        fallback_lr: Adam learning rate of the non-discrete parameters (default 1e-3).
    """

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 delta_factor: float = 0.7, latent_scale: float = 1.0, fallback_lr: Optional[float] = 1e-3) -> None:
        _check_adam(lr, betas, eps)
        _check("delta_factor", delta_factor, lo=0.0)
        _check("latent_scale", latent_scale, lo=0.0, lo_open=True)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, delta_factor=delta_factor,
                                      latent_scale=latent_scale), fallback_lr)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    latent = p.detach().clone().mul_(group["latent_scale"])
                    self.state[p] = {"step": 0, "latent": latent, "exp_avg": torch.zeros_like(p),
                                     "exp_avg_sq": torch.zeros_like(p)}
                    self._write(p, group)

    def _scale_buffer(self, p: Tensor) -> Optional[Tensor]:
        s = self._scales.get(id(p))
        if s is not None and not isinstance(s, nn.Parameter) and s.numel() == 1:
            return s
        return None

    @staticmethod
    def ternarize(latent: Tensor, delta_factor: float = 0.7) -> Tuple[Tensor, Tensor]:
        """``(t, α)``: ternary codes and scale of the TWN rule (see the class docstring)."""
        a = latent.abs()
        delta = delta_factor * a.mean()
        keep = a > delta
        n = keep.sum()
        alpha = torch.where(n > 0, (a * keep).sum() / n.clamp(min=1), torch.zeros_like(delta))
        return _sign(latent) * keep.to(latent.dtype), alpha

    def _write(self, p: Tensor, group) -> None:
        t, alpha = self.ternarize(self.state[p]["latent"], group["delta_factor"])
        buf = self._scale_buffer(p)
        if buf is not None:
            p.copy_(t)
            buf.copy_(alpha.reshape(buf.shape))
        else:
            p.copy_(alpha * t)

    def _update(self, p: Tensor, group) -> None:
        st = self.state[p]
        g = p.grad
        buf = self._scale_buffer(p)
        if buf is not None and float(buf) > 0:
            g = g / buf
        _adam_(st["latent"], g, st, group["lr"], group["betas"], group["eps"])
        self._write(p, group)


class Bop(_DiscreteBaseline):
    r"""Bop, the latent-free binary optimizer of Helwegen et al. (NeurIPS 2019).

    Per binary weight tensor ``W`` (entries ±1) an exponential moving average ``m`` of the gradient
    ``g = ∂J/∂W`` (state ``"exp_avg"``, initialised to 0):

        m <- (1 - γ) · m + γ · g
        W_i <- -W_i   if |m_i| > τ and sign(m_i) = sign(W_i)      (i.e. m_i W_i > τ for W_i = ±1)
        W_i <-  W_i   otherwise

    Args:
        params: as :class:`BinaryConnect`.
        gamma: adaptivity rate γ in (0, 1] (default 1e-4).
        threshold: flip threshold τ >= 0 (default 1e-8).
        fallback_lr: Adam learning rate of the non-discrete parameters (default 1e-3).

    The defaults γ = 1e-4, τ = 1e-8 are those of the paper's CIFAR-10 experiments and of larq's
    ``Bop`` (the paper additionally decays γ during training; schedule ``gamma`` via the param group).
    """

    _binary_only = True

    def __init__(self, params, gamma: float = 1e-4, threshold: float = 1e-8, fallback_lr: Optional[float] = 1e-3) -> None:
        _check("gamma", gamma, 0.0, 1.0, lo_open=True)
        _check("threshold", threshold, lo=0.0)
        super().__init__(params, dict(gamma=gamma, threshold=threshold), fallback_lr)

    def _update(self, p: Tensor, group) -> None:
        st = self.state[p]
        if "exp_avg" not in st:
            st["exp_avg"] = torch.zeros_like(p)
        m = st["exp_avg"]
        m.mul_(1 - group["gamma"]).add_(p.grad, alpha=group["gamma"])
        flip = (m.abs() > group["threshold"]) & (torch.sign(m) == torch.sign(p))
        p.copy_(torch.where(flip, -p, p))
