r"""Per-parameter rules: the Adam/SGD fallback, discrete MSA, and the baselines' update laws.

Every rule here updates one parameter from its gradient ``g = ∇J`` (unscaled, as left in ``.grad``)
and its typed state record; none needs captured states. Step sizes follow the shell's convention
(:meth:`~pmptrain.optim.rule.StepContext.step_size`): a key other than ``lr`` is scaled by
``s = lr/base_lr``, so a schedule of ``lr`` reaches every rule, and ``lr = 0`` freezes them all.

=============  ===============================================  ==========================
rule           update (per step)                                 what ``lr`` does
=============  ===============================================  ==========================
fallback       Adam or SGD-momentum on ``g``                     step ``fallback_lr · s``
discrete-msa   ``M ← aM − (1−a)g``; codes by the penalised       proximal weight ``ρ_k/s``
               argmax (Li & Hao 2018)
latent-sign    Adam on a clipped latent, ``W = sign(latent)``    Adam step ``lr``
               (BinaryConnect)
twn            Adam on a latent, ``W = α·ternary(latent)``       Adam step ``lr``
bop            ``m ← (1−γ)m + γg``; flip iff ``m·W > τ``         ``γ = lr``
=============  ===============================================  ==========================
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

import torch
from torch import Tensor, nn

from .._profile import phase
from ..discrete import (
    ACC_INIT_MODES,
    WRONG_SETS,
    discrete_argmax,
    discrete_msa_delta,
    ema_accumulate,
    has_fast_path,
    initial_accumulator,
    penalty_scale,
    relative_lambda,
    sign_nonzero,
)
from ..fallback import adam_delta, sgd_delta
from .hyper import PENALTY_MAX, Choice, Pair, Real
from .rule import Proposal, Rule, StepContext, Unit, Update, compute_dtype

__all__ = [
    "ParamRule", "FallbackState", "FallbackRule", "compute_dtype",
    "DiscreteState", "DiscreteMSARule",
    "LatentState", "LatentSignRule", "TWNRule", "ternarize",
    "BopState", "BopRule", "discrete_info",
]

_BETAS = Pair(Real(0.0, 1.0, hi_open=True))


class ParamRule(Rule):
    """A rule of one parameter: :meth:`update` gets the parameter, its gradient (never None) and
    its group; parameters without a gradient are left alone."""

    def propose(self, unit: Unit, ctx: StepContext) -> Optional[Proposal]:
        p = unit.params[0]
        g = ctx.grad(p)
        if g is None:
            return None
        return self.update(unit, ctx, p, g, ctx.group(p))

    def update(self, unit: Unit, ctx: StepContext, p: Tensor, g: Tensor, group) -> Proposal:
        raise NotImplementedError
_EPS = Real(0.0, lo_open=True)


# ------------------------------------------------------------------------------------ fallback


@dataclass
class FallbackState:
    """Adam's ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (v) or SGD's ``momentum_buffer``."""

    _param_shaped: ClassVar[Tuple[str, ...]] = ("exp_avg", "exp_avg_sq", "momentum_buffer")  # sharded under FSDP2

    step: int = 0
    exp_avg: Optional[Tensor] = None
    exp_avg_sq: Optional[Tensor] = None
    momentum_buffer: Optional[Tensor] = None


class FallbackRule(ParamRule):
    r"""Gradient ascent on H for a parameter without a maximiser: Adam (``fallback="adam"``) or SGD
    with heavy-ball momentum (``"sgd"``), step ``fallback_lr · lr/base_lr``; decoupled weight
    decay at the same step size (:mod:`pmptrain.fallback`). A float16/bfloat16 parameter's step and
    moments are computed and kept in float32 (:func:`compute_dtype`); the step is rounded to the
    parameter's dtype when it is applied."""

    name = "fallback"
    record_type = FallbackState
    hyper = {
        "fallback": Choice(("adam", "sgd")),
        "fallback_lr": Real(0.0, PENALTY_MAX, why="an Adam step is about fallback_lr per entry: it must stay finite"),
        "betas": _BETAS,
        "eps": _EPS,
        "momentum": Real(0.0, 1.0, hi_open=True),
    }
    decay_key = "fallback_lr"

    def init_state(self, unit):
        return FallbackState()

    def bind(self, unit, group):
        # the moments exist from construction (zeros: the same first step as torch's lazily created
        # ones), so opt.state is complete before the first step: a template for
        # torch.distributed.checkpoint, which loads only the entries a fresh state_dict has
        p, st = unit.params[0], unit.state
        if isinstance(p, nn.parameter.UninitializedParameter):
            return
        dt = compute_dtype(p)
        if self.value(group, "fallback") == "adam":
            if st.exp_avg is None:
                st.exp_avg = torch.zeros_like(p.detach(), dtype=dt)
            if st.exp_avg_sq is None:
                st.exp_avg_sq = torch.zeros_like(p.detach(), dtype=dt)
        elif float(self.value(group, "momentum")) > 0.0 and st.momentum_buffer is None:
            st.momentum_buffer = torch.zeros_like(p.detach(), dtype=dt)

    def describe(self, unit, group):
        kind = self.value(group, "fallback")
        return f"fallback {kind} (lr {self.value(group, 'fallback_lr')} x lr/base_lr)"

    def update(self, unit: Unit, ctx: StepContext, p: Tensor, g: Tensor, group) -> Proposal:
        lr = ctx.step_size(group, self.key("fallback_lr"))
        st: FallbackState = unit.state
        decay = ctx.decay(p, self.decay_key)
        dt = compute_dtype(p)
        if self.value(group, "fallback") == "adam":
            m0 = st.exp_avg.to(dt) if st.exp_avg is not None else torch.zeros_like(p, dtype=dt)
            v0 = st.exp_avg_sq.to(dt) if st.exp_avg_sq is not None else torch.zeros_like(p, dtype=dt)
            delta, m, v = adam_delta(g.to(dt), m0, v0, st.step + 1, lr, tuple(self.value(group, "betas")),
                                     float(self.value(group, "eps")))
            new = FallbackState(st.step + 1, m, v, st.momentum_buffer)
        else:
            buf0 = st.momentum_buffer.to(dt) if st.momentum_buffer is not None else None
            delta, buf = sgd_delta(g.to(dt), buf0, lr, float(self.value(group, "momentum")))
            new = FallbackState(st.step + 1, st.exp_avg, st.exp_avg_sq, buf)
        return Proposal([Update(p, delta, decay=decay)], new)


