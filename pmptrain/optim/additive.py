r"""Closed-form E-MSA for additive parameters: the direct parameters of a composite module.

A module with no adapter whose own (direct) parameters sit next to child modules — ViT's
embeddings (``cls_token``, ``position_embeddings``), CLIP's ``class_embedding``, Swin's
relative-position bias table — is one unit of :class:`AdditiveEMSARule`. Each forward call in
training mode is observed (:meth:`~pmptrain.capture.ModuleCapture.observe`): for every direct
parameter, :func:`pmptrain.additive.additive_uses` reads from the call's autograd graph whether the
parameter is only *added to a state* (through pure selections) and how often each entry is used per
sample, ``u``. Additive parameters take the exact maximiser of their augmented Hamiltonian,
``Δθ = −∇J/(ρu + δ)`` (:func:`pmptrain.additive.additive_step`; docs/algorithms.md §2, "Additive
parameters"); a parameter that enters otherwise (a product: a layer-scale; ``exp``; ``softplus``)
takes the fallback step with a warning naming the module, the parameter and the operation — an
error under ``strict=True``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import Tensor

from .. import distributed as pdist
from ..additive import _count, additive_step, scale_costate_sq, scale_state_sq, scale_step, trace_uses
from .affine import EMSARuleBase
from .elementwise import FallbackRule, FallbackState
from .rule import Proposal, StepContext, Unit, Update

__all__ = ["AdditiveEMSARule", "AdditiveState", "AdditiveObserver"]


@dataclass
class AdditiveState:
    """``step``; ``fallback``: the fallback state of each parameter (by its name in the unit) that
    was found not additive; ``grad_avg`` with ``grad_decay > 0``."""

    step: int = 0
    fallback: Dict[str, FallbackState] = field(default_factory=dict)
    grad_avg: Optional[List[Optional[Tensor]]] = None
    _nested = {"FallbackState": FallbackState}
    _param_shaped = ("grad_avg",)  # sharded under FSDP2


class AdditiveObserver:
    """The forward hook of an additive unit's module. After each training call under autograd it
    classifies every direct parameter from the call's graph (:func:`~pmptrain.additive.trace_uses`;
    again only when the shapes of the call's tensor inputs change): ``kinds[name]`` is
    ``"additive"`` (``uses[name]`` = u, the uses per sample), ``"scale"`` (a layer-scale: the call's
    ``Σx²`` is added to ``x_sq[name]`` and a hook on the product adds ``Σ(∂J/∂y)²`` to
    ``p_sq[name]`` in the backward pass; ``scale_samples`` counts their samples) or None
    (``reasons[name]`` says why). ``reset()`` (at ``zero_grad``) drops the scale statistics."""

    def __init__(self, params: Dict[str, Tensor]):
        self.params = params
        self.signature = None
        self.kinds: Dict[str, Optional[str]] = {}
        self.uses: Dict[str, Optional[Tensor]] = {}
        self.reasons: Dict[str, str] = {}
        self.samples = 1
        self.reset()

    def reset(self) -> None:
        self.x_sq: Dict[str, Tensor] = {}
        self.p_sq: Dict[str, Tensor] = {}
        self.scale_samples = 0

    def __call__(self, module, args, kwargs, output):
        tensors = [v for v in list(args) + list(kwargs.values()) if isinstance(v, Tensor)]
        sig = tuple(tuple(t.shape) for t in tensors)
        outs = [output] if isinstance(output, Tensor) else [o for o in _flatten(output) if isinstance(o, Tensor)]
        batch = max(1, tensors[0].shape[0]) if tensors and tensors[0].dim() > 0 else 1
        traced = {}
        if sig != self.signature:
            kinds, uses, reasons = {}, {}, {}
            for name, p in self.params.items():
                found, why = trace_uses(outs, p)
                traced[name] = found
                if why is not None or not found:
                    kinds[name], uses[name] = None, None
                    if why is not None:
                        reasons[name] = why
                    continue
                if found[0].kind == "scale":
                    kinds[name], uses[name] = "scale", None
                    continue
                u, why = _count(found, p)
                kinds[name] = "additive" if u is not None else None
                uses[name] = u / batch if u is not None else None
                if why is not None:
                    reasons[name] = why
            self.signature, self.kinds, self.uses, self.reasons, self.samples = sig, kinds, uses, reasons, batch
        scaled = [n for n, k in self.kinds.items() if k == "scale"]
        for name in scaled:
            p = self.params[name]
            found = traced.get(name)
            if found is None:
                found, _ = trace_uses(outs, p)
            if not found or found[0].kind != "scale":
                continue
            self.x_sq[name] = self.x_sq.get(name, 0.0) + scale_state_sq(found, p)
            for use in found:
                use.node.register_prehook(_CostateSq(self, name, use, p))
        if scaled:
            self.scale_samples += batch
        return None


class _CostateSq:
    """Pre-hook of a layer-scale's product node: adds ``Σ(∂J/∂y)²`` per entry to the observer."""

    __slots__ = ("observer", "name", "use", "param")

    def __init__(self, observer, name, use, param):
        self.observer, self.name, self.use, self.param = observer, name, use, param

    def __call__(self, grad_outputs):
        use, self.use = self.use, None  # once per backward pass; drops the node ↔ hook cycle
        if use is None or grad_outputs[0] is None:
            return None
        obs = self.observer
        obs.p_sq[self.name] = obs.p_sq.get(self.name, 0.0) + scale_costate_sq(use, grad_outputs[0], self.param)
        return None


