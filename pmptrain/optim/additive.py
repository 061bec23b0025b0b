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
from typing import Dict, Optional

import torch
from torch import Tensor

from ..additive import additive_step, additive_uses
from .affine import EMSARuleBase
from .elementwise import FallbackRule, FallbackState
from .rule import Proposal, StepContext, Unit, Update

__all__ = ["AdditiveEMSARule", "AdditiveState", "AdditiveObserver"]


@dataclass
class AdditiveState:
    """``step``; ``fallback``: the fallback state of each parameter (by its name in the unit) that
    was found not additive."""

    step: int = 0
    fallback: Dict[str, FallbackState] = field(default_factory=dict)
    _nested = {"FallbackState": FallbackState}


class AdditiveObserver:
    """The forward hook of an additive unit's module: after each training call under autograd, the
    per-sample uses ``u`` of every direct parameter (or why it is not additive), recomputed only
    when the shapes of the call's tensor inputs change. ``uses``: ``{name: u or None}``,
    ``reasons``: ``{name: reason}``, ``samples``: B of the last call (its first tensor input's
    leading dimension)."""

    def __init__(self, params: Dict[str, Tensor]):
        self.params = params
        self.signature = None
        self.uses: Dict[str, Optional[Tensor]] = {}
        self.reasons: Dict[str, str] = {}
        self.samples = 1

    def __call__(self, module, args, kwargs, output):
        tensors = [v for v in list(args) + list(kwargs.values()) if isinstance(v, Tensor)]
        sig = tuple(tuple(t.shape) for t in tensors)
        if sig == self.signature:
            return None
        outs = [output] if isinstance(output, Tensor) else [o for o in _flatten(output) if isinstance(o, Tensor)]
        batch = tensors[0].shape[0] if tensors and tensors[0].dim() > 0 else 1
        uses, reasons = {}, {}
        for name, p in self.params.items():
            u, why = additive_uses(outs, p)
            if why is not None:
                reasons[name] = why
            uses[name] = u / max(1, batch) if u is not None else None
        self.signature, self.uses, self.reasons, self.samples = sig, uses, reasons, max(1, batch)
        return None


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
        return (f"closed-form E-MSA of additive parameters ({self.describe_rho(group)}; recognised at the "
                "first forward, the fallback for any that are not added to a state)")

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
        new_state = AdditiveState(unit.state.step + 1, dict(unit.state.fallback))
        ups = []
        for n, p in own.items():
            g = grads[n]
            if g is None:
                continue
            group = ctx.group(p)
            u = obs.uses.get(n) if obs is not None else None
            if u is None:
                reason = obs.reasons.get(n) if obs is not None else None
                if reason is None and obs is None and bool(g.any()):
                    raise RuntimeError(f"parameter {mb.name}.{n} has a gradient but its module's forward was not "
                                       "observed (eval() mode, torch.no_grad, or before the optimizer existed)")
                self._not_additive(mb.name, n, reason or "the model's output does not depend on it through this "
                                   "module's forward")
                sub = Unit(f"{mb.name}.{n}", self.fallback, [p], [n], state=unit.state.fallback.get(n, FallbackState()))
                prop = self.fallback.update(sub, ctx, p, g, group)
                new_state.fallback[n] = prop.state
                ups.extend(prop.updates)
                continue
            eta = ctx.step_size(group, self.key("lr"))
            decay = ctx.decay(p, self.decay_key)
            if eta == 0.0:
                ups.append(Update(p, torch.zeros_like(p), decay=decay))
                continue
            rho = self.effective_rho(group, ctx, batch=float(obs.samples))
            if rho == 0.0:
                ups.append(Update(p, g, alpha=-eta, decay=decay))
                continue
            dt = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
            ups.append(Update(p, additive_step(g.to(dt), u, rho, 1.0 / eta).to(p.dtype), decay=decay))
        return Proposal(ups, new_state)

    def _not_additive(self, module: str, param: str, reason: str) -> None:
        msg = (f"parameter {param!r} of module {module!r} is not an additive parameter ({reason}); it takes "
               "the fallback step")
        if self.strict:
            raise ValueError(f"strict=True: {msg}. Pass exclude=[{module!r}] to accept the fallback explicitly")
        self._warn_once(("not-additive", module, param), msg)