# ------------------------------------------------------------------------------- discrete MSA


@dataclass
class DiscreteState:
    """``step`` and the accumulator ``M`` (an EMA of the Hamiltonian gradient ``−∇J``)."""

    _param_shaped: ClassVar[Tuple[str, ...]] = ("accumulator",)  # sharded under FSDP2

    step: int = 0
    accumulator: Optional[Tensor] = None


class DiscreteMSARule(ParamRule):
    r"""Latent-free discrete MSA on one discrete tensor (Li & Hao, ICML 2018; docs/discrete.md):

    .. math::

        M &← a·M + (1−a)·(−g)\\
        ρ_k &= (ρ/s)·\max\{|M_{ij}| : W_{ij} \text{ is not the unpenalised argmax}\}\\
        W_{ij} &← \arg\max_{q∈Q}\ M_{ij}q − λ|q| − \tfrac{ρ_k}{2}(q − W_{ij})^2

    with ``s = lr/base_lr`` (``ρ_k`` is the proximal weight of the discrete step, so the step
    scales like E-MSA's ``δ = 1/lr``: ``s ≤ ρ`` freezes a binary tensor, ``lr = 0`` every tensor).
    The accumulator update is :func:`pmptrain.discrete.ema_accumulate` (into a second buffer:
    nothing changes before the step is accepted); the rule is the fused :func:`~pmptrain.discrete.discrete_msa_delta`
    on the binary/ternary grids and the reference :func:`~pmptrain.discrete.penalty_scale` +
    :func:`~pmptrain.discrete.discrete_argmax` on others. Weight decay does not apply to codes.

    Args:
        acc_init: the magnitude of ``M_0`` (:func:`~pmptrain.discrete.initial_accumulator`).
        acc_init_mode: ``"sign"`` (``M_0 = acc_init·sgn(W)``, ``sgn(0) = +1``) or ``"uniform"``
            (``M_0 ~ U(±acc_init)``, the reference), default ``"sign"``.
        acc_seed: seed of the ``"uniform"`` draw; each tensor's generator is seeded with the CRC-32
            of ``"<acc_seed>:<parameter name>"``, so ``M_0`` is a function of the seed and the
            name only (the same on every rank, independent of torch's global RNG).
    """

    name = "discrete-msa"
    record_type = DiscreteState
    hyper = {
        "rho": Real(0.0),
        "decay": Real(0.0, 1.0),
        "lam": Real(0.0),
        "rho_scope": Choice(("tensor", "channel")),
        "lam_mode": Choice(("absolute", "relative")),
        "wrong_set": Choice(WRONG_SETS),
    }

    def __init__(self, acc_init: float, keys=None, acc_init_mode: str = "sign", acc_seed: int = 0):
        super().__init__(keys)
        self.acc_init = float(acc_init)
        self.acc_init_mode = Choice(ACC_INIT_MODES).check("acc_init_mode", acc_init_mode)
        if isinstance(acc_seed, bool) or not isinstance(acc_seed, int) or not 0 <= acc_seed < 2**31:
            raise ValueError(f"acc_seed: must be an int in [0, 2^31), got {acc_seed!r}")
        self.acc_seed = acc_seed

    def init_state(self, unit):
        seed = zlib.crc32(f"{self.acc_seed}:{unit.param_names[0]}".encode()) if self.acc_init_mode == "uniform" else None
        return DiscreteState(0, initial_accumulator(unit.params[0], self.acc_init, self.acc_init_mode, seed))

    @staticmethod
    def _accumulate(unit: Unit, acc: Tensor, g: Tensor, a: float) -> Tensor:
        """:func:`~pmptrain.discrete.ema_accumulate` into a second buffer (the accumulator of the
        step before last, free once the last step was accepted; ``unit.scratch["accumulator"]``),
        leaving ``M = acc`` as it is until the step is accepted."""
        spare = unit.scratch.get("accumulator")
        if (spare is None or spare is acc or spare.shape != acc.shape or spare.dtype != acc.dtype
                or spare.device != acc.device):
            spare = torch.empty_like(acc)
        unit.scratch["accumulator"] = acc  # free for the step after next (the shell commits or drops this one)
        return ema_accumulate(acc, g, a, out=spare)

    def describe(self, unit, group):
        d = unit.meta["discrete"]
        return f"discrete MSA on {d.grid.name} (rho {self.value(group, 'rho')}, decay {self.value(group, 'decay')})"

    def update(self, unit: Unit, ctx: StepContext, p: Tensor, g: Tensor, group) -> Proposal:
        d = unit.meta["discrete"]
        st: DiscreteState = unit.state
        a, rho, lam = float(self.value(group, "decay")), float(self.value(group, "rho")), float(self.value(group, "lam"))
        s = ctx.lr_scale(group)
        w = p.detach()
        acc = st.accumulator if st.accumulator.dtype == w.dtype else st.accumulator.to(w.dtype)  # model.double()
        new_acc = self._accumulate(unit, acc, g.to(w.dtype), a)
        new = DiscreteState(st.step + 1, new_acc)
        if s == 0.0:  # lr = 0: the codes are frozen (the accumulator still averages)
            return Proposal([Update(p, torch.zeros_like(w))], new, discrete_info(d, w, None, new_acc))
        scope = self.value(group, "rho_scope") if w.dim() >= 2 else "tensor"
        if self.value(group, "lam_mode") == "relative":
            lam = relative_lambda(new_acc, lam, scope)
        rho_eff = rho / s
        if has_fast_path(d.grid):
            with phase("discrete"):
                delta, rho_k, acc_max = discrete_msa_delta(w, new_acc, d.grid, rho_eff, lam, scope,
                                                           wrong_set=self.value(group, "wrong_set"))
            upd = Update(p, delta)
        else:
            rho_k, _ = penalty_scale(new_acc, w, d.grid, rho_eff, lam, scope=scope,
                                     wrong_set=self.value(group, "wrong_set"))
            new_w = discrete_argmax(w, new_acc, d.grid, rho_k, lam)
            delta = new_w - w
            acc_max = new_acc.abs().amax()
            upd = Update(p, value=new_w)
        if rho_k.dim():
            rho_k = rho_k.amax()  # diagnostics: the largest per-channel ρ_k
        return Proposal([upd], new, discrete_info(d, w, delta, new_acc, rho_k, acc_max))


