"""The pieces the optimizer shell combines: rules, the units they own, and what one step proposes.

* A :class:`Rule` is one update law — closed-form E-MSA, iterative E-MSA, discrete MSA, latent sign
  (BinaryConnect), TWN, Bop, the Adam/SGD fallback. It declares the param-group keys it reads
  (:attr:`Rule.hyper`, each with its :class:`~pmptrain.optim.hyper.Spec`), what it needs captured
  from its modules' calls (:meth:`Rule.capture_spec`), the typed record of its state
  (:meth:`Rule.init_state`) and, per step, a :class:`Proposal` computed from the gradients, the
  captured statistics and its state (:meth:`Rule.propose`) — without modifying anything. The
  mathematics it runs are the pure functions of :mod:`pmptrain.hamiltonian`,
  :mod:`pmptrain.discrete` and :mod:`pmptrain.fallback`.
* A :class:`Unit` is what one rule instance updates jointly: one module's parameters, the modules
  sharing a tied weight, or a single parameter. Its state is one record, shown to torch tools as
  the per-parameter state of the unit's primary parameter (``optimizer.state[p]``,
  :func:`record_view`; ``state_dict()["state"]`` under that parameter's index).
* A :class:`StepContext` hands rules the unscaled gradients, each parameter's group, the step-size
  scale ``lr / base_lr`` that schedules reach every rule through, and the capture.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .hyper import Spec

__all__ = [
    "Rule",
    "Unit",
    "Member",
    "Update",
    "Proposal",
    "StepContext",
    "record_to_dict",
    "record_from_dict",
    "record_view",
    "record_from_view",
    "clone_state",
    "cast_state",
    "compute_dtype",
]


@dataclass
class Member:
    """One module of a module-rule unit: its qualified ``name``, the ``module``, its ``adapter``
    (:mod:`pmptrain.modules`, None for the iterative rule), and its trainable ``weight`` / ``bias``
    (None when absent or not in any param group)."""

    name: str
    module: nn.Module
    adapter: Any
    weight: Optional[Tensor]
    bias: Optional[Tensor]

    @property
    def sentinel(self) -> Optional[Tensor]:
        """The parameter whose ``.grad`` tells the capture when the module's gradient was reset."""
        return self.weight if self.weight is not None else self.bias


@dataclass
class Unit:
    """What one rule updates jointly. ``params``/``param_names``: every parameter it updates;
    ``members``: its modules (empty for parameter rules); ``state``: the rule's record; ``meta``:
    what the configuration attached (the :class:`~pmptrain.quant.DiscreteTensor` of a discrete
    weight); ``scratch``: buffers a rule reuses between steps (not state: a copy or a pickle of the
    optimizer starts without them)."""

    name: str
    rule: "Rule"
    params: List[Tensor]
    param_names: List[str]
    members: List[Member] = field(default_factory=list)
    state: Any = None
    meta: Dict[str, Any] = field(default_factory=dict)
    scratch: Dict[str, Tensor] = field(default_factory=dict)

    def __getstate__(self) -> Dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "scratch"}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.scratch = {}

    @property
    def primary(self) -> Tensor:
        """The parameter whose group holds the unit's module-level hyper-parameters (ρ, route, …)."""
        return self.params[0]


@dataclass
class Update:
    """A change of one parameter: ``θ ← (1 − decay)·θ + alpha·delta``, or ``θ ← value`` (exact
    codes of a discrete weight). ``decay`` is the decoupled weight decay ``η·λ`` of the step."""

    param: Tensor
    delta: Optional[Tensor] = None
    alpha: float = 1.0
    value: Optional[Tensor] = None
    decay: float = 0.0

    def change(self) -> Tensor:
        """``Δθ`` without the decay (for the finiteness check and the Hamiltonian gain)."""
        if self.value is not None:
            return self.value - self.param.detach()
        return self.delta if self.alpha == 1.0 else self.delta * self.alpha


@dataclass
class Proposal:
    """What a rule proposes for one unit in one step: the updates, the new state record
    (committed only if the whole step is accepted) and optional diagnostics."""

    updates: List[Update]
    state: Any = None
    info: Optional[Dict[str, Any]] = None


