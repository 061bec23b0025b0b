r"""Closed-form E-MSA for ``nn.MultiheadAttention``: its four projections as four Linear units.

``nn.MultiheadAttention`` applies four affine maps inside ``F.multi_head_attention_forward``:
``q = W_q x_q + b_q``, ``k = W_k x_k + b_k``, ``v = W_v x_v + b_v`` (rows of the packed
``in_proj_weight``/``in_proj_bias``, or ``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ from
``embed_dim``) and ``y = W_o a + b_o`` (``out_proj``) on the heads' concatenated output ``a``.
:mod:`pmptrain.attention` records each projection's input rows and the gradient at its output,
exactly what hooks on four ``nn.Linear`` modules applied to the same inputs would record. Each
projection is then maximised as the Linear unit it is (docs/algorithms.md, "nn.MultiheadAttention"):
the :class:`~pmptrain.optim.affine.AffineEMSARule` step of a Linear with that weight block, bias
block, gradient block and statistics — the step an equivalent model built from four explicit
``nn.Linear`` layers gets. The packed weight's three row blocks are three units, as a model with
separate ``q/k/v`` Linears has; no cross-projection coupling is added or approximated.

``bias_k`` / ``bias_v`` (``add_bias_kv=True``) are key/value rows appended once per sequence, after
the projections: parameters added to the state with no input (a bias-only affine). Their augmented
Hamiltonian, with a sequence as the sample (one row per sample), is
``−⟨∇J, Δb⟩ − (ρ/2)‖Δb‖² − (δ/2)‖Δb‖²`` — the costate penalty is zero (no state enters) — so
``Δb = −∇J/(ρ + δ)``. ``add_zero_attn`` appends zeros after the projections: nothing to control.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..attention import PROJECTIONS, MHATap, projection_blocks
from ..modules import LinearAdapter
from .affine import AffineEMSARule, AffineState, EMSARuleBase, RunningStats
from .rule import Member, Proposal, StepContext, Unit, Update

__all__ = ["MHAEMSARule", "MHAState", "ProjectionAdapter"]


class ProjectionAdapter(LinearAdapter):
    """A Linear seen through a block of a parameter it does not own: ``(m, n)`` fixed."""

    def __init__(self, m: int, n: int):
        self.m, self.n = m, n

    def weight_shape_2d(self, module):
        return self.m, self.n


@dataclass
class MHAState:
    """``step``; ``parts``: the :class:`~pmptrain.optim.affine.AffineState` of each projection;
    ``grad_avg`` with ``grad_decay > 0`` (of the module's parameters)."""

    step: int = 0
    parts: Dict[str, AffineState] = field(default_factory=dict)
    grad_avg: Optional[List[Optional[Tensor]]] = None
    _nested: ClassVar[dict] = {"AffineState": AffineState, "RunningStats": RunningStats}
    _param_shaped: ClassVar[Tuple[str, ...]] = ("grad_avg",)  # sharded under FSDP2


class _BlockContext:
    """A :class:`~pmptrain.optim.rule.StepContext` that shows row blocks of parameters as
    parameters of their own: the gradient is the block of the base parameter's, the group and
    decay are the base parameter's."""

    def __init__(self, ctx: StepContext, views: Dict[int, Tuple[Tensor, int, int]]):
        self._ctx, self._views = ctx, views

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def _base(self, p):
        v = self._views.get(id(p)) if p is not None else None
        return v[0] if v is not None else p

    def grad(self, p):
        v = self._views.get(id(p)) if p is not None else None
        if v is None:
            return self._ctx.grad(p)
        g = self._ctx.grad(v[0])
        return None if g is None else g[v[1]:v[2]]

    def group(self, p):
        return self._ctx.group(self._base(p))

    def decay(self, p, step_key):
        return self._ctx.decay(self._base(p), step_key)


class MHAEMSARule(EMSARuleBase):
    """Closed-form E-MSA of ``nn.MultiheadAttention`` (see the module docstring); the group keys
    are the closed form's (:class:`~pmptrain.optim.affine.EMSARuleBase`)."""

    name = "emsa-mha"
    record_type = MHAState

    def __init__(self, keys=None):
        super().__init__(keys)
        self.linear = AffineEMSARule(keys)

    def init_state(self, unit):
        return MHAState(0, {name: AffineState() for name, *_ in self._blocks(unit)})

    # ------------------------------------------------------------------ the four Linear units
    @staticmethod
    def _module(unit) -> nn.MultiheadAttention:
        return unit.members[0].module

    def _blocks(self, unit):
        return [b for b in projection_blocks(self._module(unit)) if b[1] is not None]

    def capture_keys(self, unit) -> List[str]:
        return [f"{unit.members[0].name}.{name}" for name, *_ in self._blocks(unit)]

    def _sub_units(self, unit, trainable) -> List[Tuple[str, Unit, Dict[int, Tuple[Tensor, int, int]]]]:
        """One Linear unit per projection: its weight and bias blocks as views of the base parameters."""
        module = self._module(unit)
        e = module.embed_dim
        out = []
        for name, base, r0, r1, bias in self._blocks(unit):
            if id(base) not in trainable:
                continue
            w = base[r0:r1]
            views = {id(w): (base, r0, r1)}
            if bias is not None and name != "out_proj":
                ib = module.in_proj_bias
                j = PROJECTIONS.index(name)
                views[id(bias)] = (ib, j * e, (j + 1) * e)
            if bias is not None and id(views.get(id(bias), (bias,))[0]) not in trainable:
                bias = None
            key = f"{unit.members[0].name}.{name}"
            mb = Member(key, module, ProjectionAdapter(r1 - r0, base.shape[1]), w, bias)
            params = [p for p in (w, bias) if p is not None]
            sub = Unit(key, self.linear, params, [key + ".weight", key + ".bias"][:len(params)], [mb],
                       unit.state.parts.get(name) or AffineState())
            out.append((name, sub, views))
        return out

    def sync_capture(self, unit, group, capture) -> None:
        """Register the projections' capture entries (no forward hooks: the tap records them) and
        the module's tap (:mod:`pmptrain.attention`)."""
        trainable = {id(p) for p in unit.params}
        keys = {}
        for name, sub, _ in self._sub_units(unit, trainable):
            mb = sub.members[0]
            spec = self.linear.capture_spec(sub, mb, group)
            entry = capture._entries.get(mb.name)
            if entry is None:
                if spec is None:
                    continue
                capture.add(mb.name, mb.module, mb.adapter, spec, mb.weight._base if mb.weight._base is not None
                            else mb.weight, hook=False)
            elif entry.spec != spec:
                entry.spec = spec
            keys[name] = mb.name
        if keys:
            tap = unit.scratch.get("tap")
            if not isinstance(tap, MHATap) or tap.capture_ref() is not capture:
                tap = MHATap(capture, self._module(unit), keys)
                unit.scratch["tap"] = tap
            tap.keys = keys
            capture.add_tap(self._module(unit), tap)

    def capture_spec(self, unit, member, group):
        return None  # sync_capture registers the projections

    # ------------------------------------------------------------------ the step
    def propose(self, unit: Unit, ctx: StepContext) -> Optional[Proposal]:
        module = self._module(unit)
        trainable = {id(p) for p in unit.params}
        full: Dict[int, Tuple[Tensor, Tensor, float]] = {}  # base id → (base, Δ, decay)
        parts = dict(unit.state.parts)
        for name, sub, views in self._sub_units(unit, trainable):
            bctx = _BlockContext(ctx, views)
            with torch.no_grad():
                prop = self.linear.propose(sub, bctx)
            if prop is None:
                continue
            parts[name] = prop.state
            for u in prop.updates:
                base, r0, r1 = views.get(id(u.param), (u.param, 0, u.param.shape[0]))
                if id(base) not in full:
                    full[id(base)] = (base, torch.zeros_like(base), u.decay)
                full[id(base)][1][r0:r1] = u.change().to(base.dtype)
        updates = [Update(base, delta, decay=decay) for base, delta, decay in full.values()]
        group = ctx.group(unit.primary)
        for p in (module.bias_k, module.bias_v):
            if p is None or id(p) not in trainable:
                continue
            g = ctx.grad(p)
            if g is None:
                continue
            eta = ctx.step_size(ctx.group(p), self.key("lr"))
            if eta > 0.0:
                rho = ctx.scheduled_penalty(group, self.state_rho(group))
                delta = g * (-1.0 / (rho + 1.0 / eta))
            else:
                delta = torch.zeros_like(g)
            updates.append(Update(p, delta, decay=ctx.decay(p, self.decay_key)))
        if not updates:
            return None
        return Proposal(updates, MHAState(unit.state.step + 1, parts, unit.state.grad_avg))

    def describe(self, unit, group):
        names = [n for n, *_ in self._blocks(unit)]
        extra = ", bias_k/bias_v as bias-only affines" if self._module(unit).bias_k is not None else ""
        return (f"closed-form E-MSA of MultiheadAttention's {'/'.join(n[0] for n in names)} projections as "
                f"Linear units{extra} ({self.describe_rho(group)}, route {self.value(group, 'route')}, "
                f"costate {self.value(group, 'costate')})")