def discrete_info(d, w: Tensor, delta: Optional[Tensor], acc: Tensor, rho_k=None, acc_max=None) -> dict:
    """Raw diagnostics of one discrete tensor, converted lazily by
    :class:`~pmptrain.optim.discrete_config.DiscreteDiagnostics`: ``w`` the codes before the step,
    ``delta`` their change (None: unchanged), ``acc`` the accumulator / latent / gradient EMA."""
    if not d.grid.has_zero:
        nnz = torch.tensor(float(w.numel()), device=w.device)
    else:
        new_w = w if delta is None else w + delta
        if d.grid.values == (-1.0, 0.0, 1.0):  # Σ W² counts the non-zero ternary codes exactly
            flat = new_w.reshape(-1)
            nnz = torch.dot(flat, flat)
        else:
            nnz = torch.count_nonzero(new_w)
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    return {"delta": delta if delta is not None else torch.zeros_like(w), "acc": acc,
            "numel": w.numel(), "rho_k": rho_k if rho_k is not None else zero,
            "acc_abs_max": acc_max if acc_max is not None else acc.abs().amax(), "density_nnz": nnz}


# -------------------------------------------------------------------------- latent baselines


@dataclass
class LatentState:
    """Adam on a latent real tensor: ``step``, ``latent``, ``exp_avg``, ``exp_avg_sq``."""

    _param_shaped: ClassVar[Tuple[str, ...]] = ("latent", "exp_avg", "exp_avg_sq")  # sharded under FSDP2

    step: int = 0
    latent: Optional[Tensor] = None
    exp_avg: Optional[Tensor] = None
    exp_avg_sq: Optional[Tensor] = None