class StepContext:
    """What the shell hands to every rule in one step.

    Attributes:
        costate_inv_scale: 1/loss-scale of the captured output gradients under GradScaler (``.grad``
            itself is unscaled by ``scaler.step`` / ``scaler.unscale_`` before ``step()`` runs).
        capture: the :class:`~pmptrain.capture.ModuleCapture`; process_group / world: distributed.
        sizes: with ``world > 1``, ``{member name: (samples, rows)}`` summed over the ranks (gathered
            by the shell before the step; None in one process).
        owners: with solve sharding, ``{unit name: owner rank}`` (:mod:`pmptrain.optim.solve_shard`;
            None: every rank solves every unit).
        grad_sq: ``{id(p): (‖.grad_p‖² or None, ‖∇J_p‖²)}``, the second of the union batch's gradient
            at the end of the backward pass, for the parameters whose gradients DDP or FSDP2
            averaged there (set by the shell with several ranks or FSDP2's stand-ins; the first is
            None where it is read from ``.grad``; None with several ranks: unknown — pmptrain
            averages the gradients in ``step()``, after the loop edited each rank's own). One
            process without FSDP2 reads the capture's records.

    Module rules call ``if not ctx.solves(unit): return ctx.deferred(unit)`` right after their
    statistics' collectives and before their solve: every rank takes part in the collectives, only
    the owner solves, and the shell hands the owner's proposal to every rank.
    """

    def __init__(self, groups: Mapping[int, Dict[str, Any]], costate_inv_scale: float, capture, process_group,
                 world: int, sizes: Optional[Dict[str, Tuple[int, int]]] = None):
        self._groups = groups
        self.costate_inv_scale = costate_inv_scale
        self.capture = capture
        self.process_group = process_group
        self.world = world
        self.sizes = sizes
        self._grads: Dict[int, Optional[Tensor]] = {}
        self._linear: Dict[int, Tensor] = {}
        self.owners: Optional[Dict[str, int]] = None
        self.me = 0
        self.asked: List[str] = []  # units that reached their solve (in order): their results are exchanged
        self.grad_sq: Optional[Dict[int, Tensor]] = None

    def solves(self, unit: Unit) -> bool:
        """Whether this rank solves ``unit`` (always without solve sharding). Called by a module rule
        after its collectives, right before its solve; records that the unit's result is exchanged."""
        if self.owners is None:
            return True
        self.asked.append(unit.name)
        return self.owners.get(unit.name, self.me) == self.me

    def deferred(self, unit: Unit):
        """The placeholder a non-owner returns from ``propose``: the owner's proposal replaces it."""
        from .solve_shard import Deferred
        return Deferred(unit.name)

    def group(self, p: Tensor) -> Dict[str, Any]:
        return self._groups[id(p)]

    def union_sizes(self, member: str, stats) -> Tuple[int, int]:
        """``(B, N)`` of ``member`` summed over the ranks (``stats``: this rank's
        :class:`~pmptrain.capture.ModuleStats`)."""
        if self.world == 1:
            return stats.samples, stats.rows
        return self.sizes[member]

    def grad(self, p: Optional[Tensor]) -> Optional[Tensor]:
        """The gradient in the linear term of the step of ``p``: ``∇J`` as the user left it in
        ``.grad`` (None without a gradient) or, for a closed-form unit with ``grad_decay > 0``, its
        running average (:meth:`set_linear_term`)."""
        if p is not None and id(p) in self._linear:
            return self._linear[id(p)]
        return self.user_grad(p)

    def grad_rescale(self, params) -> Optional[Tensor]:
        """``c`` with ``.grad = c·∇J`` for ``params`` — the factor by which the loop rescaled the
        gradients after the backward pass (``clip_grad_norm_``; GradScaler's unscaling is taken
        out), as the least-squares ratio ``√(Σ‖.grad‖² / Σ‖∇J_backward‖²)`` times the loss scale: a 0-dim
        device tensor (1 where nothing was recorded as non-zero), or None when it is unknown (no
        record; several ranks without :attr:`grad_sq`: pmptrain averaged the gradients after the
        loop edited them). ``∇J_backward`` is the gradient at the end of the backward pass — under
        DDP and FSDP2 the ranks' average (:attr:`grad_sq`), as one process's on the union batch."""
        refs = self.grad_sq
        if self.world > 1 and refs is None:
            return None
        now, then = [], []
        for p in params:
            if p is None:
                continue
            sq, ref = refs.get(id(p), (None, None)) if refs is not None else (None, self.capture.grad_sq(p))
            g = self.user_grad(p) if sq is None else None
            if ref is None or (sq is None and g is None):
                continue
            if sq is None:
                sq = (g.abs().square() if g.is_complex() else g.square()).sum()
            dtype = ref.dtype if refs is None else torch.float64  # (the ranks' sums are float64)
            now.append(sq.to(dtype))
            then.append(ref.to(dtype))
        if not then:
            return None
        num, den = torch.stack(now).sum(), torch.stack(then).sum()
        ratio = torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.ones_like(den)).sqrt()
        return ratio / self.costate_inv_scale

    def set_linear_term(self, p: Tensor, g: Tensor) -> None:
        """Make :meth:`grad` of ``p`` return ``g`` for the rest of the step (the running average of
        the gradient that a closed-form rule with ``grad_decay > 0`` maximises against)."""
        self._linear[id(p)] = g

    def user_grad(self, p: Optional[Tensor]) -> Optional[Tensor]:
        """``∇J`` of ``p`` as the user left it in ``.grad`` (None without a gradient)."""
        if p is None or p.grad is None:
            return None
        key = id(p)
        if key not in self._grads:
            g = p.grad
            if g.is_sparse:
                raise RuntimeError("pmptrain optimizers do not support sparse gradients")
            self._grads[key] = g
        return self._grads[key]

    @staticmethod
    def lr_scale(group: Dict[str, Any]) -> float:
        """``s = lr / base_lr``: how far a scheduler (or the user) moved ``lr`` from ``base_lr``, the
        group's ``lr`` when the group was created. (Not torch's ``initial_lr``: ``OneCycleLR``
        overwrites that with ``max_lr/div_factor``.) ``s = 0`` iff ``lr = 0``; a group created
        with ``lr = 0`` has ``s = 1`` once ``lr > 0``."""
        lr = float(group["lr"])
        init = float(group.get("base_lr", lr))
        if lr == 0.0:
            return 0.0
        return lr / init if init != 0.0 else 1.0

    def scheduled_penalty(self, group: Dict[str, Any], weight: float) -> float:
        """A penalty weight under the schedule: ``weight/s`` (``s = lr/base_lr``; unchanged while
        ``s = 0``, when every step size is 0). With ``δ = 1/η`` and ``η = s·η₀`` every term of the
        augmented Hamiltonian but the linear one scales with ``1/s``, so a quadratic maximiser
        is exactly ``s`` times its value at ``s = 1``: a schedule scales E-MSA's step as it scales
        SGD's, whichever penalty dominates."""
        s = self.lr_scale(group)
        return weight / s if s > 0.0 else weight

    def step_size(self, group: Dict[str, Any], key: str) -> float:
        """The step size stored under ``key``: ``group["lr"]`` itself for ``key == "lr"``, else
        ``group[key] · lr/base_lr`` (so every schedule of ``lr`` reaches every rule)."""
        if key == "lr":
            return float(group["lr"])
        return float(group[key]) * self.lr_scale(group)

    def decay(self, p: Tensor, step_key: str) -> float:
        """Decoupled weight decay of ``p`` this step: ``η·λ`` with ``λ = group["weight_decay"]`` and
        ``η`` the step size under ``step_key`` (see docs/algorithms.md, "Weight decay")."""
        group = self.group(p)
        wd = float(group.get("weight_decay", 0.0))
        return wd * self.step_size(group, step_key) if wd else 0.0


