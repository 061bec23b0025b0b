r"""Discrete-weight MSA (Li & Hao, ICML 2018) as a torch optimizer: :class:`DiscreteMSA`.

A configuration of the shell: each discrete tensor (from :func:`pmptrain.discretize_`) gets the
discrete MSA rule (:class:`~pmptrain.optim.elementwise.DiscreteMSARule`), kept full-precision
``Linear``/``Conv`` layers the fallback or closed-form E-MSA, everything else the fallback.
:class:`GroupScheduler` schedules any param-group key (ρ, λ, the EMA rate).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..modules import adapter_for
from ..quant import ScaleParametrization, is_discrete_module
from .affine import AffineEMSARule
from .discrete_config import DiscreteConfig, DiscreteDiagnostics
from .elementwise import DiscreteMSARule, FallbackRule
from .hyper import Choice, Real

__all__ = ["DiscreteMSA", "GroupScheduler", "DiscreteDiagnostics"]

_ACC_INIT_MAX = 1e-6


class DiscreteMSA(DiscreteConfig):
    r"""Latent-free discrete-weight method of successive approximations (Li & Hao, ICML 2018).

    For every discrete weight tensor ``W`` (codes on a grid ``Q``, see
    :func:`pmptrain.quant.discretize_`) and every step, with ``g = −∇_W J`` the Hamiltonian gradient
    (from ``.grad``; docs/discrete.md) and ``s = lr/base_lr``:

    .. math::

        M &← a·M + (1−a)·g                                         \quad\text{(EMA, state "accumulator")}\\
        ρ_k &= (ρ/s) · \max\{|M_{ij}| : W_{ij} ∉ \arg\max_{q∈Q} [M_{ij} q − λ|q|]\}  \quad(0 \text{ if empty})\\
        W_{ij} &← \arg\max_{q∈Q}\ [M_{ij}q − λ|q| − \tfrac{ρ_k}{2}(q − W_{ij})^2]   \quad\text{(ties keep } W_{ij})

    Binary: ``W_ij`` flips iff ``−M_ij W_ij > ρ_k``; ρ = 0 flips every wrong sign, ρ ≥ 1 freezes.
    Ternary: λ ≥ 0 acts through the thresholds (sparsity). An empty wrong set leaves ``W`` unchanged.
    The binary and ternary grids use the fused rule :func:`pmptrain.discrete.discrete_msa_delta`
    (identical decisions, no host synchronisation); other grids the reference
    :func:`~pmptrain.discrete.penalty_scale` + :func:`~pmptrain.discrete.discrete_argmax`.

    ``lr`` is a pure schedule multiplier (default 1.0, so ``s = 1`` until a scheduler moves it): it
    divides the proximal weight ``ρ_k`` of the discrete step — exactly as ``δ = 1/lr`` is E-MSA's
    proximal weight — and multiplies every other step size (``fallback_lr``, ``emsa_lr``), so
    ``lr = 0`` freezes the whole model. With a relative ρ, ``s ≤ ρ`` already freezes binary codes.

    Every other parameter — BatchNorm affine, biases (also of discrete layers), trainable scales α,
    kept full-precision layers — takes the fallback step (Adam/SGD on ``−∇J``, i.e. ascent on H),
    or, with ``continuous="emsa"``, kept affine layers take the closed-form E-MSA step
    (step size ``emsa_lr·s``, ρ = ``emsa_rho/s``: that step scales exactly with ``s``).

    Args:
        model: the model (or its ``DistributedDataParallel`` wrapper) after ``discretize_``; it must
            hold at least one discrete tensor.
        params: optional parameters / param-group dicts (default: all trainable parameters, one
            group). Every key below may be set per group (schedules: :class:`GroupScheduler`, or
            assign ``group["rho"]`` directly).
        lr: schedule multiplier (default 1.0; see above).
        rho: ρ ≥ 0, the *relative* penalty (default 0.95, the recommended setting measured in
            docs/discrete.md §6; Li & Hao's binary value is 0.5 — :meth:`paper` — and their ternary
            ``ρ = 0.25`` with a full-square penalty is ρ = 0.5 here).
        decay: the EMA rate ``a ∈ [0, 1]`` (default 0.999).
        lam: λ ≥ 0, sparsity weight (default 0; the reference ternary runs use 1e-7). No effect on
            binary grids.
        decay_gamma: γ ∈ (0, 1]; :meth:`end_epoch` sets ``1−a ← max(γ(1−a), decay_floor)`` (default
            0.95, the reference protocol's on MNIST and SVHN; 0.98 on CIFAR-10; 1.0 keeps ``a``
            constant). Without calls to :meth:`end_epoch` ``a`` stays constant.
        decay_floor: lower bound of ``1−a`` in :meth:`end_epoch`, in [0, 1) (default 0.0).
        rho_scope: ``"tensor"`` (default, the reference: one ``ρ_k`` per tensor) or ``"channel"``
            (one per output row / filter). Measured on Fashion-MNIST: ``"channel"`` is worse.
        lam_mode: ``"absolute"`` (default, the reference) or ``"relative"`` (``λ_k = λ·max|M|``).
            Recommended ternary setting (docs/discrete.md §6): ``rho=0.95, lam=0.2,
            lam_mode="relative"``; binary ``rho=0.95`` on BatchNorm networks.
        wrong_set: the set ``ρ_k``'s maximum runs over: ``"hamiltonian"`` (default, the formula
            above) or ``"sign"`` (the reference code's ``W_ij ≠ sign(M_ij)``, which ignores λ;
            binary and ternary grids; identical ``ρ_k`` on binary grids). See
            :func:`pmptrain.discrete.penalty_scale`.
        acc_init: the magnitude of ``M_0``, in (0, 1e-6] (default 1e-12).
        acc_init_mode: ``"sign"`` (default): ``M_0 = acc_init·sgn(W)`` with ``sgn(0) = +1``, a
            tie-breaker only; ``"uniform"``: ``M_0 ~ U(−acc_init, acc_init)`` (the reference code
            with ``acc_init=1e-6``), seeded by ``acc_seed`` and each parameter's name
            (:func:`pmptrain.discrete.initial_accumulator`): the same on every rank, no draw from
            torch's global RNG, and stored in ``state_dict()`` like any accumulator.
        acc_seed: the seed of ``"uniform"`` (an int in [0, 2^31), default 0).
        continuous: ``"fallback"`` (default) or ``"emsa"`` — the rule of kept full-precision affine
            layers.
        emsa_lr, emsa_rho: step size (δ = 1/(emsa_lr·s)) and ρ of that E-MSA (defaults 1.0, 1.0).
        fallback, fallback_lr, betas, eps, momentum, weight_decay: the fallback step (defaults
            ``"adam"``, 1e-3, (0.9, 0.999), 1e-8, 0.9, 0), as in :class:`~pmptrain.EMSA`; weight
            decay does not apply to codes.
        exclude: non-discrete module names whose parameters take the fallback step.
        strict: raise instead of warning for modules without a rule.
        process_group, grad_scaler, shard_solves, shard_statistics: as in :class:`~pmptrain.EMSA`.

    Diagnostics: after each step ``opt.last_step["discrete"]`` is a :class:`DiscreteDiagnostics`
    (per-layer flip ratio, density, ρ_k, ``|M|`` mean/max, totals), converted lazily.

    Note:
        ``g`` is the gradient w.r.t. the *codes*; with a scale ``W_eff = α·codes`` it is
        ``α·∇_{W_eff}J``, the Hamiltonian gradient of the control the optimizer owns. Memory: one
        accumulator per discrete weight, no latent real weights.

    Reference: Q. Li, S. Hao, "An Optimal Control Approach to Deep Learning and Applications to
    Discrete-Weight Neural Networks", ICML 2018.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Optional[Iterable] = None,
        *,
        lr: float = 1.0,
        rho: float = 0.95,
        decay: float = 0.999,
        lam: float = 0.0,
        decay_gamma: float = 0.95,
        decay_floor: float = 0.0,
        rho_scope: str = "tensor",
        lam_mode: str = "absolute",
        wrong_set: str = "hamiltonian",
        acc_init: float = 1e-12,
        acc_init_mode: str = "sign",
        acc_seed: int = 0,
        continuous: str = "fallback",
        emsa_lr: float = 1.0,
        emsa_rho: float = 1.0,
        fallback: str = "adam",
        fallback_lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        exclude: Sequence[str] = (),
        strict: bool = False,
        process_group=None,
        grad_scaler=None,
        shard_solves: bool = True,
        shard_statistics: bool = True,
    ):
        self.continuous = Choice(("fallback", "emsa")).check("continuous", continuous)
        self.acc_init = float(Real(0.0, _ACC_INIT_MAX, lo_open=True).check("acc_init", acc_init))
        self._find_discrete(model)
        self._check_exclude(exclude)
        self._discrete_rule = DiscreteMSARule(self.acc_init, acc_init_mode=acc_init_mode, acc_seed=acc_seed)
        self._affine = AffineEMSARule(keys={"lr": "emsa_lr", "rho": "emsa_rho"})
        self._fallback = FallbackRule()
        defaults = dict(
            lr=lr, rho=rho, decay=decay, lam=lam, decay_gamma=decay_gamma, decay_floor=decay_floor,
            rho_scope=rho_scope, lam_mode=lam_mode, wrong_set=wrong_set, emsa_lr=emsa_lr, emsa_rho=emsa_rho,
            **AffineEMSARule.SOLVER_DEFAULTS,
            fallback=fallback, fallback_lr=fallback_lr, betas=betas, eps=eps, momentum=momentum,
            weight_decay=weight_decay,
        )
        self._extra_specs = {"decay_gamma": Real(0.0, 1.0, lo_open=True), "decay_floor": Real(0.0, 1.0, hi_open=True)}
        super().__init__(model, params, defaults, [self._discrete_rule, self._affine, self._fallback],
                         strict=strict, exclude=exclude, process_group=process_group, grad_scaler=grad_scaler,
                         shard_solves=shard_solves, shard_statistics=shard_statistics)

    def _validate_group(self, group):
        for key, spec in self._extra_specs.items():
            if key in group:
                spec.check(key, group[key])

    def _module_rule(self, name, module):
        own = list(module.parameters(recurse=False))
        if any(id(p) in self._discrete for p in own) or isinstance(module, ScaleParametrization):
            return None  # codes and trainable scales: parameter rules
        if is_discrete_module(module) or parametrize.is_parametrized(module, "weight"):
            return None  # a parametrized discrete layer: its own parameter is the bias
        adapter = adapter_for(module)
        if self.continuous == "emsa" and adapter is not None and adapter.kind == "matrix":
            return self._affine
        return None

    @classmethod
    def paper(cls, model: nn.Module, params: Optional[Iterable] = None, **overrides) -> "DiscreteMSA":
        r"""Li & Hao's reference setting (ICML 2018; the released notebooks, docs/discrete.md §3):
        ρ = 0.5, ``a = 0.999`` shrunk per epoch by γ = 0.95 (pass ``decay_gamma=0.98`` for their
        CIFAR-10 runs), ``M_0 ~ U(±1e-6)``. The values are :attr:`PAPER`; every keyword may be
        overridden (their ternary runs add ``lam=1e-7, wrong_set="sign"``). The defaults of
        :class:`DiscreteMSA` are the settings measured better since (ρ = 0.95, docs/discrete.md §6).

        note: before pmptrain 0.2 the defaults were ρ = 0.5 with a constant ``a``
        (``DiscreteMSA(model, rho=0.5, decay_gamma=1.0)``, the bench's ``binary-msa-paper``)."""
        kwargs = dict(cls.PAPER)
        kwargs.update(overrides)
        return cls(model, params, **kwargs)

    #: The reference configuration of :meth:`paper`.
    PAPER = dict(rho=0.5, decay=0.999, decay_gamma=0.95, acc_init=1e-6, acc_init_mode="uniform")

    def end_epoch(self) -> None:
        """The per-epoch EMA schedule of every group: ``1−a ← max(γ·(1−a), floor)`` with
        ``a = group["decay"]``, ``γ = group["decay_gamma"]``, ``floor = group["decay_floor"]``
        (a ``1−a`` already at or below the floor is kept). Call once at the end of every epoch."""
        for g in self.param_groups:
            one_minus = 1.0 - float(g["decay"])
            if one_minus > g["decay_floor"]:
                g["decay"] = 1.0 - max(g["decay_gamma"] * one_minus, g["decay_floor"])