def _latent_adam(st: LatentState, g: Tensor, lr: float, betas, eps: float, wd: float) -> LatentState:
    """One AdamW step on the latent (decoupled decay ``latent·(1 − lr·wd)``), out of place."""
    delta, m, v = adam_delta(g.to(st.latent.dtype), st.exp_avg, st.exp_avg_sq, st.step + 1, lr, betas, eps)
    latent = st.latent * (1.0 - lr * wd) if wd else st.latent.clone()
    return LatentState(st.step + 1, latent.add_(delta), m, v)


class LatentSignRule(ParamRule):
    r"""BinaryConnect / straight-through estimator (Courbariaux et al. 2015) on one binary tensor:

    ``w̃ ← clip(AdamW(w̃, g; lr, betas, eps, weight_decay), −clip, clip)``, ``W ← sign(w̃)``
    (``sign(0) = +1``), with ``g = ∂J/∂W`` used straight through as the latent's gradient. The
    latent starts at ``clip(latent_scale·W)`` and the weight is rewritten to ``sign(w̃)`` when the
    optimizer is built.
    """

    name = "latent-sign"
    record_type = LatentState
    hyper = {
        "lr": Real(0.0, tensor_ok=True),
        "betas": _BETAS,
        "eps": _EPS,
    }

    def __init__(self, clip: Optional[float], latent_scale: float, keys=None):
        super().__init__(keys)
        self.clip, self.latent_scale = clip, float(latent_scale)

    def init_state(self, unit):
        w = unit.params[0].detach()
        dt = compute_dtype(w)  # float32 latents and moments for a float16/bfloat16 weight
        latent = w.to(dt, copy=True).mul_(self.latent_scale)
        if self.clip is not None:
            latent.clamp_(-self.clip, self.clip)
        return LatentState(0, latent, torch.zeros_like(w, dtype=dt), torch.zeros_like(w, dtype=dt))

    def bind(self, unit, group):
        with torch.no_grad():
            unit.params[0].copy_(sign_nonzero(unit.state.latent))

    restore = bind  # the weights are a function of the (loaded) latents: rewrite them exactly

    def describe(self, unit, group):
        return f"latent sign / STE (Adam lr {self.value(group, 'lr')} on clipped latents)"

    def update(self, unit: Unit, ctx: StepContext, p: Tensor, g: Tensor, group) -> Proposal:
        lr = ctx.step_size(group, self.key("lr"))
        beta1, beta2 = tuple(self.value(group, "betas"))
        eps, wd = float(self.value(group, "eps")), float(group.get("weight_decay", 0.0))
        st: LatentState = unit.state
        t = st.step + 1
        # the new state is written into the buffers the state before last used (this step's proposal
        # may be dropped, so the current state is not overwritten): no allocation per step
        m = _spare(unit, "exp_avg", st.exp_avg)
        v = _spare(unit, "exp_avg_sq", st.exp_avg_sq)
        latent = _spare(unit, "latent", st.latent)
        g = g.to(st.latent.dtype)
        torch.mul(st.exp_avg, beta1, out=m).add_(g, alpha=1 - beta1)
        torch.mul(st.exp_avg_sq, beta2, out=v).addcmul_(g, g, value=1 - beta2)
        denom = _scratch(unit, "denom", v)
        torch.div(v, 1 - beta2**t, out=denom).sqrt_().add_(eps)
        torch.mul(st.latent, 1.0 - lr * wd, out=latent) if wd else latent.copy_(st.latent)
        latent.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
        if self.clip is not None:
            latent.clamp_(-self.clip, self.clip)
        w = p.detach()
        # codes − W with codes = sign(w̃) + 1{w̃ = 0} (sign(0) = +1, as sign_nonzero; a NaN latent,
        # only possible from a non-finite gradient, gives code 0 here and the shell's guard skips the step)
        delta = torch.sign(latent, out=_spare(unit, "delta", None, like=latent)).add_(latent == 0).sub_(w)
        info = discrete_info(unit.meta["discrete"], w, delta, latent,
                             acc_max=torch.maximum(latent.amax(), latent.amin().neg()))
        return Proposal([Update(p, delta)], LatentState(t, latent, m, v), info)