class Rule:
    """Base class of an update law (see the module docstring).

    Subclasses set :attr:`name`, :attr:`hyper` (``{canonical key: Spec}``) and implement
    :meth:`init_state` and :meth:`propose`; module rules (which need the module, not only its
    parameters) set :attr:`module_rule` and implement :meth:`capture_spec`. ``keys`` renames
    canonical keys to the group keys a configuration uses (``DiscreteMSA`` stores the ρ of its
    E-MSA rule as ``"emsa_rho"``, because its ``"rho"`` is the discrete rule's).
    """

    name: ClassVar[str] = "rule"
    hyper: ClassVar[Dict[str, Spec]] = {}
    #: the dataclass of the state record (None: stateless)
    record_type: ClassVar[Optional[type]] = None
    module_rule: ClassVar[bool] = False
    #: module rule that works through an adapter of :mod:`pmptrain.modules` (its kinds: below)
    adapter_kinds: ClassVar[Tuple[str, ...]] = ()
    #: can maximise several modules sharing one weight jointly
    affine: ClassVar[bool] = False
    #: the group key whose step size scales the decoupled weight decay (None: no weight decay)
    decay_key: Optional[str] = None

    def __init__(self, keys: Optional[Mapping[str, str]] = None):
        keys = dict(keys or {})
        unknown = set(keys) - set(self.hyper) - ({self.decay_key} if self.decay_key else set())
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown hyper-parameters to rename: {sorted(unknown)}")
        self.keys = {k: keys.get(k, k) for k in self.hyper}
        if self.decay_key is not None:
            self.decay_key = keys.get(self.decay_key, self.decay_key)

    def key(self, canonical: str) -> str:
        return self.keys[canonical]

    def value(self, group: Dict[str, Any], canonical: str):
        return group[self.keys[canonical]]

    def group_specs(self) -> Dict[str, Spec]:
        """``{group key: Spec}`` of everything this rule reads."""
        return {self.keys[k]: s for k, s in self.hyper.items()}

    # ------------------------------------------------------------------ interface
    def capture_spec(self, unit: Unit, member: Member, group: Dict[str, Any]):
        """The :class:`~pmptrain.capture.CaptureSpec` for ``member`` (None: gradients only)."""
        return None

    def init_state(self, unit: Unit) -> Any:
        """The initial state record of ``unit`` (created when the unit is created)."""
        return None

    def bind(self, unit: Unit, group: Dict[str, Any]) -> None:
        """Called once when the unit is created, after :meth:`init_state` (rules whose definition
        writes the weights at construction, e.g. TWN's ``α·t``)."""

    def restore(self, unit: Unit, group: Dict[str, Any]) -> None:
        """Called after ``load_state_dict`` replaced the unit's state: rules whose weights are a
        function of their state (latent baselines) rewrite them from it."""

    def proposal(self, unit: Unit, ctx: StepContext) -> Optional[Proposal]:
        """What the shell calls for every unit and step: :meth:`propose` (rules that keep state
        around their proposal, such as a running average of the gradient, override this)."""
        return self.propose(unit, ctx)

    def propose(self, unit: Unit, ctx: StepContext) -> Optional[Proposal]:
        raise NotImplementedError

    def describe(self, unit: Unit, group: Dict[str, Any]) -> str:
        """One line for :meth:`~pmptrain.optim.shell.PMPOptimizer.rule_table`."""
        return self.name

    # ------------------------------------------------------------------ serialisation
    def state_to_dict(self, state: Any) -> Any:
        return record_to_dict(state)

    def state_from_dict(self, data: Any, unit: Unit) -> Any:
        if data is None or self.record_type is None:
            return None
        return record_from_dict(self.record_type, data, unit.primary.device)


