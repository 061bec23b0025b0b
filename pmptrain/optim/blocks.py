r"""Closed-form E-MSA for the layers whose maximiser decomposes into small independent blocks.

* :class:`ChannelEMSARule` — the per-channel affine ``y = γ ⊙ x̂ + β`` of LayerNorm, RMSNorm,
  GroupNorm, BatchNorm and InstanceNorm (the normalisation is fixed dynamics, the state is ``x̂``):
  one 2×2 system per channel (:func:`pmptrain.hamiltonian.solve_channel_affine`);
* :class:`GroupedEMSARule` — grouped and depthwise convolutions: one Sylvester solve per group,
  batched (:func:`pmptrain.hamiltonian.solve_grouped_affine`).

Both take their linear term from ``.grad`` and their curvature from the statistics captured since
the last ``zero_grad()``, like :class:`~pmptrain.optim.affine.AffineEMSARule`, and share its group
keys (``lr``, ``rho``, ``rho_scale``, ``costate``, ``stat_decay``, ``eig_refresh``, ``eig_floor``,
``eig_float64``; ``route`` does not apply: these blocks are always solved in primal form).
Derivations: docs/algorithms.md §2, "Normalisation layers" and "Grouped convolutions".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, List, Optional, Tuple

import torch
from torch import Tensor

from .. import distributed as pdist
from .._profile import phase
from ..capture import CaptureSpec
from ..hamiltonian import solve_channel_affine, solve_grouped_affine
from .affine import EMSARuleBase, eig_refresh_due, _scalar
from .rule import Proposal, StepContext, Unit, Update

__all__ = ["ChannelEMSARule", "ChannelState", "GroupedEMSARule", "GroupedState"]

_FLOAT_TYPES = (torch.float32, torch.float64)


def _dtype(p: Tensor):
    return p.dtype if p.dtype in _FLOAT_TYPES else torch.float32


def _ema(old: Optional[Tensor], new: Tensor, beta: float) -> Tensor:
    return new if old is None else beta * old + (1.0 - beta) * new


@dataclass
class ChannelState:
    """``step``; with running averages the per-sample statistics ``a = Σx̂²/B``, ``b = Σx̂/B``,
    ``e = Σp̂²/B`` (per channel) and ``rows_per_sample``; ``grad_avg`` with ``grad_decay > 0``."""

    _param_shaped: ClassVar[Tuple[str, ...]] = ("a", "b", "e", "grad_avg")  # per channel: sharded under FSDP2

    step: int = 0
    a: Optional[Tensor] = None
    b: Optional[Tensor] = None
    e: Optional[Tensor] = None
    rows_per_sample: float = 0.0
    grad_avg: Optional[List[Optional[Tensor]]] = None


class ChannelEMSARule(EMSARuleBase):
    """Exact maximiser of the augmented Hamiltonian of a normalisation layer's affine: per channel
    the 2×2 system of :func:`~pmptrain.hamiltonian.solve_channel_affine` (the costate penalty is
    diagonal, so ``costate`` is always exact here)."""

    name = "emsa-channel"
    adapter_kinds = ("channel",)
    record_type = ChannelState

    def init_state(self, unit):
        return ChannelState()

    def costate_scaled(self, group) -> bool:
        # rho_scale="costate" is a weight-matrix option: a norm affine's costate-scaled step moves
        # every gain by O(1/ρ) of itself per step, measured worse on the GPT bench (val loss 2.43 vs
        # 2.37 with ρ as given; docs/algorithms.md, "The units of ρ, and schedules")
        return False

    def describe(self, unit, group):
        return f"closed-form E-MSA of a per-channel affine ({self.describe_rho(group)}){self.describe_trust(group)}"

    def capture_spec(self, unit, member, group):
        if not self.capture_active(group):
            return None
        c = member.adapter.channels(member.module)
        return CaptureSpec("diag", "diag", False, c, c, _dtype(unit.primary))

    def propose(self, unit: Unit, ctx: StepContext):
        mb = unit.members[0]
        scale, shift = mb.weight, mb.bias
        st = ctx.capture.pop(mb.name) if mb.name in ctx.capture.keys() else None
        grads = [(p, ctx.grad(p)) for p in (scale, shift) if p is not None]
        if all(g is None for _, g in grads):
            return None
        group = ctx.group(unit.primary)
        rho = self.state_rho(group)
        if rho == 0.0 or st is None:
            return self._sgd(unit, ctx, grads)
        dev, dt = unit.primary.device, _dtype(unit.primary)
        samples, rows = ctx.union_sizes(mb.name, st)
        if samples == 0:
            return self._no_data(unit, ctx, grads)
        c = mb.adapter.channels(mb.module)
        zeros = torch.zeros(c, dtype=dt, device=dev)
        scale_p = float(st.samples) * ctx.costate_inv_scale  # p̂ = −B_rank·g/S
        st.unify_shared_(ctx.process_group, ctx.world, scale_p)  # calls without a batch dimension
        sums = [st.x_sq if st.x_sq is not None else zeros.clone(), st.x_sum if st.x_sum is not None else zeros.clone(),
                (st.g_sq_cols if st.g_sq_cols is not None else zeros.clone()) * (scale_p * scale_p)]
        pdist.all_reduce_sum_(sums, ctx.process_group)
        b_ = float(samples)
        a, b, e, L = sums[0] / b_, sums[1] / b_, sums[2] / b_, rows / b_
        new_state = self.next_state(unit)
        beta = float(self.value(group, "stat_decay"))
        if beta > 0.0:
            old = unit.state
            if old.a is not None:
                a, b, e = _ema(old.a, a, beta), _ema(old.b, b, beta), _ema(old.e, e, beta)
                L = beta * old.rows_per_sample + (1.0 - beta) * L
            new_state.a, new_state.b, new_state.e, new_state.rows_per_sample = a, b, e, L
        g_of = dict((id(p), g) for p, g in grads)
        steps = self._steps(ctx, [p for p, g in grads if g is not None])

        def free(p):  # −∇J and δ of a parameter that moves this step, else (None, None)
            g = g_of.get(id(p)) if p is not None else None
            if g is None or steps[id(p)] == 0.0:
                return None, None
            return -g.to(dt).reshape(-1), 1.0 / steps[id(p)]

        (gs, ds), (gb, db) = free(scale), free(shift)
        rho = self.effective_rho(group, ctx, batch=b_)
        if not ctx.solves(unit):  # solve sharding: the owner rank solves, the shell shares its result
            return ctx.deferred(unit)
        ups = []
        if gs is not None or gb is not None:
            with phase("solve"):
                d_scale, d_shift = solve_channel_affine(gs, gb, a, b, e * self.costate_ratio(group, b_), L, 1.0,
                                                        rho, ds, db)
        else:
            d_scale = d_shift = None
        for p, d in ((scale, d_scale), (shift, d_shift)):
            if p is None or g_of.get(id(p)) is None:
                continue
            delta = d.reshape(p.shape).to(p.dtype) if d is not None else torch.zeros_like(p)
            ups.append(Update(p, delta, decay=ctx.decay(p, self.decay_key)))
        return self.trust(unit, ctx, Proposal(ups, new_state))


@dataclass
class GroupedState:
    """``step``; with running averages the per-group ``cxx``, ``x_mean``, ``cpp``, ``rows_per_sample``
    and the eigendecompositions reused between refreshes (``eig_in`` of ``C'_x``, ``eig_out`` of
    ``C_p``); ``grad_avg`` with ``grad_decay > 0``."""

    step: int = 0
    cxx: Optional[Tensor] = None
    x_mean: Optional[Tensor] = None
    cpp: Optional[Tensor] = None
    rows_per_sample: float = 0.0
    eig_in: Optional[Tuple[Tensor, Tensor]] = None
    eig_out: Optional[Tuple[Tensor, Tensor]] = None
    grad_avg: Optional[List[Optional[Tensor]]] = None
    _param_shaped: ClassVar[Tuple[str, ...]] = ("grad_avg",)  # sharded under FSDP2


class GroupedEMSARule(EMSARuleBase):
    """Exact maximiser for a grouped / depthwise convolution: the block-diagonal weight's groups are
    independent affine maps of disjoint channel blocks, solved as one batch. ``costate="isotropic"``
    uses ``tr(C_p)/m`` per group; ``"auto"`` and ``"exact"`` the exact ``C_p`` (m = C_out/groups is
    small)."""

    name = "emsa-grouped"
    adapter_kinds = ("grouped",)
    record_type = GroupedState

    def init_state(self, unit):
        return GroupedState()

    def describe(self, unit, group):
        mb = unit.members[0]
        g = mb.adapter.groups(mb.module)
        return f"closed-form E-MSA per group ({g} groups, {self.describe_rho(group)}){self.describe_trust(group)}"

    def capture_spec(self, unit, member, group):
        if not self.capture_active(group):
            return None
        m, n = member.adapter.weight_shape_2d(member.module)
        return CaptureSpec("dense", "dense", False, n, m, _dtype(member.weight), groups=member.adapter.groups(member.module))

    def propose(self, unit: Unit, ctx: StepContext):
        mb = unit.members[0]
        w, bias = mb.weight, mb.bias
        st = ctx.capture.pop(mb.name) if mb.name in ctx.capture.keys() else None
        gw, gb = ctx.grad(w), ctx.grad(bias) if bias is not None else None
        grads = [(w, gw)] + ([(bias, gb)] if bias is not None else [])
        if gw is None and gb is None:
            return None
        group = ctx.group(w)
        rho = self.state_rho(group)
        if rho == 0.0 or st is None:
            return self._sgd(unit, ctx, grads)
        dev, dt = w.device, _dtype(w)
        samples, rows = ctx.union_sizes(mb.name, st)
        if samples == 0:
            return self._no_data(unit, ctx, grads)
        g = mb.adapter.groups(mb.module)
        m, n = mb.adapter.weight_shape_2d(mb.module)
        m_g, n_g = m // g, n // g
        scale_p = float(st.samples) * ctx.costate_inv_scale
        st.unify_shared_(ctx.process_group, ctx.world, scale_p)  # calls without a batch dimension
        xx = st.xx if st.xx is not None else torch.zeros(g, n_g, n_g, dtype=dt, device=dev)
        xs = st.x_sum if st.x_sum is not None else torch.zeros(g * n_g, dtype=dt, device=dev)
        gg = st.gg * (scale_p * scale_p) if st.gg is not None else torch.zeros(g, m_g, m_g, dtype=dt, device=dev)
        pdist.all_reduce_sum_([xx, xs, gg], ctx.process_group)
        b_ = float(samples)
        cxx, x_mean, cpp, L = xx / b_, xs.reshape(g, n_g) / b_, gg / b_, rows / b_
        new_state = self.next_state(unit)
        beta = float(self.value(group, "stat_decay"))
        old = unit.state
        eig = None
        if beta > 0.0:
            if old.cxx is not None:
                cxx, x_mean, cpp = _ema(old.cxx, cxx, beta), _ema(old.x_mean, x_mean, beta), _ema(old.cpp, cpp, beta)
                L = beta * old.rows_per_sample + (1.0 - beta) * L
                if old.eig_in is not None and not eig_refresh_due(old.step, int(self.value(group, "eig_refresh")), beta):
                    eig = (old.eig_in, old.eig_out)
            new_state.cxx, new_state.x_mean, new_state.cpp, new_state.rows_per_sample = cxx, x_mean, cpp, L
        costate = cpp
        if self.value(group, "costate") == "isotropic" and beta == 0.0:
            costate = cpp.diagonal(dim1=1, dim2=2).sum(-1) / m_g
        costate = costate * self.costate_ratio(group, b_)  # ρ_p/ρ_x: the solve uses ρ = ρ_x
        rho = self.effective_rho(group, ctx, lambda: [(_scalar(cpp.diagonal(dim1=1, dim2=2).sum()), g * m_g, L, 1.0)],
                                 batch=b_, params=[p for p in (w, bias) if p is not None])
        eta_w = self._steps(ctx, [w])[id(w)] if gw is not None else 0.0
        eta_b = self._steps(ctx, [bias])[id(bias)] if gb is not None else 0.0
        if eta_w == 0.0 and eta_b == 0.0:
            return self._no_data(unit, ctx, [(p, torch.zeros_like(q)) for p, q in grads if q is not None])
        tr = mb.adapter.transposed  # each stored block is W_jᵀ (a grouped transposed convolution)
        if gw is None:
            grad_w = torch.zeros(g, m_g, n_g, dtype=dt, device=dev)
        else:
            grad_w = gw.to(dt).reshape(g, n_g, m_g).transpose(1, 2) if tr else gw.to(dt).reshape(g, m_g, n_g)
        grad_b = gb.to(dt).reshape(g, m_g) if (gb is not None and eta_b > 0.0) else None
        if not ctx.solves(unit):  # solve sharding: the owner rank solves, the shell shares its result
            return ctx.deferred(unit)
        if eta_w > 0.0:
            with phase("solve"):
                dw, db, eig = solve_grouped_affine(grad_w, grad_b, cxx, x_mean, costate, L, rho, 1.0 / eta_w,
                                                   1.0 / eta_b if grad_b is not None else None,
                                                   float(self.value(group, "eig_floor")),
                                                   bool(self.value(group, "eig_float64")), eig)
            if beta > 0.0:
                new_state.eig_in, new_state.eig_out = eig
        else:  # the weight is frozen this step: the bias alone, Δb = g_b/(ρL + δ_b)
            dw = torch.zeros_like(grad_w)
            db = -grad_b / (rho * L + 1.0 / eta_b) if grad_b is not None else None
        ups = []
        if gw is not None:
            dw = dw.transpose(1, 2) if tr else dw
            ups.append(Update(w, dw.reshape(w.shape).to(w.dtype), decay=ctx.decay(w, self.decay_key)))
        if gb is not None:
            delta = db.reshape(bias.shape).to(bias.dtype) if db is not None else torch.zeros_like(bias)
            ups.append(Update(bias, delta, decay=ctx.decay(bias, self.decay_key)))
        return self.trust(unit, ctx, Proposal(ups, new_state))