def _scratch(unit: Unit, key: str, like: Tensor) -> Tensor:
    """A per-unit work tensor shaped like ``like``, kept across steps (never part of a state)."""
    buf = unit.scratch.get(key)
    if buf is None or buf.shape != like.shape or buf.dtype != like.dtype or buf.device != like.device:
        buf = unit.scratch[key] = torch.empty_like(like)
    return buf


def _spare(unit: Unit, key: str, current: Optional[Tensor], like: Optional[Tensor] = None) -> Tensor:
    """Double buffering of one state tensor: the buffer ``current`` replaced in the step before
    (free once that step was committed), else a new one; ``current`` is kept for the step after
    next. With ``current`` None (a per-step output such as the code change), two buffers alternate."""
    like = current if current is not None else like
    slots = unit.scratch.setdefault("spare:" + key, [None, None])
    spare = slots[0]
    if (spare is None or spare is current or spare.shape != like.shape or spare.dtype != like.dtype
            or spare.device != like.device):
        spare = torch.empty_like(like)
    slots[0], slots[1] = (current if current is not None else slots[1]), spare
    return spare


def ternarize(latent: Tensor, delta_factor: float = 0.7) -> Tuple[Tensor, Tensor]:
    r"""TWN's ternary projection (Li, Zhang & Liu 2016): ``Δ = delta_factor·mean|w̃|``,
    ``I = {i : |w̃_i| > Δ}``, ``α = mean_{i∈I}|w̃_i|`` (0 if I is empty), codes
    ``t_i = sign(w̃_i)·1{i ∈ I}``. Returns ``(t, α)``."""
    a = latent.abs()
    delta = delta_factor * a.mean()
    keep = a > delta
    n = keep.sum()
    alpha = torch.where(n > 0, (a * keep).sum() / n.clamp(min=1), torch.zeros_like(delta))
    return sign_nonzero(latent) * keep.to(latent.dtype), alpha


