"""Adversarial training over any torch optimizer: YOPO and TRADES-YOPO (the maximum-principle
trainers), and the baselines PGD-k AT, Free AT, Fast AT and TRADES, implemented from their papers.

Every trainer has the same small contract::

    trainer = YOPO(model, optimizer, eps=0.1, m=5, n=3)
    for x, y in loader:
        loss = trainer.step(x, y)      # trains on one batch, returns the training loss (a float)

``optimizer`` is any ``torch.optim.Optimizer`` over the model's parameters — ``pmptrain.EMSA(model)``
included: the forward/backward passes that *train* are recorded by its capture like any training
pass; the passes that only *attack* run with its capture paused (``optimizer.capture.paused()``),
and YOPO's first-layer steps call ``first.forward`` directly, so no hook records them. A batch
whose training loss is NaN/Inf skips the optimizer step (weights untouched, ``skipped_steps`` + 1).

``passes`` counts, since construction, batch-sized passes through the whole network (``"forward"``,
``"backward"``) and through the first layer alone (``"first_forward"``, ``"first_backward"``);
``seconds`` the time spent in full passes, first-layer steps and optimizer steps. The bench reports
both relative to PGD-10 AT.

The perturbation's threat model is that of :mod:`pmptrain.robust.attacks` (``eps``, ``norm``,
``bounds``). Derivations and the departures from each paper: ``docs/robust.md``.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attacks import Bounds, ascent_direction, check_threat, clip_box, project, random_delta
from .costate import FirstLayerCostate, find_first_layer, is_affine_in_input

__all__ = ["AdversarialTrainer", "Standard", "PGDAT", "FreeAT", "FastAT", "TRADES", "YOPO", "TradesYOPO",
           "TRAINERS", "trades_kl"]


def _pos_int(name: str, v, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return v


def _nonneg(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


def trades_kl(logits_clean: Tensor, logits_adv: Tensor) -> Tensor:
    """``KL(softmax(f(x)) ‖ softmax(f(x'))) `` averaged over the batch (TRADES' robust term)."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")


class AdversarialTrainer:
    """Shared plumbing: validation, pass counters, timers, the capture pause, the NaN guard.

    Args:
        model: the network (``nn.Module``), trained in its current mode.
        optimizer: any ``torch.optim.Optimizer`` over ``model``'s parameters.
        eps: radius ε of the threat model (default 8/255). norm: ``"linf"`` (default) or ``"l2"``.
        bounds: input box (default (0, 1); None: unbounded). loss_fn: ``loss_fn(logits, y)`` → mean
            loss (default cross-entropy). generator: random starts (default torch's global RNG).
    """

    name = "adversarial"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, eps: float = 8 / 255,
                 norm: str = "linf", bounds: Bounds = (0.0, 1.0), loss_fn: Optional[Callable] = None,
                 generator: Optional[torch.Generator] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        check_threat(eps, norm, bounds, type(self).__name__)
        self.model, self.optimizer = model, optimizer
        self.eps, self.norm, self.bounds = float(eps), norm, bounds
        self.loss_fn = loss_fn or F.cross_entropy
        self.generator = generator
        self.passes: Dict[str, int] = {"forward": 0, "backward": 0, "first_forward": 0, "first_backward": 0}
        self.seconds: Dict[str, float] = {"full": 0.0, "first": 0.0, "step": 0.0}
        self.skipped_steps = 0

    # ---------------------------------------------------------------- plumbing
    def _count(self, forward: int = 0, backward: int = 0, first_forward: int = 0, first_backward: int = 0) -> None:
        p = self.passes
        p["forward"] += forward
        p["backward"] += backward
        p["first_forward"] += first_forward
        p["first_backward"] += first_backward

    @contextlib.contextmanager
    def _timed(self, key: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[key] += time.perf_counter() - t0

    def _attack_only(self):
        """Pause a pmptrain optimizer's capture while a pass only attacks (records nothing)."""
        cap = getattr(self.optimizer, "capture", None)
        return cap.paused() if cap is not None and hasattr(cap, "paused") else contextlib.nullcontext()

    def _input_grad(self, x: Tensor, delta: Tensor, y: Tensor, loss=None) -> Tensor:
        """``∇_δ L(f(x + δ), y)`` by one full forward/backward, parameters' ``.grad`` untouched."""
        with self._timed("full"), self._attack_only(), torch.enable_grad():
            d = delta.detach().requires_grad_(True)
            out = self.model(x + d)
            val = (loss or self.loss_fn)(out, y)
            (g,) = torch.autograd.grad(val, d)
        self._count(1, 1)
        return g

    def _step_optimizer(self, loss: Tensor) -> float:
        """The optimizer step after the training backward(s), unless the loss is not finite."""
        val = float(loss.detach())
        with self._timed("step"):
            if not math.isfinite(val):
                self.skipped_steps += 1
                self.optimizer.zero_grad()
                return val
            self.optimizer.step()
        return val

    def _train_on(self, x_in: Tensor, y: Tensor) -> float:
        """Zero the gradients, one training forward/backward on ``x_in``, one optimizer step."""
        self.optimizer.zero_grad()
        with self._timed("full"):
            loss = self.loss_fn(self.model(x_in), y)
            loss.backward()
        self._count(1, 1)
        return self._step_optimizer(loss)

    def _project(self, x: Tensor, delta: Tensor) -> Tensor:
        return clip_box(x, project(delta, self.eps, self.norm), self.bounds)

    def step(self, x: Tensor, y: Tensor) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def cost_per_batch(self) -> Dict[str, float]:
        """Full forward and backward passes per call of :meth:`step` (nominal, from the settings)."""
        raise NotImplementedError


class Standard(AdversarialTrainer):
    """Clean training: one forward/backward and one optimizer step per batch (the reference row)."""

    name = "standard"

    def step(self, x: Tensor, y: Tensor) -> float:
        return self._train_on(x, y)

    def cost_per_batch(self):
        return {"forward": 1, "backward": 1}


class PGDAT(AdversarialTrainer):
    """PGD-k adversarial training (Madry et al., "Towards Deep Learning Models Resistant to
    Adversarial Attacks", ICLR 2018): ``min_θ E max_{‖δ‖≤ε} L(f_θ(x + δ), y)``, the inner max by
    ``steps`` = k steps of projected steepest ascent ``δ ← Π(δ + α·s(∇_δ L))`` from a uniform random
    start, then one optimizer step on ``L(f(x + δ_k), y)``. Cost: k + 1 forward/backward passes.

    Args (beyond :class:`AdversarialTrainer`): steps: k (default 10). alpha: α (default ε/4, the
        CIFAR-10 setting 2/255 at ε = 8/255). random_start: default True.

    note: the attack runs in the model's training mode (BatchNorm uses batch statistics), as in
    the common PyTorch implementations; with a pmptrain optimizer its capture is paused meanwhile.
    """

    name = "pgd-at"

    def __init__(self, model, optimizer, eps=8 / 255, steps: int = 10, alpha: Optional[float] = None,
                 random_start: bool = True, **kw):
        super().__init__(model, optimizer, eps, **kw)
        self.steps = _pos_int("steps", steps, 0)
        self.alpha = self.eps / 4 if alpha is None else _nonneg("alpha", alpha)
        self.random_start = bool(random_start)

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        delta = (random_delta(x, self.eps, self.norm, self.bounds, self.generator) if self.random_start
                 else torch.zeros_like(x))
        for _ in range(self.steps):
            g = self._input_grad(x, delta, y)
            delta = self._project(x, delta + self.alpha * ascent_direction(g, self.norm))
        return delta.detach()

    def step(self, x: Tensor, y: Tensor) -> float:
        return self._train_on(x + self.perturb(x, y), y)

    def cost_per_batch(self):
        return {"forward": self.steps + 1, "backward": self.steps + 1}


class FastAT(PGDAT):
    """Fast adversarial training (Wong, Rice & Kolter, "Fast is better than free", ICLR 2020): FGSM
    from a random start, ``δ₀ ~ U[−ε, ε]``, one step ``δ = Π(δ₀ + α·s(∇_δ L(x + δ₀)))`` with
    ``α = 1.25ε``, then one optimizer step on ``x + δ``. Cost: 2 forward/backward passes.
    (PGDAT with ``steps = 1``, ``alpha = 1.25·eps``.)"""

    name = "fast"

    def __init__(self, model, optimizer, eps=8 / 255, alpha: Optional[float] = None, **kw):
        super().__init__(model, optimizer, eps, steps=1, alpha=1.25 * eps if alpha is None else alpha,
                         random_start=True, **kw)


class FreeAT(AdversarialTrainer):
    """Free adversarial training (Shafahi et al., "Adversarial Training for Free!", NeurIPS 2019):
    each batch is replayed ``replays`` = m times; every replay is ONE forward/backward at ``x + δ``
    whose backward gives both the weight gradient (one optimizer step) and ``∇_δ L``, which moves
    the perturbation ``δ ← Π(δ + ε·s(∇_δ L))`` (step size ε as in the paper). ``δ`` carries over
    from batch to batch (reset to 0 when the batch shape changes). Run ``epochs/m`` epochs to match
    the cost of ``epochs`` of clean training. Cost: m forward/backward passes and m optimizer steps
    per call.

    Args: replays: m (default 8, the paper's CIFAR-10 setting). step_size: default ε.
    """

    name = "free"

    def __init__(self, model, optimizer, eps=8 / 255, replays: int = 8, step_size: Optional[float] = None, **kw):
        super().__init__(model, optimizer, eps, **kw)
        self.replays = _pos_int("replays", replays)
        self.step_size = self.eps if step_size is None else _nonneg("step_size", step_size)
        self.delta: Optional[Tensor] = None

    def step(self, x: Tensor, y: Tensor) -> float:
        if self.delta is None or self.delta.shape != x.shape:
            self.delta = torch.zeros_like(x)
        total = 0.0
        for _ in range(self.replays):
            self.optimizer.zero_grad()
            with self._timed("full"):
                d = self._project(x, self.delta).requires_grad_(True)
                loss = self.loss_fn(self.model(x + d), y)
                loss.backward()
            self._count(1, 1)
            g = d.grad.detach()
            total += self._step_optimizer(loss)
            self.delta = self._project(x, d.detach() + self.step_size * ascent_direction(g, self.norm))
        return total / self.replays

    def cost_per_batch(self):
        return {"forward": self.replays, "backward": self.replays}


class TRADES(AdversarialTrainer):
    """TRADES (Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy",
    ICML 2019): ``min_θ CE(f(x), y) + β·KL(f(x) ‖ f(x'))`` with ``x' = x + δ`` maximising the KL
    term, found by ``steps`` = k sign-ascent steps of size α from ``δ₀ = 0.001·N(0, 1)`` (the
    paper's start; the KL gradient vanishes at δ = 0). The attack runs with the model in eval mode,
    as in the authors' code; the training pass in the model's own mode. Cost: 1 clean forward for the
    attack's target, k forward/backward passes, then 2 forwards and their backward.

    Args: steps: k (default 10). alpha: α (default ε/4). beta: β (default 6, the paper's CIFAR-10
        setting).
    """

    name = "trades"

    def __init__(self, model, optimizer, eps=8 / 255, steps: int = 10, alpha: Optional[float] = None,
                 beta: float = 6.0, **kw):
        super().__init__(model, optimizer, eps, **kw)
        self.steps = _pos_int("steps", steps, 0)
        self.alpha = self.eps / 4 if alpha is None else _nonneg("alpha", alpha)
        self.beta = _nonneg("beta", beta)

    def _start(self, x: Tensor) -> Tensor:
        return clip_box(x, 0.001 * torch.randn(x.shape, generator=self.generator, dtype=x.dtype,
                                                device=x.device), self.bounds)

    def perturb(self, x: Tensor) -> Tensor:
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self._timed("full"):
                target = self.model(x)
            self._count(1, 0)
            delta = self._start(x)
            kl = lambda out, _y: trades_kl(target, out)  # noqa: E731
            for _ in range(self.steps):
                g = self._input_grad(x, delta, None, loss=kl)
                delta = self._project(x, delta + self.alpha * ascent_direction(g, self.norm))
        finally:
            self.model.train(was)
        return delta.detach()

    def step(self, x: Tensor, y: Tensor) -> float:
        delta = self.perturb(x)
        self.optimizer.zero_grad()
        with self._timed("full"):
            clean = self.model(x)
            adv = self.model(x + delta)
            loss = self.loss_fn(clean, y) + self.beta * trades_kl(clean, adv)
            loss.backward()
        self._count(2, 2)
        return self._step_optimizer(loss)

    def cost_per_batch(self):
        return {"forward": self.steps + 3, "backward": self.steps + 2}


class YOPO(AdversarialTrainer):
    r"""YOPO-m-n (Zhang, Zhang, Lu, Zhu & Dong, "You Only Propagate Once: Accelerating Adversarial
    Training via Maximal Principle", NeurIPS 2019).

    Adversarial training is a game whose adversary controls only the input of the first layer
    ``y₀ = f₀(x + η, θ₀)``. With the costate ``p = −∂L/∂y₀`` of the first layer, the first layer's
    Hamiltonian is ``H₀(η) = p·f₀(x + η, θ₀)``, and the maximum principle gives the adversary's
    condition ``η* = argmin_{‖η‖≤ε} H₀(η)`` with ``p`` frozen (docs/robust.md §1). Per batch:

    .. code-block:: text

        η ← η₀ (uniform in the ball; "zero": 0)
        for j = 1..m:                                   # m full forward/backward passes
            L_j = L(f(x + η), y);  backward of L_j/m     # weight gradients accumulate
            p = −∂L_j/∂y₀                                # recorded at the first layer's output
            for s = 1..n:                               # n first-layer-only steps, p frozen
                η ← Π(η + σ·s(−∇_η H₀(η)))              #  = ascent on L's linearisation in y₀
        one optimizer step on the accumulated gradient (= the gradient of (1/m) Σ_j L_j)

    ``−∇_η H₀ = J_{f₀}(x+η)ᵀ ∂L/∂y₀``; at ``s = 1`` it equals ``∇_η L``, later steps follow the
    first layer's own nonlinearity with ``p`` frozen. For an affine first layer (Linear, Conv —
    :func:`~pmptrain.robust.costate.is_affine_in_input`) ``∇_η H₀ = −Aᵀp`` does not depend on η: it
    is the input gradient of the full pass (the first layer's input-VJP inside the same backward)
    and the n steps are elementwise; otherwise the first step uses it and each later step costs one
    first-layer forward and input-VJP (``benchmarks/robust_yopo_time.py``: a separate first-conv
    forward + VJP at 28×28 cost ≈ 0.5 full passes of the small CNN on a CPU; inside the backward,
    ≈ 0.1).

    Args (beyond :class:`AdversarialTrainer`):
        first: the first layer — a module name, a module, or None (the first module with
            parameters). It must receive the model's input (or a reshape of it, after ``Flatten``).
        m: full passes per batch (default 5). n: inner steps per pass (default 3). sigma: σ, the
            inner step (default ε/4 = 2/255 at ε = 8/255, the paper's CIFAR-10 setting).
        init: ``"uniform"`` (default: uniform in the ball) or ``"zero"``.

    ``last_delta`` holds the final η of the last batch, ``last_costate`` the last pass's ``p``.
    The passes that train are ordinary training passes (a pmptrain optimizer records them).

    note: the paper's implementation also moves the first layer's weights by ``∇_{θ₀}H₀`` at each
    inner step (a separate optimizer); here the weights change only in the one optimizer step per
    batch, from the m accumulated passes (docs/robust.md).
    """

    name = "yopo"

    def __init__(self, model, optimizer, first: Union[None, str, nn.Module] = None, eps=8 / 255, m: int = 5,
                 n: int = 3, sigma: Optional[float] = None, init: str = "uniform", **kw):
        super().__init__(model, optimizer, eps, **kw)
        self.m, self.n = _pos_int("m", m), _pos_int("n", n, 0)
        self.sigma = self.eps / 4 if sigma is None else _nonneg("sigma", sigma)
        if init not in ("uniform", "zero"):
            raise ValueError(f"init must be 'uniform' or 'zero', got {init!r}")
        self.init = init
        self.first_name, self.first = find_first_layer(model, first)
        self.affine = is_affine_in_input(self.first)
        self._rec = FirstLayerCostate(self.first, self.first_name)
        self.last_delta: Optional[Tensor] = None
        self.last_costate: Optional[Tensor] = None

    def close(self) -> None:
        """Remove the first-layer hook."""
        self._rec.remove()

    def _start(self, x: Tensor) -> Tensor:
        if self.init == "zero":
            return torch.zeros_like(x)
        return random_delta(x, self.eps, self.norm, self.bounds, self.generator)

    def _full_pass(self, x: Tensor, eta: Tensor, y: Tensor, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
        """One training forward/backward at ``x + η`` (``scale``·loss backwards); returns the
        loss, ``g = ∂L/∂y₀`` and ``∇_x L = J_{f₀}(x+η)ᵀg`` (the first inner direction, from the same
        backward pass: the first layer's input-VJP runs inside it)."""
        xa = (x + eta).contiguous().requires_grad_(True)
        self._rec.arm(xa)
        with self._timed("full"):
            loss = self.loss_fn(self.model(xa), y)
            (loss * scale).backward()
        self._count(1, 1, first_backward=1)
        g = self._rec.grad
        if g is None or xa.grad is None:
            raise RuntimeError(f"YOPO: the backward pass did not reach the first layer {self.first_name!r}'s "
                               "output (is the model in eval mode, or is it not on the loss's path?)")
        return loss.detach(), g / scale, xa.grad / scale

    def _inner(self, x: Tensor, eta: Tensor, g: Tensor, d0: Tensor) -> Tensor:
        """n steps ``η ← Π(η + σ·s(J_{f₀}(x+η)ᵀ g))`` through the first layer alone (``p = −g``
        frozen). ``d0 = J_{f₀}(x+η₀)ᵀ g`` comes from the full pass; an affine first layer's
        direction does not depend on η, so only a non-affine one runs the first layer again (one
        forward + input-VJP per step after the first)."""
        shape = self._rec.input_shape
        first = self.first
        direction = ascent_direction(d0, self.norm)
        with self._timed("first"):
            for s in range(self.n):
                if s > 0 and not self.affine:
                    with torch.enable_grad():
                        e = eta.detach().requires_grad_(True)
                        y0 = first.forward((x + e).reshape(shape))  # .forward: no hook records it
                        (d,) = torch.autograd.grad(y0, e, grad_outputs=g)
                    self._count(first_forward=1, first_backward=1)
                    direction = ascent_direction(d, self.norm)
                eta = self._project(x, eta + self.sigma * direction)
        return eta.detach()

    def step(self, x: Tensor, y: Tensor) -> float:
        self.optimizer.zero_grad()
        eta = self._start(x)
        total = 0.0
        g = None
        for _ in range(self.m):
            loss, g, d0 = self._full_pass(x, eta, y, 1.0 / self.m)
            total += float(loss) / self.m
            eta = self._inner(x, eta, g, d0)
        self.last_delta, self.last_costate = eta, -g
        return self._step_optimizer(torch.tensor(total, dtype=torch.float64))

    def cost_per_batch(self):
        extra = 0 if self.affine else self.m * max(self.n - 1, 0)
        return {"forward": self.m, "backward": self.m, "first_forward": extra, "first_backward": self.m + extra}


class TradesYOPO(YOPO):
    r"""TRADES-YOPO-m-n: TRADES' objective ``CE(f(x), y) + β·KL(f(x) ‖ f(x + η))`` with the
    adversary's η found by YOPO's frozen-costate first-layer steps (Zhang et al. 2019, §4).

    Per batch: one clean forward ``z = f(x)`` kept for the end; for j = 1..m one forward/backward
    of ``(β/m)·KL(softmax(z) ‖ softmax(f(x + η)))`` with ``z`` a detached leaf (its gradient is
    accumulated), the costate ``p = −∂KL/∂y₀`` of the adversarial branch, and n first-layer steps on
    η (ascent of the KL); finally the clean branch's backward of ``CE(z, y)`` plus the accumulated
    ``∂/∂z``, and one optimizer step. The gradient equals that of
    ``CE(f(x), y) + (β/m)Σ_j KL(f(x) ‖ f(x + η_j))``. Cost: m + 1 forward/backward passes (against
    TRADES-k's k + 3 forwards and k + 2 backwards).

    Args: as :class:`YOPO`, plus beta: β (default 6); init default ``"normal"``: ``0.001·N(0, 1)``
        (TRADES' start; ``"uniform"`` and ``"zero"`` also accepted).
    """

    name = "trades-yopo"

    def __init__(self, model, optimizer, first=None, eps=8 / 255, m: int = 5, n: int = 3, sigma=None,
                 beta: float = 6.0, init: str = "normal", **kw):
        super().__init__(model, optimizer, first, eps, m, n, sigma, "zero" if init == "normal" else init, **kw)
        self.init = init
        self.beta = _nonneg("beta", beta)

    def _start(self, x: Tensor) -> Tensor:
        if self.init == "normal":
            return clip_box(x, 0.001 * torch.randn(x.shape, generator=self.generator, dtype=x.dtype,
                                                    device=x.device), self.bounds)
        return super()._start(x)

    def step(self, x: Tensor, y: Tensor) -> float:
        self.optimizer.zero_grad()
        eta = self._start(x)
        with self._timed("full"):
            z = self.model(x)
        self._count(1, 0)
        zl = z.detach().requires_grad_(True)
        kl_total = 0.0
        g = None
        for _ in range(self.m):
            xa = (x + eta).contiguous().requires_grad_(True)
            self._rec.arm(xa)
            with self._timed("full"):
                kl = trades_kl(zl, self.model(xa))
                (kl * (self.beta / self.m)).backward()
            self._count(1, 1, first_backward=1)
            if self._rec.grad is None or xa.grad is None:
                raise RuntimeError(f"TradesYOPO: the backward pass did not reach the first layer {self.first_name!r}")
            g = self._rec.grad
            kl_total += float(kl.detach()) / self.m
            eta = self._inner(x, eta, g, xa.grad)
        with self._timed("full"):
            ce = self.loss_fn(zl, y)
            ce.backward()
            z.backward(zl.grad)
        self._count(0, 1)
        self.last_delta, self.last_costate = eta, -g * self.m / max(self.beta, 1e-30)
        return self._step_optimizer(torch.tensor(float(ce.detach()) + self.beta * kl_total, dtype=torch.float64))

    def cost_per_batch(self):
        c = super().cost_per_batch()
        c["forward"] += 1
        c["backward"] += 1
        return c


#: Trainer classes by bench name.
TRAINERS = {"standard": Standard, "pgd-at": PGDAT, "free": FreeAT, "fast": FastAT, "trades": TRADES,
            "yopo": YOPO, "trades-yopo": TradesYOPO}