def _clone(v):
    if isinstance(v, Tensor):
        return v.detach().clone()
    if isinstance(v, dict):
        return {k: _clone(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_clone(x) for x in v)
    if dataclasses.is_dataclass(v):
        return {"__record__": type(v).__name__, **record_to_dict(v)}
    return v


def clone_state(value: Any) -> Any:
    """A copy of a state entry (nested dicts, lists and tuples of tensors and numbers): what
    ``state_dict()`` returns, a snapshot that later steps do not change."""
    return _clone(value)


def record_to_dict(rec: Any) -> Any:
    """A typed state record as plain data (dicts, lists, tensors, numbers): what ``torch.load``
    with ``weights_only=True`` reads back."""
    if rec is None:
        return None
    if not dataclasses.is_dataclass(rec):
        raise TypeError(f"state records must be dataclasses, got {type(rec).__name__}")
    return {f.name: _clone(getattr(rec, f.name)) for f in dataclasses.fields(rec)}


def _restore(v, device, types: Dict[str, type], copy: bool = True):
    if isinstance(v, Tensor):
        return v.detach().to(device).clone() if copy else v
    if isinstance(v, dict):
        if "__record__" in v:
            cls = types[v["__record__"]]
            return record_from_dict(cls, {k: x for k, x in v.items() if k != "__record__"}, device, types, copy)
        return {k: _restore(x, device, types, copy) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_restore(x, device, types, copy) for x in v)
    return v


def record_from_dict(cls: type, data: Dict[str, Any], device, types: Optional[Dict[str, type]] = None,
                     copy: bool = True) -> Any:
    """Rebuild a record of type ``cls`` from :func:`record_to_dict` (or :func:`record_view`)
    output; tensors are copied to ``device`` (``copy=False``: the same tensor objects, ``device``
    ignored). A top-level ``step`` given as a tensor becomes the record's int. ``types`` names the
    record types that may be nested inside (default: the fields' declared types are not inspected,
    so nested records must be listed)."""
    names = {f.name for f in dataclasses.fields(cls)}
    defaults = {f.name for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    if set(data) - names or names - set(data) - defaults:  # a field added later (with a default) may be absent
        raise ValueError(
            f"state record {cls.__name__}: expected fields {sorted(names)}, got {sorted(data)}"
        )
    types = dict(types or {})
    types.update(getattr(cls, "_nested", {}))
    out = {k: _restore(v, device, types, copy) for k, v in data.items()}
    if isinstance(out.get("step"), Tensor):
        out["step"] = int(out["step"])
    return cls(**out)


def _share(v):
    if dataclasses.is_dataclass(v):
        return {"__record__": type(v).__name__, **{f.name: _share(getattr(v, f.name)) for f in dataclasses.fields(v)}}
    if isinstance(v, dict):
        return {k: _share(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):  # lists: torch.distributed.checkpoint walks lists, not tuples
        return [_share(x) for x in v]
    return v


def record_view(rec: Any) -> Dict[str, Any]:
    """A state record as the per-parameter dict torch tools expect in ``optimizer.state[p]``:
    ``{field: value}`` with the record's own tensors (not copies; nested records as dicts with a
    ``"__record__"`` name, as :func:`record_to_dict` writes them), and the step counter ``step``
    as a 0-dim int64 tensor on the CPU, as torch keeps ``state["step"]`` (exact for any count).
    Tuples (eigendecomposition pairs) become lists: ``torch.distributed.checkpoint`` saves the
    tensors inside lists, and pickles a tuple whole (and does not load it back)."""
    out = {f.name: _share(getattr(rec, f.name)) for f in dataclasses.fields(rec)}
    if isinstance(out.get("step"), int):
        out["step"] = torch.tensor(out["step"], dtype=torch.int64, device="cpu")
    return out


def record_from_view(cls: type, view: Dict[str, Any]) -> Any:
    """The record of type ``cls`` whose :func:`record_view` is ``view`` (the same tensor objects:
    what a tool put into ``optimizer.state[p]`` — moved to another device, say — is what the next
    step uses)."""
    return record_from_dict(cls, view, None, copy=False)


def compute_dtype(p: Tensor) -> torch.dtype:
    """The dtype a rule computes and keeps its floating state in for parameter ``p``: the
    parameter's own, but float32 for float16/bfloat16 parameters (Adam's ``ε = 1e-8`` is 0 in
    float16 and ``g²`` underflows, which made every step 0/0 — non-finite, so skipped — for ever;
    the closed forms solve in float32 for the same reason)."""
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


def cast_state(value: Any, like: Any, param: Tensor, key: Optional[str] = None) -> Any:
    """``value`` (a loaded state entry: nested dicts, lists, tensors) on ``param``'s device, each
    tensor cast as torch's ``load_state_dict`` casts optimizer state: a floating tensor to the
    dtype this optimizer keeps it in — that of the tensor at the same place in ``like`` (the
    optimizer's current state), else :func:`compute_dtype` of ``param`` (the parameter's dtype;
    float32 for a float16/bfloat16 parameter) —, a complex tensor of a complex parameter to the
    parameter's dtype; integer tensors keep their dtype, and ``step`` counters are left as they
    are (torch does not cast them either)."""
    if isinstance(value, Tensor):
        if key == "step":
            return value
        dtype = value.dtype
        if value.is_floating_point():
            if isinstance(like, Tensor) and like.is_floating_point():
                dtype = like.dtype
            elif param.is_floating_point():
                dtype = compute_dtype(param)
        elif value.is_complex() and param.is_complex():
            dtype = param.dtype
        return value.to(device=param.device, dtype=dtype)
    if isinstance(value, dict):
        return {k: cast_state(v, like.get(k) if isinstance(like, dict) else None, param, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        same = isinstance(like, (list, tuple)) and len(like) == len(value)
        return type(value)(cast_state(v, like[i] if same else None, param) for i, v in enumerate(value))
    return value
