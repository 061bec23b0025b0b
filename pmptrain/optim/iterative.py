r"""Iterative E-MSA: an inner optimiser on the augmented Hamiltonian of any module.

The reference approach of Li, Chen, Tai & E (JMLR 2018): for every module with parameters, a few
iterations of L-BFGS (or Adam/SGD) on ``H̃_t`` evaluated from the recorded calls with
``torch.func.functional_call`` (:func:`pmptrain.hamiltonian.iterative_maximise`). The linear term of
H at θ_k is the user's gradient ``−.grad``; the recorded costates supply the Hamiltonian's curvature
and the two feasibility penalties (docs/algorithms.md §3).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.func import functional_call

from .. import distributed as pdist
from ..capture import CaptureSpec
from ..hamiltonian import iterative_maximise
from .affine import _no_states_message
from .hyper import PENALTY_MAX, RHO_WHY, Choice, Int, Real, StepSize
from .rule import Proposal, Rule, Update

__all__ = ["IterativeEMSARule", "IterativeState"]


@dataclass
class IterativeState:
    step: int = 0


class IterativeEMSARule(Rule):
    r"""``θ ← argmax H̃_t(θ)`` by ``inner_steps`` iterations of ``inner_optimizer`` (``lbfgs``,
    ``adam``, ``sgd``) with step ``inner_lr``; ``δ = 1/lr`` per module (the group of its first
    parameter), ρ the feasibility weight (``ρ/s`` under a schedule ``s = lr/base_lr``). Whole calls are recorded (inputs and keyword inputs),
    and every rank's calls are evaluated separately, as each rank's forward pass saw them."""

    name = "emsa-iterative"
    module_rule = True
    record_type = IterativeState
    hyper = {
        "lr": StepSize(),
        "rho": Real(0.0, PENALTY_MAX, why=RHO_WHY),
        "inner_steps": Int(1),
        "inner_lr": Real(0.0, lo_open=True),
        "inner_optimizer": Choice(("adam", "sgd", "lbfgs")),
    }
    decay_key = "fallback_lr"

    def init_state(self, unit):
        return IterativeState()

    def describe(self, unit, group):
        return (f"iterative E-MSA ({self.value(group, 'inner_steps')} {self.value(group, 'inner_optimizer')} "
                f"iterations, rho {self.value(group, 'rho')})")

    def capture_spec(self, unit, member, group):
        return CaptureSpec(calls=True)

    def propose(self, unit, ctx):
        member = unit.members[0]
        module = member.module
        st = ctx.capture.pop(member.name)
        names = dict(module.named_parameters(recurse=False))
        own = {k: v for k, v in names.items() if any(v is p for p in unit.params)}
        grads = {k: ctx.grad(v) for k, v in own.items()}
        params = {k: v for k, v in own.items() if grads[k] is not None}
        if not params:
            return None
        group = ctx.group(unit.primary)
        eta = ctx.step_size(group, self.key("lr"))
        new_state = IterativeState(unit.state.step + 1)
        decays = {k: ctx.decay(v, self.decay_key) for k, v in params.items()}
        if eta == 0.0:
            return Proposal([Update(v, grads[k].mul(0.0), decay=decays[k]) for k, v in params.items()], new_state)
        samples = st.samples
        union = ctx.union_sizes(member.name, st)[0]
        if union == 0:
            if any(bool(g.any()) for g in (grads[k] for k in params)):
                raise RuntimeError(_no_states_message(member.name))
            return Proposal([Update(v, grads[k].mul(0.0), decay=decays[k]) for k, v in params.items()], new_state)
        theta_k = {k: v.detach() for k, v in params.items()}
        buffers = {k: v.detach().clone() for k, v in module.named_buffers(recurse=False)}
        scale = -float(samples) * ctx.costate_inv_scale
        calls = []
        for args, kwargs, g in st.calls:
            p = g * scale
            # one call per rank: a module such as BatchNorm must see each rank's batch on its own,
            # exactly as that rank's forward pass did (further tensor inputs stay local)
            xs = pdist.all_gather_parts(args[0], ctx.process_group)
            ps = pdist.all_gather_parts(p.contiguous(), ctx.process_group)
            calls += [(x_r, p_r, (args[1:], kwargs)) for x_r, p_r in zip(xs, ps)]

        def fn(theta, x, extra):
            rest, kwargs = extra
            return functional_call(module, {**theta, **buffers}, (x,) + tuple(rest), kwargs)

        with ctx.capture.paused():
            new = iterative_maximise(
                fn, theta_k, calls, union, ctx.scheduled_penalty(group, float(self.value(group, "rho"))), 1.0 / eta,
                int(self.value(group, "inner_steps")), float(self.value(group, "inner_lr")),
                self.value(group, "inner_optimizer"), ham_grad={k: -grads[k] for k in params},
            )
        return Proposal([Update(params[k], new[k] - theta_k[k], decay=decays[k]) for k in params], new_state)
