r"""Iterative E-MSA: an inner optimiser on the augmented Hamiltonian of any module.

The reference approach of Li, Chen, Tai & E (JMLR 2018): for every module with parameters, a few
iterations of L-BFGS (or Adam/SGD) on ``H̃_t`` evaluated from the recorded calls with
``torch.func.functional_call`` (:func:`pmptrain.hamiltonian.iterative_maximise`). The linear term of
H at θ_k is the user's gradient ``−.grad``; the recorded costates supply the Hamiltonian's curvature
and the two feasibility penalties (docs/algorithms.md §3).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch.func import functional_call

from .. import distributed as pdist
from ..capture import CaptureSpec
from ..hamiltonian import iterative_maximise
from .affine import _no_states_message, describe_penalties, penalty_bases
from .hyper import PENALTY_MAX, RHO_WHY, Choice, Flag, Int, Maybe, Real, StepSize
from .rule import Proposal, Rule, Update

__all__ = ["IterativeEMSARule", "IterativeState", "perturb_seed"]


@dataclass
class IterativeState:
    step: int = 0


class IterativeEMSARule(Rule):
    r"""``θ ← argmax H̃_t(θ)`` by ``inner_steps`` iterations of ``inner_optimizer`` (``lbfgs``,
    ``adam``, ``sgd``) with step ``inner_lr``; ``δ = 1/lr`` per module (the group of its first
    parameter; ``proximal=False``: δ = 0, L-BFGS only), the feasibility weights ``ρ_x`` / ``ρ_p``
    (``rho_state`` / ``rho_costate``, each ``rho`` when None; ``penalty_units="sum"``: ``ρ_x·B`` and
    ``ρ_p/B``; both ``/s`` under a schedule ``s = lr/base_lr``), ``l2`` = λ of ``−(λ/2)‖θ‖²`` in H
    (not scheduled: it is part of the objective), and the inner start ``θ_k + a·U(−1, 1)`` with
    ``a = perturb_init`` (default 0: θ_k), drawn from a generator seeded by ``perturb_seed``, the
    unit's name and its step count (deterministic, and the same after a checkpoint resume).

    A unit is a module with parameters, or a controlled block (``EMSA(blocks=...)``): the whole
    block, activation and residual included, is the controlled function ``f_t(x, θ)`` of every
    parameter inside it. Whole calls are recorded (inputs and keyword inputs), and every rank's
    calls are evaluated separately, as each rank's forward pass saw them."""

    name = "emsa-iterative"
    module_rule = True
    record_type = IterativeState
    hyper = {
        "lr": StepSize(),
        "rho": Real(0.0, PENALTY_MAX, why=RHO_WHY),
        "rho_state": Maybe(Real(0.0, PENALTY_MAX, why=RHO_WHY)),
        "rho_costate": Maybe(Real(0.0, PENALTY_MAX, why=RHO_WHY)),
        "penalty_units": Choice(("mean", "sum")),
        "proximal": Flag(),
        "l2": Real(0.0, PENALTY_MAX, why="the L2 weight must stay finite"),
        "perturb_init": Real(0.0, PENALTY_MAX, why="the perturbation must stay finite"),
        "perturb_seed": Int(0),
        "inner_steps": Int(1),
        "inner_lr": Real(0.0, lo_open=True),
        "inner_optimizer": Choice(("adam", "sgd", "lbfgs")),
        "inner_max_eval": Maybe(Int(1)),
    }
    decay_key = "fallback_lr"

    def init_state(self, unit):
        return IterativeState()

    def describe(self, unit, group):
        parts = [f"{self.value(group, 'inner_steps')} {self.value(group, 'inner_optimizer')} iterations",
                 describe_penalties(self, group)]
        if not self.value(group, "proximal"):
            parts.append("no proximal term")
        if float(self.value(group, "l2")) > 0.0:
            parts.append(f"L2 {float(self.value(group, 'l2')):g} in H")
        if float(self.value(group, "perturb_init")) > 0.0:
            parts.append(f"start perturbed by {float(self.value(group, 'perturb_init')):g}")
        return f"iterative E-MSA ({', '.join(parts)})"

    def capture_spec(self, unit, member, group):
        return CaptureSpec(calls=True)

    def propose(self, unit, ctx):
        member = unit.members[0]
        module = member.module
        st = ctx.capture.pop(member.name)
        names = dict(module.named_parameters())  # recursive: a controlled block's unit holds its submodules
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
        buffers = {k: v.detach().clone() for k, v in module.named_buffers()}
        scale = -float(samples) * ctx.costate_inv_scale
        calls = []
        for args, kwargs, g in st.calls:
            p = g * scale
            # one call per rank: a module such as BatchNorm must see each rank's batch on its own,
            # exactly as that rank's forward pass did (further tensor inputs stay local)
            xs = pdist.all_gather_parts(args[0], ctx.process_group)
            ps = pdist.all_gather_parts(p.contiguous(), ctx.process_group)
            calls += [(x_r, p_r, (args[1:], kwargs)) for x_r, p_r in zip(xs, ps)]
        if not ctx.solves(unit):  # solve sharding: the owner rank solves, the shell shares its result
            return ctx.deferred(unit)

        def fn(theta, x, extra):
            rest, kwargs = extra
            return functional_call(module, {**theta, **buffers}, (x,) + tuple(rest), kwargs)

        rho_x, rho_p = penalty_bases(self, group)
        if self.value(group, "penalty_units") == "sum":
            rho_x, rho_p = rho_x * union, rho_p / union
        rho_x, rho_p = ctx.scheduled_penalty(group, rho_x), ctx.scheduled_penalty(group, rho_p)
        delta = 1.0 / eta if self.value(group, "proximal") else 0.0
        start = None
        a = float(self.value(group, "perturb_init"))
        if a > 0.0:
            gen = torch.Generator().manual_seed(perturb_seed(int(self.value(group, "perturb_seed")), unit.name,
                                                             unit.state.step))
            # drawn on the CPU (the same draw on every device), then moved to the parameter
            start = {k: v + a * (2.0 * torch.rand(v.shape, generator=gen, dtype=torch.float64,
                                                  device="cpu") - 1.0).to(v)
                     for k, v in theta_k.items()}
        with ctx.capture.paused():
            new = iterative_maximise(
                fn, theta_k, calls, union, rho_x, delta,
                int(self.value(group, "inner_steps")), float(self.value(group, "inner_lr")),
                self.value(group, "inner_optimizer"), ham_grad={k: -grads[k] for k in params},
                rho_costate=rho_p, l2=float(self.value(group, "l2")), theta_init=start,
                max_eval=self.value(group, "inner_max_eval"),
            )
        return Proposal([Update(params[k], new[k] - theta_k[k], decay=decays[k]) for k in params], new_state)


def perturb_seed(seed: int, unit: str, step: int) -> int:
    """The seed of the inner start's perturbation of ``unit`` at its ``step``-th step (0-based):
    a function of the three only, so a run is reproducible and resumes identically."""
    return (int(seed) * 1_000_003 + zlib.crc32(unit.encode()) * 7919 + int(step)) % (2 ** 63)