class TWNRule(ParamRule):
    r"""Ternary Weight Networks with AdamW on a latent and the straight-through gradient:
    ``w̃ ← AdamW(w̃, g)``, ``(t, α) = ternarize(w̃)`` (:func:`ternarize`), ``W_eff ← α·t``.

    Where ``W_eff`` is stored: with a fixed per-tensor scale buffer (``discretize_(...,
    scale="tensor")``) the parameter receives the codes ``t`` (it stays on the grid) and ``α`` goes
    into the buffer, and the codes' gradient is divided by the current ``α``; otherwise the
    parameter receives ``α·t``. The same is written once when the optimizer is built.
    """

    name = "twn"
    record_type = LatentState
    hyper = {
        "lr": Real(0.0, tensor_ok=True),
        "betas": _BETAS,
        "eps": _EPS,
        "delta_factor": Real(0.0),
    }

    def __init__(self, latent_scale: float, keys=None):
        super().__init__(keys)
        self.latent_scale = float(latent_scale)

    @staticmethod
    def _scale_buffer(unit) -> Optional[Tensor]:
        s = unit.meta["discrete"].scale
        if s is not None and not isinstance(s, nn.Parameter) and s.numel() == 1:
            return s
        return None

    def init_state(self, unit):
        w = unit.params[0].detach()
        dt = compute_dtype(w)  # float32 latents and moments for a float16/bfloat16 weight
        return LatentState(0, w.to(dt, copy=True).mul_(self.latent_scale), torch.zeros_like(w, dtype=dt),
                           torch.zeros_like(w, dtype=dt))

    def _writes(self, unit, latent: Tensor, delta_factor: float):
        p = unit.params[0]
        t, alpha = ternarize(latent, delta_factor)
        buf = self._scale_buffer(unit)
        if buf is not None:
            return [Update(p, value=t), Update(buf, value=alpha.reshape(buf.shape).to(buf.dtype))]
        return [Update(p, value=alpha * t)]

    def bind(self, unit, group):
        # the rule's definition writes W_eff at construction
        with torch.no_grad():
            for u in self._writes(unit, unit.state.latent, float(self.value(group, "delta_factor"))):
                u.param.copy_(u.value)

    restore = bind

    def describe(self, unit, group):
        return f"TWN (Adam lr {self.value(group, 'lr')} on latents, delta {self.value(group, 'delta_factor')})"

    def update(self, unit: Unit, ctx: StepContext, p: Tensor, g: Tensor, group) -> Proposal:
        buf = self._scale_buffer(unit)
        if buf is not None and float(buf) > 0:
            g = g / buf
        lr = ctx.step_size(group, self.key("lr"))
        new = _latent_adam(unit.state, g, lr, tuple(self.value(group, "betas")), float(self.value(group, "eps")),
                           float(group.get("weight_decay", 0.0)))
        writes = self._writes(unit, new.latent, float(self.value(group, "delta_factor")))
        w = p.detach()
        old_codes = sign_nonzero(w) * (w != 0).to(w.dtype)  # the codes of W (α·t or t)
        new_codes = sign_nonzero(writes[0].value) * (writes[0].value != 0).to(w.dtype)
        return Proposal(writes, new, discrete_info(unit.meta["discrete"], old_codes, new_codes - old_codes, new.latent))


# ------------------------------------------------------------------------------------------ Bop


@dataclass
class BopState:
    """Bop's gradient EMA ``m`` (``exp_avg``)."""

    _param_shaped: ClassVar[Tuple[str, ...]] = ("exp_avg",)  # sharded under FSDP2

    exp_avg: Optional[Tensor] = None


class BopRule(ParamRule):
    r"""Bop (Helwegen et al., NeurIPS 2019), latent-free: ``m ← (1 − γ)m + γg`` with ``γ = lr``
    (the adaptivity rate plays the role of the learning rate), and ``W_i ← −W_i`` iff
    ``m_i W_i > τ`` (``τ = threshold``). ``lr = 0`` freezes: ``m`` stops moving and no weight
    that the last step left in place satisfies the flip condition."""

    name = "bop"
    record_type = BopState
    hyper = {"lr": Real(0.0, 1.0, tensor_ok=True), "threshold": Real(0.0)}

    def init_state(self, unit):
        return BopState(torch.zeros_like(unit.params[0].detach()))

    def describe(self, unit, group):
        return f"Bop (gamma = lr {self.value(group, 'lr')}, threshold {self.value(group, 'threshold')})"

    def update(self, unit: Unit, ctx: StepContext, p: Tensor, g: Tensor, group) -> Proposal:
        gamma = ctx.step_size(group, self.key("lr"))
        m = unit.state.exp_avg.mul(1.0 - gamma).add_(g.to(p.dtype), alpha=gamma)
        w = p.detach()
        flip = (m * w) > float(self.value(group, "threshold"))
        new_w = torch.where(flip, -w, w)
        return Proposal([Update(p, value=new_w)], BopState(m), discrete_info(unit.meta["discrete"], w, new_w - w, m))