class GroupScheduler:
    """Schedule any param-group key of an optimizer per epoch: ``group[key] = fn(epoch, base)``.

    ``base`` is the group's value when the scheduler was built; ``step()`` (call once per epoch,
    after the epoch) advances ``epoch`` by one and writes the new values. Works for ``"rho"``,
    ``"lam"``, ``"decay"`` of :class:`DiscreteMSA` (or any key of any optimizer). ``state_dict()`` /
    ``load_state_dict()`` hold ``epoch`` and the bases (``fn`` is code, not state).

    Example: ``GroupScheduler(opt, "rho", lambda e, r0: min(1.0, r0 * 1.1 ** e))``; the per-epoch
    EMA schedule of the reference protocol is ``opt.end_epoch()`` (or, in closed form,
    ``GroupScheduler(opt, "decay", lambda e, a0: 1 - max((1 - a0) * 0.95 ** e, floor))``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, key: str, fn: Callable[[int, Any], Any]):
        if not callable(fn):
            raise ValueError(f"fn: must be callable, got {fn!r}")
        missing = [i for i, g in enumerate(optimizer.param_groups) if key not in g]
        if missing:
            raise ValueError(f"key: {key!r} is not a key of param groups {missing}")
        self.optimizer, self.key, self.fn = optimizer, key, fn
        self.base = [g[key] for g in optimizer.param_groups]
        self.epoch = 0

    def step(self) -> None:
        self.epoch += 1
        for g, b in zip(self.optimizer.param_groups, self.base):
            g[self.key] = self.fn(self.epoch, b)

    def state_dict(self) -> Dict[str, Any]:
        return {"key": self.key, "epoch": self.epoch, "base": list(self.base)}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        if sd.get("key") != self.key:
            raise ValueError(f"state_dict: schedules key {sd.get('key')!r}, this scheduler {self.key!r}")
        self.epoch, self.base = int(sd["epoch"]), list(sd["base"])
