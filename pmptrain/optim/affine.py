r"""Closed-form E-MSA for affine modules (Linear, Conv1d/2d, Embedding) and for tied weights.

One unit is one weight tensor ``W_s`` and the modules that use it (one module, or several for a
tied weight such as a language model's embedding and output layer). The augmented Hamiltonian of the
unit is the sum of its members' (docs/algorithms.md §2, "Tied weights"); in the weight's storage
orientation it is maximised by the Sylvester equation

.. math::

    ρ\,\Big(Σ_t L_t\Big) ΔW_s + ρ\,ΔW_s \Big(Σ_t R_t\Big) + δ_W ΔW_s = S,
    \qquad S = −∇_{W_s}J − Σ_t c_t\,(\text{bias coupling of member } t)

where a member used as ``y = W_s x`` contributes ``L_t = C_p`` (costates) and ``R_t = C'_x``
(states), and a member used as ``y = W_sᵀ x`` (an embedding: ``W = Eᵀ``) contributes them the other
way round. ``∇J`` is the parameter's ``.grad`` — the sum of every member's gradient, after clipping,
accumulation or any edit; the captured states and costates supply only the curvature ``L_t, R_t``.
Each bias is eliminated exactly (``Δb = (g_b − ρΔW x̄)/(ρL + δ_b)``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import ClassVar, List, Optional, Tuple

import torch
from torch import Tensor

from .. import _deferred
from .. import distributed as pdist
from .._profile import phase
from ..trust import trust_region_factor, unit_floor_sq
from ..symmetric import sym_gram
from ..capture import CaptureSpec, ModuleStats
from ..hamiltonian import (
    AffineMember,
    affine_bias_steps,
    affine_system,
    choose_side,
    costate_rms,
    curvature_eig,
    solve_sylvester,
    sylvester_in_eigenbases,
)
from .hyper import PENALTY_MAX, RHO_WHY, Choice, Flag, Int, Maybe, Real, StepSize
from .rule import Member, Proposal, Rule, StepContext, Unit, Update

__all__ = ["AffineEMSARule", "AffineState", "RunningStats", "join_reason"]

_FLOAT_TYPES = (torch.float32, torch.float64)
_MAX_GRAM_ROWS = 16384   # a forced Gram route beyond this many rows is a configuration error
_MAX_DENSE_DIM = 16384   # a dense eigendecomposition beyond this dimension is refused
#: under running averages (``stat_decay > 0``) a costate side wider than this keeps the isotropic
#: costate ``tr(C_p)/m`` (averaged like the rest) instead of a dense m×m statistic (a language
#: model's vocabulary-sized head)
RUNNING_DENSE_COSTATE_MAX = 4096


@dataclass
class RunningStats:
    """The kept statistics of one member (``stat_decay > 0``: running averages; ``stat_every > 1``:
    those of the last refresh): ``cxx`` = C_x, ``x_mean`` = x̄, ``cpp`` = C_p, ``counts`` = index
    counts / B (embeddings), ``rows_per_sample`` = L, ``p_trace`` = an embedding's tr C_p, ``tau`` =
    tr(C_p)/m of a costate side kept isotropic (wider than :data:`RUNNING_DENSE_COSTATE_MAX`)."""

    cxx: Optional[Tensor]
    x_mean: Optional[Tensor]
    cpp: Optional[Tensor]
    counts: Optional[Tensor]
    rows_per_sample: float
    p_trace: Optional[float] = None
    tau: Optional[Tensor] = None


@dataclass
class AffineState:
    """``step``; with running averages, ``running`` (per member) and the eigendecompositions
    ``eig_left`` / ``eig_right`` (``(values, vectors)``; vectors None for a diagonal side) reused
    between refreshes; with ``grad_decay > 0``, ``grad_avg``: the running average of the gradient
    of each of the unit's parameters (in ``unit.params`` order); with ``amortise="rescaled"``,
    ``traces``: ``(tr C_x, tr C_p)`` of the recent batches, averaged every step with ``stat_decay``."""

    step: int = 0
    running: Optional[List[RunningStats]] = None
    eig_left: Optional[Tuple[Tensor, Optional[Tensor]]] = None
    eig_right: Optional[Tuple[Tensor, Optional[Tensor]]] = None
    grad_avg: Optional[List[Optional[Tensor]]] = None
    traces: Optional[Tensor] = None
    _nested: ClassVar[dict] = {"RunningStats": RunningStats}
    _param_shaped: ClassVar[Tuple[str, ...]] = ("grad_avg",)  # sharded under FSDP2


def join_reason(members: List[Member]) -> Optional[str]:
    """Why ``members`` (modules sharing parameters) cannot be one closed-form unit, or None."""
    for mb in members:
        if mb.adapter is None:
            return f"{mb.name} ({type(mb.module).__name__}) has no closed form"
    biases = [mb.bias for mb in members if mb.bias is not None]
    if len({id(b) for b in biases}) != len(biases):
        return "the modules share a bias"
    w = members[0].weight
    if any(mb.weight is not w for mb in members):
        return "the modules share a parameter other than one common weight"
    rows, cols = w.shape[0], w[0].numel()
    for mb in members:
        m, n = mb.adapter.weight_shape_2d(mb.module)
        if (m, n) != ((cols, rows) if mb.adapter.transposed else (rows, cols)):
            return f"{mb.name} uses the shared weight with an incompatible shape"
    return None


class EMSARuleBase(Rule):
    r"""What the closed-form E-MSA rules share: their group keys, the checks of a step without
    statistics, and the SGD step of ρ = 0.

    Group keys (canonical names; a configuration may rename them):

    * ``lr`` — ``δ = 1/η`` with η the step size of this key (the group's ``lr``, or ``key·lr/base_lr``
      for a renamed key); per parameter, so weight and bias may have their own; ``η = 0`` freezes;
    * ``rho`` — ρ ≥ 0 (module-level: the weight's group); ρ = 0 is exactly an SGD step of size η. A
      schedule ``s = lr/base_lr`` divides it, ``ρ/s`` (with ``δ = 1/η``, both penalties scale with
      ``1/s``, so the step is exactly ``s`` times the step at ``base_lr``);
    * ``rho_scale`` — ``none`` (ρ as given) or ``costate`` (ρ in units of the unit's rms costate
      entry: ``ρ_t = ρ·r_t``, :func:`~pmptrain.hamiltonian.costate_rms`);
    * ``rho_state``, ``rho_costate`` — the weights ρ_x, ρ_p of the state and costate penalties
      (None: ``rho``); ``penalty_units`` — ``mean`` (the penalties are means over the B samples) or
      ``sum`` (sums, as in the reference code: ρ_x·B and ρ_p/B in mean units). Schedules and
      ``rho_scale`` scale both alike; the closed form needs ρ_x > 0 whenever ρ_p > 0;
    * ``route`` — ``auto``/``primal``/``gram``: how each side's statistic is kept and solved;
    * ``costate`` — ``exact``, ``isotropic`` (``C_p ≈ tr(C_p)/m·I``) or ``auto`` (isotropic when a
      side is in Gram form, i.e. fewer rows than features; exact otherwise);
    * ``stat_decay`` (β), ``eig_refresh`` (k) — running averages ``C ← βC + (1−β)C_batch`` with the
      eigenbases recomputed every k steps; ``stat_every`` (K) — statistics captured only every K-th
      step (the steps in between solve with the kept statistics and eigenbases and their own
      gradient: amortised curvature, K-FAC's factor interval; the matrix rule only, and only for
      units solved on the primal route — a unit in Gram form is solved exactly every step);
      ``amortise`` — the steps between refreshes: ``kept`` (the kept curvature as it is) or
      ``bounded`` (each kept-eigenbasis curvature ``μ_i + λ_j`` raised to ``2√k|(VᵀSU)_ij|``, the
      Cauchy–Schwarz bound this step's gradient puts on its own batch's curvature, ``k = ρ_p/ρ_x``;
      docs/algorithms.md, "Amortised curvature") or ``rescaled`` (``bounded`` with each side's kept
      eigenvalues scaled by the ratio of this step's trace ``tr C`` to the kept one, captured as
      ``Σ‖x‖²`` and ``Σ‖p̂‖²``: a unit of one Linear or convolution); ``stat_reduce`` — the rows of
      one sequence or image summed before the outer product (K-FAC-reduce; the matrix rule, sides on the primal
      route — a side in Gram form keeps its rows);
      ``eig_floor``, ``eig_float64`` — eigensolver options;
    * ``grad_decay`` (β_S) — the linear term of H̃ is the running average of the gradient,
      ``S̄ ← β_S S̄ + (1−β_S)∇J`` (initialised at the first gradient; every closed-form rule, kept in
      the unit's record as ``grad_avg``), instead of this step's ``∇J`` (β_S = 0).

    Decoupled weight decay uses the step size of ``decay_key`` (``fallback_lr``).
    """

    module_rule = True
    hyper = {
        "lr": StepSize(),
        "rho": Real(0.0, PENALTY_MAX, why=RHO_WHY),
        "rho_scale": Choice(("none", "costate")),
        "rho_state": Maybe(Real(0.0, PENALTY_MAX, why=RHO_WHY)),
        "rho_costate": Maybe(Real(0.0, PENALTY_MAX, why=RHO_WHY)),
        "penalty_units": Choice(("mean", "sum")),
        "route": Choice(("auto", "primal", "gram")),
        "costate": Choice(("auto", "exact", "isotropic")),
        "stat_decay": Real(0.0, 1.0, hi_open=True),
        "grad_decay": Real(0.0, 1.0, hi_open=True),
        "stat_every": Int(1),
        "amortise": Choice(("kept", "bounded", "rescaled")),
        "stat_reduce": Flag(),
        "eig_refresh": Int(1),
        "eig_floor": Real(0.0, PENALTY_MAX, why="rho times the floor must stay finite in float32"),
        "eig_float64": Flag(),
        "max_step": Maybe(Real(0.0, PENALTY_MAX, lo_open=True)),
    }
    decay_key = "fallback_lr"
    #: the defaults of the solver options (every key of ``hyper`` but lr and rho), as in ``EMSA``'s
    #: signature; configurations that do not expose them (DiscreteMSA's kept layers) use these
    SOLVER_DEFAULTS = dict(rho_scale="none", rho_state=None, rho_costate=None, penalty_units="mean", route="auto", costate="auto", stat_decay=0.0, grad_decay=0.0, stat_every=1,
                           amortise="kept", stat_reduce=False, eig_refresh=1, eig_floor=0.0, eig_float64=False, max_step=0.1)

    def __init__(self, keys=None):
        super().__init__(keys)
        self._warned = set()

    def _warn_once(self, key, msg):
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, stacklevel=4)

    def proposal(self, unit: Unit, ctx: StepContext) -> Optional[Proposal]:
        """:meth:`propose` against the running average of the gradient when ``grad_decay > 0``
        (:meth:`averaged_gradients`); the averages go into the proposal's record, so a skipped step
        keeps the old ones."""
        averages = self.averaged_gradients(unit, ctx)
        prop = self.propose(unit, ctx)
        if averages is not None and isinstance(prop, Proposal) and prop.state is not None:
            prop.state.grad_avg = averages
        return prop

    def averaged_gradients(self, unit: Unit, ctx: StepContext) -> Optional[List[Optional[Tensor]]]:
        """With ``grad_decay = β > 0`` (the unit's primary group): ``S̄_p ← β·S̄_p + (1−β)·∇J_p`` for
        every parameter ``p`` of the unit with a gradient (``S̄_p = ∇J_p`` at its first gradient),
        made the step's linear term (:meth:`StepContext.set_linear_term`); returns the new
        averages in ``unit.params`` order (None: β = 0, nothing averaged). A parameter without a
        gradient keeps its average and is not stepped. Exponential averaging of the linear term is
        heavy-ball momentum in Adam's form (the first moment); with ``stat_decay`` the penalties are
        averaged alike, and the step maximises the augmented Hamiltonian of the exponentially
        weighted mixture of the recent batches (docs/algorithms.md, "Averaged steps")."""
        group = ctx.group(unit.primary)
        beta = float(self.value(group, "grad_decay"))
        if beta == 0.0:
            return None
        old = getattr(unit.state, "grad_avg", None) or []
        out: List[Optional[Tensor]] = []
        for i, p in enumerate(unit.params):
            g = ctx.user_grad(p)
            prev = old[i] if i < len(old) else None
            if g is None:
                out.append(prev)
                continue
            dt = g.dtype if g.dtype in _FLOAT_TYPES or g.is_complex() else torch.float32
            if prev is None or prev.shape != g.shape:
                avg = g.to(dt, copy=True)
            else:
                avg = torch.lerp(g.to(dt), prev.to(dt), beta)  # β·S̄ + (1−β)·∇J, a new tensor
            ctx.set_linear_term(p, avg)
            out.append(avg)
        return out

    def trust(self, unit: Unit, ctx: StepContext, proposal: Optional[Proposal]) -> Optional[Proposal]:
        """``proposal`` with its step shortened into the trust region ``‖Δ‖ ≤ τ·s·max(‖θ‖, ‖θ‖_0)``
        of the unit (``τ`` = ``max_step``; None: unchanged; :mod:`pmptrain.trust`)."""
        if proposal is None:
            return None
        group = ctx.group(unit.primary)
        tau = self.value(group, "max_step")
        ups = [u for u in proposal.updates if u.delta is not None]
        if tau is None or not ups:
            return proposal
        step_sq = sum(_norm_sq(u.change()) for u in ups)
        param_sq = sum(_norm_sq(u.param) for u in ups)
        alpha = trust_region_factor(step_sq, param_sq, unit_floor_sq([u.param for u in ups]),
                                    float(tau) * ctx.lr_scale(group))
        for u in ups:
            u.delta = u.delta * alpha.to(u.delta.dtype)
        return proposal

    def _steps(self, ctx: StepContext, params) -> dict:
        """``{id(p): η}`` of the parameters with a gradient."""
        return {id(p): ctx.step_size(ctx.group(p), self.key("lr")) for p in params}

    def _sgd(self, unit: Unit, ctx: StepContext, grads) -> Proposal:
        """ρ = 0 (or no statistics): the maximiser of ⟨−∇J, Δθ⟩ − (δ/2)‖Δθ‖², ``−η·∇J`` exactly."""
        ups = [Update(p, g, alpha=-ctx.step_size(ctx.group(p), self.key("lr")), decay=ctx.decay(p, self.decay_key))
               for p, g in grads if g is not None]
        return Proposal(ups, self.next_state(unit))

    def _no_data(self, unit: Unit, ctx: StepContext, grads) -> Proposal:
        """No captured samples on any rank: an error if a gradient is non-zero, else only decay."""
        if any(g is not None and bool(g.any()) for _, g in grads):
            raise RuntimeError(_no_states_message(unit.name))
        ups = [Update(p, torch.zeros_like(g), decay=ctx.decay(p, self.decay_key)) for p, g in grads if g is not None]
        return Proposal(ups, self.next_state(unit))

    def next_state(self, unit: Unit):
        st = unit.state
        return type(st)(**{**vars(st), "step": st.step + 1})

    def capture_active(self, group) -> bool:
        return self.state_rho(group) != 0.0

    def state_rho(self, group) -> float:
        """The nominal state-penalty weight: ``rho_state``, or ``rho`` when it is None (0: no
        penalty, the step is ``−η·∇J``)."""
        return float(penalty_bases(self, group)[0])

    def costate_ratio(self, group, batch: float) -> float:
        """``ρ_p/ρ_x`` of this step (``batch``: the B of the penalties' means)."""
        rx, rp = penalty_bases(self, group)
        if self.value(group, "penalty_units") == "sum":
            rx, rp = rx * batch, rp / batch
        return rp / rx

    def costate_scaled(self, group) -> bool:
        return self.value(group, "rho_scale") == "costate"

    def effective_rho(self, group, ctx: StepContext, costate_parts=None, batch: float = 1.0, params=None) -> float:
        """The state-penalty weight ρ_x of this step (:meth:`state_rho`, times ``batch`` = B with
        ``penalty_units="sum"``): ``ρ_x/s`` with ``s = lr/base_lr`` (unchanged while ``lr = 0``), times
        the rms costate entry ``r`` of ``costate_parts()`` (a callable returning ``(tr C_p, m, L, B)``
        per member, called only when ``rho_scale="costate"``; docs/algorithms.md, "The units of ρ,
        and schedules"), and times ``c`` when the loop rescaled the gradients of ``params`` by
        ``c`` after the backward pass (:meth:`StepContext.grad_rescale`: clipping), so that the
        costates carry the scale of the gradient the step uses. The costate weight is this times
        :meth:`costate_ratio`."""
        rho = self.state_rho(group)
        if self.value(group, "penalty_units") == "sum":
            rho *= float(batch)
        rho = ctx.scheduled_penalty(group, rho)
        if self.costate_scaled(group):
            parts = costate_parts()
            if not parts:  # the backward pass ran before rho_scale was set: nothing was recorded
                self._warn_once(("rho_scale", id(group)), "rho_scale='costate' but no costate was recorded "
                                "in the backward pass (the option changed after it); this step uses rho as given")
                return rho
            rho *= costate_rms(parts)
            c = ctx.grad_rescale(params) if params is not None else None
            if c is not None:
                rho = rho * c.to(rho.dtype if isinstance(rho, Tensor) else torch.float64)
        return rho

    def describe_rho(self, group) -> str:
        return describe_penalties(self, group, self.costate_scaled(group))

    def describe_trust(self, group) -> str:
        """``", step <= τ·max(|θ|, |θ|_0)"`` for a trust region ``max_step = τ``, else ``""``."""
        tau = self.value(group, "max_step")
        return "" if tau is None else f", step <= {float(tau):g}*max(|theta|, |theta|_0)"


class AffineEMSARule(EMSARuleBase):
    """The exact maximiser of the augmented Hamiltonian of an affine unit (module or tie): see
    :class:`EMSARuleBase` for its group keys and the module docstring for the mathematics."""

    name = "emsa"
    affine = True
    adapter_kinds = ("matrix",)
    record_type = AffineState

    def init_state(self, unit):
        return AffineState()

    def describe(self, unit, group):
        rho = self.value(group, "rho")
        head = "tied closed-form E-MSA" if len(unit.members) > 1 else "closed-form E-MSA"
        if float(rho) == 0.0:
            return f"{head} with rho 0 (an SGD step of size lr)"
        return (f"{head} ({self.describe_rho(group)}, route {self.value(group, 'route')}, "
                f"costate {self.value(group, 'costate')}){self.describe_trust(group)}")

    # ------------------------------------------------------------------ capture
    def amortised(self, group) -> bool:
        """Statistics may be kept across steps: running averages (``stat_decay > 0``) or a refresh
        interval (``stat_every > 1``)."""
        return float(self.value(group, "stat_decay")) > 0.0 or int(self.value(group, "stat_every")) > 1

    def running_averages(self, group) -> bool:
        """``stat_decay > 0``: every member's statistics are dense running averages (the primal
        route with the exact costate)."""
        return float(self.value(group, "stat_decay")) > 0.0

    def refresh_step(self, unit, group) -> bool:
        """Whether the coming step captures statistics: always, unless ``stat_every = K > 1`` and
        kept statistics exist and the step is not a multiple of K — and, with running averages
        (``stat_decay = β``), every step while they are younger than their time constant
        ``1/(1 − β)`` (:func:`eig_refresh_due`: the statistics move fastest early in training)."""
        every = int(self.value(group, "stat_every"))
        return (every <= 1 or unit.state.running is None
                or eig_refresh_due(unit.state.step, every, float(self.value(group, "stat_decay"))))

    def rescaled(self, unit, group) -> bool:
        """``amortise="rescaled"`` applies to ``unit``: one member (a Linear or a convolution; not an
        embedding, not a tie), whose kept statistics exist (docs/algorithms.md, "Amortised
        curvature")."""
        if self.value(group, "amortise") != "rescaled" or len(unit.members) != 1:
            return False
        run = unit.state.running
        return (not unit.members[0].adapter.index_input and run is not None and run[0] is not None
                and run[0].cxx is not None and (run[0].cpp is not None or run[0].tau is not None))

    def capture_spec(self, unit, member, group):
        if not self.capture_active(group):
            return None
        adapter, module = member.adapter, member.module
        m, n = adapter.weight_shape_2d(module)
        w = member.weight
        dt = w.dtype if w.dtype in _FLOAT_TYPES else torch.float32
        if not self.refresh_step(unit, group):  # between refreshes: the traces for "rescaled", else nothing
            return CaptureSpec("diag", "sqnorm", False, n, m, dt) if self.rescaled(unit, group) else None
        if adapter.index_input:
            return CaptureSpec("counts", "sqnorm" if self.costate_scaled(group) else "none", False, n, m, dt)
        reduce = bool(self.value(group, "stat_reduce"))  # K-FAC-reduce wherever rows are folded
        if self.running_averages(group):
            return CaptureSpec("dense", "dense" if m <= RUNNING_DENSE_COSTATE_MAX else "sqnorm", False, n, m, dt,
                               reduce=reduce)
        states = {"auto": "auto", "gram": "rows", "primal": "dense"}[self.value(group, "route")]
        costates = "sqnorm" if self.value(group, "costate") == "isotropic" else states
        return CaptureSpec(states, costates, False, n, m, dt, reduce=reduce)

    # ------------------------------------------------------------------ statistics
    def _gather(self, member: Member, st: ModuleStats, ctx: StepContext, group, dt, grad_b, delta_b) -> Optional[AffineMember]:
        """The member's statistics on the union of the ranks' batches (``None``: no samples)."""
        pg = ctx.process_group
        samples, rows = ctx.union_sizes(member.name, st)
        if samples == 0:
            return None
        adapter, module = member.adapter, member.module
        raw = AffineMember(float(samples), rows / samples, adapter.transposed,
                           grad_b=grad_b.to(dt) if (grad_b is not None and delta_b is not None) else None,
                           delta_b=delta_b if grad_b is not None else None)
        m, n = adapter.weight_shape_2d(module)
        dev = member.weight.device
        # calls without a batch dimension (positions), and an embedding's [1, T] calls on the same
        # indices everywhere: the union's costate is the ranks' mean (every rank agrees for an embedding)
        st.unify_shared_(pg, ctx.world, float(st.samples) * ctx.costate_inv_scale,
                         agree=getattr(adapter, "index_input", False), device=member.weight.device)
        route = self.value(group, "route")
        running = self.running_averages(group)
        b = float(samples)
        if route == "gram" and rows > _MAX_GRAM_ROWS:
            raise RuntimeError(
                f"route='gram' would eigendecompose a {rows}×{rows} Gram matrix for module "
                f"{member.name!r} ({rows} rows = batch × output positions); use route='auto'"
            )
        # states
        gram_in = False
        if adapter.index_input:
            counts = st.counts if st.counts is not None else torch.zeros(n, dtype=dt, device=dev)
            pdist.all_reduce_sum_([counts], pg)
            raw.counts = counts * (getattr(adapter, "state_scale", 1.0) ** 2 / b)  # C_x of the states s·e_i
            if st.g_sq is not None:  # recorded for rho_scale="costate" only: not a penalty
                scale = float(st.samples) * ctx.costate_inv_scale
                sq = (st.g_sq * (scale * scale)).reshape(1).to(dt)
                pdist.all_reduce_sum_([sq], pg)
                raw.p_trace = _scalar(sq) / b
            return raw  # an embedding's input is not differentiable: no costate penalty
        gram_in = not running and choose_side(n, rows, route) and st.xx is None
        if gram_in:
            x = st.state_rows(dt)
            x = x if x is not None else torch.zeros(0, n, dtype=dt, device=dev)
            raw.x_rows = pdist.all_gather_rows(x, pg)
            xs = st.x_sum if (ctx.world == 1 and st.x_sum is not None) else raw.x_rows.sum(0)  # Σx, kept by the capture
            raw.x_mean = xs.to(dt) / b
        else:
            xx = st.fold_states_(dt)
            xx = xx if xx is not None else torch.zeros(n, n, dtype=dt, device=dev)
            xs = st.x_sum if st.x_sum is not None else torch.zeros(n, dtype=dt, device=dev)
            pdist.all_reduce_sum_([xx, xs], pg)
            raw.cxx, raw.x_mean = xx / b, xs / b
        # costates: p̂ = −B_rank·g/S on each rank (sign irrelevant in second moments)
        scale = float(st.samples) * ctx.costate_inv_scale
        mode = self.value(group, "costate")
        gram_out = not running and choose_side(m, rows, route) and st.gg is None
        if running:  # running averages: the exact costate, isotropic only on a very wide side
            iso = m > RUNNING_DENSE_COSTATE_MAX
        else:
            iso = mode == "isotropic" or (mode == "auto" and (gram_in or gram_out))
        has_rows = bool(st.g_rows) or st.gg is not None
        if not iso and not has_rows and st.g_sq is not None:
            self._warn_once(member.name, f"module {member.name!r}: costate={mode!r} needs the costate rows, but "
                            "only their norms were recorded (the option changed after the backward pass); "
                            "this step uses the isotropic costate")
            iso = True
        if iso:
            sq = (st.g_sq if st.g_sq is not None else torch.zeros((), dtype=dt, device=dev)) * (scale * scale)
            sq = sq.reshape(1)
            pdist.all_reduce_sum_([sq], pg)
            raw.tau = _scalar(sq) / (b * m)
        elif gram_out:
            p = st.costate_rows(dt)
            p = p * scale if p is not None else torch.zeros(0, m, dtype=dt, device=dev)
            raw.p_rows = pdist.all_gather_rows(p, pg) / math.sqrt(b)
        else:
            gg = st.fold_costates_(dt)
            gg = gg * (scale * scale) if gg is not None else torch.zeros(m, m, dtype=dt, device=dev)
            pdist.all_reduce_sum_([gg], pg)
            raw.cpp = gg / b
        return raw

    # ------------------------------------------------------------------ the step
    def propose(self, unit: Unit, ctx: StepContext):
        members = unit.members
        w = members[0].weight
        group = ctx.group(w)
        gw = ctx.grad(w)
        biases = [(mb, mb.bias, ctx.grad(mb.bias)) for mb in members if mb.bias is not None]
        stats = []
        for mb in members:
            stats.append(ctx.capture.pop(mb.name) if mb.name in ctx.capture.keys() else None)
        if gw is None and all(g is None for _, _, g in biases):
            return None
        rows_s, cols_s = w.shape[0], w[0].numel()
        gw2 = gw.reshape(rows_s, cols_s) if gw is not None else torch.zeros(rows_s, cols_s, dtype=w.dtype, device=w.device)
        eta_w = ctx.step_size(group, self.key("lr"))
        rho = self.state_rho(group)
        etas = {id(b): ctx.step_size(ctx.group(b), self.key("lr")) for _, b, _ in biases}
        decay_w = ctx.decay(w, self.decay_key)
        state: AffineState = unit.state
        new_state = AffineState(state.step + 1, state.running, state.eig_left, state.eig_right, traces=state.traces)

        grads = [(w, gw)] + [(b, gb) for _, b, gb in biases]
        amortised = self.amortised(group)
        scales = None  # (a_x, a_p) of a "rescaled" step between refreshes
        # statistics of this step's backward passes, or (an amortised step) the kept ones
        fresh = self.refresh_step(unit, group)
        if fresh and any(s is None for s in stats) or rho == 0.0:
            if rho != 0.0:
                self._warn_once(unit.name, f"{unit.name!r}: rho > 0 but no statistics were recorded (rho was 0 "
                                "when the backward pass ran); this step is a plain gradient step")
            return self._sgd(unit, ctx, grads)

        dt = w.dtype if w.dtype in _FLOAT_TYPES else torch.float32
        gb_of = {id(mb): g for mb, _, g in biases}
        delta_b_of = {}
        for mb, b, gb in biases:
            eta_b = etas[id(b)]
            delta_b_of[id(mb)] = (1.0 / eta_b) if (gb is not None and eta_b > 0.0) else None
        decay = float(self.value(group, "stat_decay"))
        with phase("statistics"):
            if fresh:
                raws = [self._gather(mb, st, ctx, group, dt, gb_of.get(id(mb)), delta_b_of.get(id(mb)))
                        for mb, st in zip(members, stats)]
                if all(r is None for r in raws):
                    return self._no_data(unit, ctx, grads)
                if self.value(group, "amortise") == "rescaled" and len(members) == 1 and raws[0] is not None:
                    now = _batch_traces(raws[0], members[0], dt)
                    if now is not None:
                        new_state.traces = _blend_traces(state.traces, now, decay)
                if amortised and (decay > 0.0 or all(r is None or r.primal() for r in raws)):
                    # β per step: a refresh Δ steps after the last blends with β^Δ (time constant 1/(1−β) steps)
                    beta = decay ** steps_since_refresh(state.step, int(self.value(group, "stat_every")), decay)
                    raws, new_state.running = self._running(raws, state.running, beta)
                elif amortised:  # a unit solved in Gram form: exact every step (cheap), nothing kept
                    new_state.running = new_state.eig_left = new_state.eig_right = None
            else:  # an amortised step: the kept statistics, this step's bias gradients
                raws = [None if run is None else _member_from_running(run, AffineMember(
                            0.0, 0.0, mb.adapter.transposed, grad_b=None if gb_of.get(id(mb)) is None
                            or delta_b_of.get(id(mb)) is None else gb_of[id(mb)].to(dt),
                            delta_b=delta_b_of.get(id(mb)) if gb_of.get(id(mb)) is not None else None))
                        for mb, run in zip(members, state.running)]
                now = self._step_traces(unit, stats[0], ctx, dt) if self.rescaled(unit, group) else None
                if now is not None and raws[0] is not None:
                    new_state.traces = _blend_traces(state.traces, now, decay)
                    scales = _trace_ratios(new_state.traces, state.running[0], members[0], dt)
                    raws = [rescale_member(raws[0], *scales)]
            present = [r for r in raws if r is not None]
            batch = present[0].samples if present else 1.0
            rho = self.effective_rho(group, ctx, lambda: self._costate_parts(members, raws), batch, unit.params)
            ratio = self.costate_ratio(group, batch)
            if ratio != 1.0:  # ρ_p ≠ ρ_x: the costate statistic carries ρ_p/ρ_x (the solve uses ρ = ρ_x)
                raws = [None if r is None else scale_costate(r, ratio) for r in raws]
                present = [r for r in raws if r is not None]
        if not ctx.solves(unit):  # solve sharding: the owner rank solves, the shell shares its result
            return ctx.deferred(unit)
        with phase("solve"):
            s, left, right = affine_system(gw2.to(dt), present, rho)
            if eta_w > 0.0:
                for side in (left, right):
                    if side.kind() == "dense" and side.dim > _MAX_DENSE_DIM:
                        raise ValueError(
                            f"{unit.name!r}: the exact solve needs a dense {side.dim}×{side.dim} "
                            "eigendecomposition; use costate='isotropic' (or 'auto') for this module"
                        )
                delta_w = 1.0 / eta_w
                floor, f64 = float(self.value(group, "eig_floor")), bool(self.value(group, "eig_float64"))
                if new_state.running is not None:
                    refresh = state.eig_left is None or (fresh and eig_refresh_due(
                        state.step, int(self.value(group, "eig_refresh")), decay))
                    eig_l = curvature_eig(left, s, floor, f64) if refresh else state.eig_left
                    eig_r = curvature_eig(right, s, floor, f64) if refresh else state.eig_right
                    new_state.eig_left, new_state.eig_right = eig_l, eig_r
                    if scales is not None:  # the kept eigenvalues at this step's traces (left: C_p unless transposed)
                        a_l, a_r = scales[::-1] if not members[0].adapter.transposed else scales
                        eig_l, eig_r = (eig_l[0] * a_l, eig_l[1]), (eig_r[0] * a_r, eig_r[1])
                    bound = 0.0  # between refreshes, "bounded": the kept curvature lifted to this step's bound
                    if not fresh and self.value(group, "amortise") in ("bounded", "rescaled"):
                        bound = 2.0 * math.sqrt(ratio)
                        # ρ_t carries the clip factor c (S = c·∇J, effective_rho): the bound is on the
                        # unclipped gradient, κ|S̃|/c, so that clipping still acts on δ only
                        c = ctx.grad_rescale(unit.params) if self.costate_scaled(group) else None
                        if c is not None:
                            bound = bound / c.to(dt)
                    dws = sylvester_in_eigenbases(s, eig_l, eig_r, rho, delta_w, bound)
                else:
                    dws = solve_sylvester(s, left, right, rho, delta_w, floor, f64, overwrite_s=True)
            else:
                dws = torch.zeros_like(s)
            db_of = {}
            for mb, raw in zip(members, raws):
                if raw is not None:
                    db_of[id(mb)] = affine_bias_steps(dws, [raw], rho)[0]
        ups = [Update(w, dws.reshape(w.shape).to(w.dtype), decay=decay_w)] if gw is not None else []
        for mb, b, gb in biases:
            if gb is None:
                continue
            db = db_of.get(id(mb))
            ups.append(Update(b, (db if db is not None else torch.zeros_like(gb)).to(b.dtype),
                              decay=ctx.decay(b, self.decay_key)))
        return self.trust(unit, ctx, Proposal(ups, new_state))

    def _step_traces(self, unit: Unit, st: Optional[ModuleStats], ctx: StepContext, dt) -> Optional[Tensor]:
        """``(tr C_x, tr C_p)`` of this step's batch between refreshes (``Σ‖x‖²/B``, ``Σ‖p̂‖²/B`` on
        the union of the ranks' batches; a 2-vector), or None without them."""
        member = unit.members[0]
        if st is None or st.x_sq is None:
            return None
        samples, _ = ctx.union_sizes(member.name, st)
        if samples == 0:
            return None
        scale = float(st.samples) * ctx.costate_inv_scale
        st.unify_shared_(ctx.process_group, ctx.world, scale)
        if st.g_sq is None:
            return None
        sums = torch.stack([st.x_sq.sum().to(dt), st.g_sq.to(dt) * (scale * scale)])
        pdist.all_reduce_sum_([sums], ctx.process_group)
        return sums / float(samples)

    @staticmethod
    def _costate_parts(members, raws):
        """``(tr C_p, m, L, B)`` of every member with a costate statistic (for :meth:`effective_rho`)."""
        parts = []
        for mb, raw in zip(members, raws):
            if raw is None:
                continue
            m = mb.adapter.weight_shape_2d(mb.module)[0]
            tr = raw.costate_trace(m)
            if tr is not None:
                parts.append((tr, m, raw.rows_per_sample, raw.samples))
        return parts

    @staticmethod
    def _running(raws: List[Optional[AffineMember]], old: Optional[List[Optional[RunningStats]]], beta: float):
        """Running averages of each member's dense statistics; the members rebuilt from them."""
        new_run, out = [], []
        for i, raw in enumerate(raws):
            prev = old[i] if old is not None and i < len(old) else None
            if raw is None:
                new_run.append(prev)
                out.append(None if prev is None else _member_from_running(prev, None))
                continue
            cxx = raw.cxx if raw.x_rows is None else sym_gram(raw.x_rows) / raw.samples
            cpp = raw.cpp if raw.p_rows is None else sym_gram(raw.p_rows)
            cur = RunningStats(cxx, raw.x_mean, cpp, raw.counts, raw.rows_per_sample, raw.p_trace, raw.tau)
            if prev is not None and beta > 0.0:
                def ema(a, b):
                    return None if a is None or b is None else beta * a + (1.0 - beta) * b
                cur = RunningStats(ema(prev.cxx, cur.cxx), ema(prev.x_mean, cur.x_mean), ema(prev.cpp, cur.cpp),
                                   ema(prev.counts, cur.counts),
                                   beta * prev.rows_per_sample + (1.0 - beta) * cur.rows_per_sample,
                                   ema(prev.p_trace, cur.p_trace), ema(prev.tau, cur.tau))
            new_run.append(cur)
            out.append(_member_from_running(cur, raw))
        return out, new_run


def _member_from_running(r: RunningStats, like: Optional[AffineMember]) -> AffineMember:
    """Running averages as an :class:`AffineMember` (already per sample: ``samples = 1``), with the
    bias data of this step's member ``like``."""
    return AffineMember(1.0, r.rows_per_sample, like.transposed if like is not None else False,
                        cxx=r.cxx, counts=r.counts, x_mean=r.x_mean, cpp=r.cpp, tau=r.tau,
                        grad_b=like.grad_b if like is not None else None,
                        delta_b=like.delta_b if like is not None else None,
                        p_trace=r.p_trace if r.p_trace is not None else (like.p_trace if like is not None else None))


def describe_penalties(rule, group, costate_scaled: bool = False) -> str:
    """The penalty weights of a rule_table description: ``rho ρ`` (``× rms costate`` when scaled;
    the weight both penalties use, ``rho_state`` = ``rho_costate`` if both are set), or
    ``rho_state ρ_x, rho_costate ρ_p`` when they differ, and ``summed over the batch`` for
    ``penalty_units="sum"``."""
    rx, rp = penalty_bases(rule, group)
    rho = rule.value(group, "rho")
    if rx != rp:
        text = f"rho_state {rx:g}, rho_costate {rp:g}"
    else:  # one weight: rho as given, or the common value of rho_state = rho_costate
        text = f"rho {rho}" if rx == float(rho) else f"rho {rx:g}"
    if costate_scaled:
        text += " x rms costate"
    if rule.value(group, "penalty_units") == "sum":
        text += ", summed over the batch"
    return text


def penalty_bases(rule, group) -> tuple:
    """``(ρ_x, ρ_p)`` as given: ``rho_state`` / ``rho_costate``, each ``rho`` when None."""
    rho = float(rule.value(group, "rho"))
    rx, rp = rule.value(group, "rho_state"), rule.value(group, "rho_costate")
    return (rho if rx is None else float(rx)), (rho if rp is None else float(rp))


def _batch_traces(raw: AffineMember, member: Member, dt) -> Optional[Tensor]:
    """``(tr C_x, tr C_p)`` of a refresh step's batch statistics (before any blending), or None."""
    if raw.cxx is not None:
        tx = raw.cxx.diagonal(dim1=-2, dim2=-1).sum()
    elif raw.x_rows is not None:
        tx = raw.x_rows.square().sum() / raw.samples
    else:
        return None
    tp = raw.costate_trace(member.adapter.weight_shape_2d(member.module)[0])
    if tp is None:
        return None
    return torch.stack([torch.as_tensor(tx, dtype=dt), torch.as_tensor(tp, dtype=dt, device=tx.device)])


def _blend_traces(old: Optional[Tensor], now: Tensor, beta: float) -> Tensor:
    """The traces averaged every step, ``β·old + (1 − β)·now`` (``now`` at the first step or β = 0)."""
    return now if old is None or beta == 0.0 else beta * old.to(now.dtype) + (1.0 - beta) * now


def _trace_ratios(traces: Tensor, run: RunningStats, member: Member, dt):
    """``(a_x, a_p)`` of a ``"rescaled"`` step between refreshes: the averaged traces of the recent
    batches (this step's alone with ``stat_decay = 0``) over the kept statistics' (0-dim tensors; 1
    where a kept trace is 0)."""
    m = member.adapter.weight_shape_2d(member.module)[0]
    kept_p = run.cpp.diagonal(dim1=-2, dim2=-1).sum() if run.cpp is not None else torch.as_tensor(run.tau) * m
    kept = torch.stack([run.cxx.diagonal(dim1=-2, dim2=-1).sum().to(dt), torch.as_tensor(kept_p, dtype=dt)])
    ratio = torch.where(kept > 0, traces.to(dt) / kept.clamp_min(torch.finfo(dt).tiny), torch.ones_like(kept))
    return ratio[0], ratio[1]


def rescale_member(raw: AffineMember, a_x: Tensor, a_p: Tensor) -> AffineMember:
    """``raw`` with its states scaled by ``√a_x`` and its costates by ``√a_p``: ``C_x → a_x C_x``,
    ``x̄ → √a_x x̄``, ``C_p → a_p C_p`` (so ``C'_x → a_x C'_x`` exactly: the eigenvectors are kept)."""
    def mul(t, a):
        return None if t is None else t * a
    return dataclasses.replace(raw, cxx=mul(raw.cxx, a_x), x_mean=mul(raw.x_mean, a_x.sqrt()), cpp=mul(raw.cpp, a_p),
                               tau=mul(raw.tau, a_p), p_trace=mul(raw.p_trace, a_p))


def scale_costate(raw: AffineMember, k: float) -> AffineMember:
    """``raw`` with its costate statistic multiplied by ``k`` (``C_p → k·C_p``)."""
    return dataclasses.replace(
        raw, tau=None if raw.tau is None else raw.tau * k,
        cpp=None if raw.cpp is None else raw.cpp * k,
        p_rows=None if raw.p_rows is None else raw.p_rows * math.sqrt(k))


def eig_refresh_due(step: int, every: int, decay: float) -> bool:
    """Whether step ``step`` recomputes the eigenbases of running statistics kept with ``stat_decay
    = decay``: every ``every``-th step, and every step while the averages are younger than their
    time constant ``1/(1 − decay)`` (they still move fast; K-FAC refreshes more often early too)."""
    return step % every == 0 or (decay > 0.0 and step < 1.0 / (1.0 - decay))


def steps_since_refresh(step: int, every: int, decay: float) -> int:
    """``Δ``: how many steps before ``step`` the statistics were last captured under ``stat_every =
    every`` (refresh steps: :func:`eig_refresh_due`; 1 when ``every = 1``). A refresh blends the
    running averages with ``β^Δ``, as if its batch's statistics stood for each of the ``Δ`` steps
    since the last one, so that ``stat_decay`` keeps its time constant of ``1/(1 − β)`` steps."""
    for d in range(1, max(1, every)):
        if step - d >= 0 and eig_refresh_due(step - d, every, decay):
            return d
    return max(1, every)


def _scalar(t: Tensor):
    """A one-element statistic as a Python float, or as a 0-dim tensor inside
    :func:`pmptrain._deferred.collecting` (no host synchronisation per unit)."""
    return t.reshape(()) if _deferred.active() else float(t)


def _norm_sq(t: Tensor) -> Tensor:
    """``‖t‖²`` as a 0-dim tensor, accumulated in at least float32 (no host synchronisation)."""
    t = t.detach()
    low = t.dtype in (torch.float16, torch.bfloat16)
    return torch.linalg.vector_norm(t, dtype=torch.float32 if low else None).square()


def _no_states_message(name: str) -> str:
    return (
        f"module {name!r} has a gradient but no captured states from its forward pass, so its "
        "augmented Hamiltonian cannot be formed. Possible causes: the forward pass ran in eval() "
        "mode or under torch.no_grad(); it ran before the optimizer was created; the model's "
        "compiled code was traced without the optimizer's hooks (pmptrain drops dynamo's code caches "
        "when it hooks a model; if the model was compiled in a way that escapes this, call "
        "torch._dynamo.reset() after creating the optimizer); or .grad was set by hand."
    )