def _reduced_scale_stats(obs: AdditiveObserver, name: str, p: Tensor, ctx: StepContext):
    """``(Σx², Σp̂², B)`` of a layer-scale parameter over the union of the ranks' batches (``Σx²``
    None when nothing was recorded), with ``p̂ = −B_r·∂J/∂y`` formed on each rank ``r`` before the
    sum (as the channel rule does). Every rank of a data-parallel run holds the same units, so the
    reductions pair up."""
    x_sq, g_sq = obs.x_sq.get(name), obs.p_sq.get(name)
    scale_p = float(obs.scale_samples) * ctx.costate_inv_scale
    dev = p.device
    zero = torch.zeros(p.shape, dtype=torch.float64, device=dev)
    parts = [x_sq.to(dev) if x_sq is not None else zero.clone(),
             g_sq.to(dev) * (scale_p * scale_p) if g_sq is not None else zero.clone(),
             torch.tensor([float(obs.scale_samples)], dtype=torch.float64, device=dev)]
    if ctx.world > 1:
        pdist.all_reduce_sum_(parts, ctx.process_group)
    elif x_sq is None:
        return None, None, 0.0
    return parts[0], parts[1], float(parts[2])


def _flatten(value):
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from _flatten(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)
    else:
        yield value


class AdditiveEMSARule(EMSARuleBase):
    """See the module docstring. ``fallback``: the configuration's fallback rule (its keys and state
    type) for the parameters found not additive."""

    name = "emsa-additive"
    record_type = AdditiveState
    hyper = {**EMSARuleBase.hyper, **FallbackRule.hyper}

    def __init__(self, fallback: FallbackRule, strict: bool = False, keys=None):
        super().__init__(keys)
        self.fallback = fallback
        self.strict = strict

    def init_state(self, unit):
        return AdditiveState()

    def describe(self, unit, group):
        fallen = self.fallback_params(unit)
        return (f"closed-form E-MSA of additive and layer-scale parameters ({self.describe_rho(group)}; "
                "recognised at the first forward, the fallback for any that enter otherwise)"
                + (f"; on the fallback since the first forward: {', '.join(fallen)}" if fallen else ""))

    @staticmethod
    def fallback_params(unit: Unit) -> list:
        """The qualified names of the unit's parameters that take the fallback step (found at the
        first forward to enter other than additively or as a layer scale)."""
        mb = unit.members[0]
        prefix = f"{mb.name}." if mb.name else ""
        state = unit.state
        return [prefix + n for n in (state.fallback if state is not None else {})]

    def costate_scaled(self, group) -> bool:
        return False  # a bias-only unit has no costate penalty

    def observer(self, unit: Unit) -> AdditiveObserver:
        """The forward hook that observes the unit's module (registered once by the shell)."""
        mb = unit.members[0]
        own = dict(mb.module.named_parameters(recurse=False))
        return AdditiveObserver({n: p for n, p in own.items() if any(p is q for q in unit.params)})

    def propose(self, unit: Unit, ctx: StepContext):
        mb = unit.members[0]
        obs = ctx.capture.observation(mb.name)
        own = {n: p for n, p in mb.module.named_parameters(recurse=False) if any(p is q for q in unit.params)}
        grads = {n: ctx.grad(p) for n, p in own.items()}
        if all(g is None for g in grads.values()):
            return None
        new_state = AdditiveState(unit.state.step + 1, dict(unit.state.fallback), unit.state.grad_avg)
        ups = []
        for n, p in own.items():
            g = grads[n]
            if g is None:
                continue
            group = ctx.group(p)
            kind = obs.kinds.get(n) if obs is not None else None
            u = obs.uses.get(n) if obs is not None else None
            if kind is None:
                reason = obs.reasons.get(n) if obs is not None else None
                if reason is None and obs is None and bool(g.any()):
                    raise RuntimeError(f"parameter {mb.name}.{n} has a gradient but its module's forward was not "
                                       "observed (eval() mode, torch.no_grad, or before the optimizer existed)")
                self._not_additive(mb.name, n, reason or "the model's output does not depend on it through this "
                                   "module's forward")
                sub = Unit(f"{mb.name}.{n}", self.fallback, [p], [n], state=unit.state.fallback.get(n, FallbackState()))
                prop = self.fallback.update(sub, ctx, p, ctx.user_grad(p), group)  # .grad, not an average
                new_state.fallback[n] = prop.state
                ups.extend(prop.updates)
                continue
            eta = ctx.step_size(group, self.key("lr"))
            decay = ctx.decay(p, self.decay_key)
            if eta == 0.0:
                ups.append(Update(p, torch.zeros_like(p), decay=decay))
                continue
            dt = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
            if kind == "scale":
                x_sq, p_sq, b_ = _reduced_scale_stats(obs, n, p, ctx)
                if b_ == 0.0 or x_sq is None:
                    if bool(g.any()):
                        raise RuntimeError(f"parameter {mb.name}.{n} has a gradient but no recorded forward call")
                    ups.append(Update(p, torch.zeros_like(p), decay=decay))
                    continue
                rho = self.effective_rho(group, ctx, batch=b_)
                if rho == 0.0:
                    ups.append(Update(p, g, alpha=-eta, decay=decay))
                    continue
                a, e = x_sq / b_, p_sq / b_ * self.costate_ratio(group, b_)
                ups.append(Update(p, scale_step(g.to(dt), a.to(dt), e.to(dt), rho, 1.0 / eta).to(p.dtype), decay=decay))
                continue
            rho = self.effective_rho(group, ctx, batch=float(obs.samples))
            if rho == 0.0:
                ups.append(Update(p, g, alpha=-eta, decay=decay))
                continue
            ups.append(Update(p, additive_step(g.to(dt), u, rho, 1.0 / eta).to(p.dtype), decay=decay))
        return Proposal(ups, new_state)

    def _not_additive(self, module: str, param: str, reason: str) -> None:
        msg = (f"parameter {param!r} of module {module!r} is not an additive parameter ({reason}); it takes "
               "the fallback step")
        if self.strict:
            raise ValueError(f"strict=True: {msg}. Pass exclude=[{module!r}] to accept the fallback explicitly")
        self._warn_once(("not-additive", module, param), msg)
