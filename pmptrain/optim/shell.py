r"""The one optimizer shell: the torch.optim contract around per-module rules.

:class:`PMPOptimizer` walks the model, assigns a :class:`~pmptrain.optim.rule.Rule` to every module
(closed-form E-MSA, iterative E-MSA) or parameter (discrete MSA, latent sign, TWN, Bop, the Adam/SGD
fallback) — optax's ``partition``, larq's ``CaseOptimizer`` —, hooks the modules whose rules need
captured states, and runs every step as one transaction:

1. **gradients** — ``.grad`` as the user left it (clipped, accumulated, edited), unscaled under
   ``GradScaler``; with several ranks, first one all-gather checks that every rank ran the same
   modules (:mod:`pmptrain.optim.ranks`), then for unwrapped models the ranks' gradients are
   averaged weighted by their batch sizes;
2. **propose** — every rule computes its units' updates and new state records from the gradients and
   the statistics captured since the last ``zero_grad()``, modifying nothing;
3. **check** — one reduction over ``⟨∇J, Δθ⟩`` of every update (a NaN/Inf in a loss, gradient,
   statistic or update makes it non-finite): if anything is non-finite, nothing changes and the skip
   is counted (so is a zero-size batch, before any rule runs; a run of ``SKIP_WARN_AFTER``
   skipped steps warns);
4. **apply** — ``θ ← (1 − ηλ)θ + Δθ`` (decoupled weight decay), or the exact new codes;
5. **commit** — the new state records replace the old ones.

Configurations (:class:`~pmptrain.EMSA`, :class:`~pmptrain.MSA`, :class:`~pmptrain.DiscreteMSA`,
:class:`~pmptrain.BinaryConnect`, :class:`~pmptrain.TWN`, :class:`~pmptrain.Bop`) only choose the
rules and their default hyper-parameters.

State is keyed by unit name (module or parameter names) in ``state_dict()["pmptrain"]``, as plain
data that ``torch.load(..., weights_only=True)`` reads. Hooks are removed with :meth:`detach`, when the
optimizer is garbage-collected, or when another pmptrain optimizer hooks the same modules.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import distributed as pdist
from .._profile import phase
from ..capture import ModuleCapture
from ..modules import adapter_for
from . import ranks
from .hyper import PENALTY_MAX, Real, Spec
from .rule import Member, Proposal, Rule, StepContext, Unit
from .sharded import ShardedStep, has_sharded_params
from .solve_shard import Deferred, SolveFailure, assign_owners, exchange

__all__ = ["PMPOptimizer", "StepInfo", "Unsupported", "unwrap_model"]

_FORMAT = 2


class StepInfo(dict):
    """Diagnostics of the last step (a dict, for logging).

    Keys: ``skipped`` (bool), ``skip_reason`` (str or None: ``"non-finite loss"``, ``"non-finite
    gradient"``, ``"non-finite statistics or update in …"``, ``"empty batch (zero samples)"``), ``controlled`` (module units updated by
    their maximiser), ``fallback`` (parameters updated by the fallback), ``hamiltonian_gain``
    (``Σ −⟨∇J, Δθ⟩`` over every rule update, decay excluded: the first-order gain of H); discrete
    configurations add ``"discrete"`` (:class:`~pmptrain.optim.discrete_msa.DiscreteDiagnostics`).

    Loggers read :meth:`scalars`, the declared per-step scalars (:attr:`SCALARS`), rather than
    probing keys.
    """

    #: The scalar diagnostics :meth:`scalars` may return, in this order.
    SCALARS: Tuple[str, ...] = ("hamiltonian_gain", "flip_ratio", "density")

    def scalars(self) -> Dict[str, float]:
        """The step's scalar diagnostics as floats, a subset of :attr:`SCALARS`:
        ``hamiltonian_gain`` for every step taken; ``flip_ratio`` (codes changed / codes updated)
        and ``density`` (non-zero fraction of the updated codes) when discrete tensors were updated.
        Empty for a skipped step: a skipped step has no diagnostics to average."""
        if self.get("skipped", False):
            return {}
        out: Dict[str, float] = {}
        gain = self.get("hamiltonian_gain")
        if gain is not None:
            out["hamiltonian_gain"] = float(gain)
        disc = self.get("discrete")
        if disc is not None and disc["layers"]:
            total = disc["total"]
            out["flip_ratio"] = float(total["flip_ratio"])
            out["density"] = float(total["density"])
        return out


class RuleTable(list):
    """The rows of :meth:`PMPOptimizer.rule_table` (a list of dicts); ``print`` shows them as a table."""

    COLUMNS = ("unit", "rule", "params", "description")

    def __str__(self) -> str:
        cells = [[", ".join(r[c]) if c == "params" else str(r[c]) for c in self.COLUMNS] for r in self]
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(self.COLUMNS)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(self.COLUMNS, widths)).rstrip(),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
        return "\n".join(lines)


class Unsupported:
    """A module rule choice: the module has parameters but no rule (``reason`` says why); its
    parameters take the fallback step with a warning, or raise with ``strict=True``."""

    def __init__(self, reason: str):
        self.reason = reason


def unwrap_model(model: nn.Module) -> Tuple[nn.Module, bool]:
    """``(root, averaged_by_wrapper)``: the module inside DistributedDataParallel / DataParallel
    and ``torch.compile`` wrappers (the wrapper's gradients are averaged across ranks already)."""
    averaged = False
    while True:
        kind = type(model)
        if kind.__name__ == "DeepSpeedEngine" or kind.__module__.split(".")[0] == "deepspeed" or any(
                hasattr(p, "ds_id") for p in model.parameters()):
            raise TypeError(
                f"model is wrapped or partitioned by DeepSpeed ({kind.__name__}): its ZeRO stages partition "
                "parameters, gradients and optimizer state with their own optimizer wrapper, which pmptrain "
                "optimizers do not support. Use torch's FSDP2 (fully_shard) or DistributedDataParallel")
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module) and type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
            model, averaged = inner, True
            continue
        orig = getattr(model, "_orig_mod", None)
        if isinstance(orig, nn.Module) and type(model).__name__ == "OptimizedModule":
            model = orig
            continue
        return model, averaged


def _scaler_codes() -> set:
    """The code objects of ``step`` / ``_maybe_opt_step`` of GradScaler and its subclasses."""
    codes, todo = set(), [torch.amp.GradScaler]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        for name in ("step", "_maybe_opt_step"):
            fn = cls.__dict__.get(name)
            if fn is not None and hasattr(fn, "__code__"):
                codes.add(fn.__code__)
    return codes


def _calling_grad_scaler():
    """The ``torch.amp.GradScaler`` whose ``step()`` called ours (the loss scale of the captured
    costates), or None. Only frames running GradScaler's own code are inspected: reading the locals
    of any other frame would make CPython keep a snapshot of them alive."""
    codes = _scaler_codes()
    frame = sys._getframe(2)
    for _ in range(10):
        if frame is None:
            return None
        if frame.f_code in codes:
            obj = frame.f_locals.get("self")
            if isinstance(obj, torch.amp.GradScaler):
                return obj
        frame = frame.f_back
    return None


_SHELL_SPECS: Dict[str, Spec] = {
    "lr": Real(0.0, PENALTY_MAX, tensor_ok=True, why="the step lr*grad must stay finite"),
    "weight_decay": Real(0.0),
}


class PMPOptimizer(torch.optim.Optimizer):
    """The shell shared by every pmptrain optimizer (see the module docstring).

    Subclasses (configurations) pass ``defaults`` (every group key their rules read) and ``rules``
    (every rule instance they may assign), and implement :meth:`_module_rule` and
    :meth:`_param_rule`.

    Args:
        model: the ``nn.Module`` to train (or a DDP / ``torch.compile`` wrapper of it).
        params: parameters or param-group dicts (default: every parameter of the model that
            requires grad, one group). A module's weight and bias may sit in different groups.
        defaults, rules: from the configuration.
        strict: raise instead of warning when a module with parameters has no rule.
        exclude: module names whose parameters take the fallback step.
        process_group: ``torch.distributed`` group for unwrapped models (default: the world group
            when initialised); their gradients are averaged weighted by the ranks' batch sizes.
        grad_scaler: the ``torch.amp.GradScaler`` in use, when something other than
            ``scaler.step(opt)`` calls ``step()`` (the loss scale of the captured costates is read
            from it; default None: found from ``scaler.step``).
        shard_solves: with several ranks, each module unit's solve runs on one owner rank and the
            results are exchanged (:mod:`pmptrain.optim.solve_shard`; identical updates, solve
            time per rank ≈ 1/world). False: every rank solves every unit. No effect in one process.
    """

    # The standard GradScaler path (no ``_step_supports_amp_scaling``): ``scaler.step(opt)`` unscales
    # ``.grad`` (unless the loop already called ``scaler.unscale_(opt)``, e.g. to clip), skips the step
    # on inf/NaN and calls ``step()``; the loss scale of the captured costates is read from that
    # scaler (or ``grad_scaler=``). Lightning and accelerate refuse gradient clipping for optimizers
    # that declare ``_step_supports_amp_scaling``.

    def __init__(
        self,
        model: nn.Module,
        params: Optional[Iterable],
        defaults: Dict[str, Any],
        rules: Sequence[Rule],
        *,
        strict: bool = False,
        exclude: Sequence[str] = (),
        process_group=None,
        grad_scaler=None,
        shard_solves: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module (the optimizer hooks its modules), got {type(model).__name__}"
                + ("; pass the model itself, not model.parameters()" if not isinstance(model, dict) else "")
            )
        if not isinstance(strict, bool):
            raise TypeError(f"invalid strict={strict!r}: must be True or False")
        if not isinstance(shard_solves, bool):
            raise TypeError(f"invalid shard_solves={shard_solves!r}: must be True or False")
        self.shard_solves = shard_solves
        if isinstance(exclude, str) or not all(isinstance(n, str) for n in exclude):
            raise TypeError(f"invalid exclude={exclude!r}: must be a list of module names")
        self.model = model
        self.root, self._grads_averaged_by_wrapper = unwrap_model(model)
        # FSDP2 (parameters are DTensors): gradients arrive averaged over the ranks, as under DDP
        self._sharded = has_sharded_params(self.root.parameters())
        self._grads_averaged_by_wrapper = self._grads_averaged_by_wrapper or self._sharded
        for n, p in self.root.named_parameters():
            if pdist.is_sharded(p):
                pdist.check_placements(n, p)  # tensor/sequence parallel layouts are refused here
        self.process_group = process_group
        self.grad_scaler = grad_scaler
        self.strict = strict
        names = dict(self.root.named_modules())
        unknown = [n for n in exclude if n not in names]
        if unknown:
            raise ValueError(f"invalid exclude: modules {unknown} do not exist in the model")
        self._excluded = set(exclude)
        self._rules = list(rules)
        self._specs: Dict[str, Spec] = dict(_SHELL_SPECS)
        for r in self._rules:
            self._specs.update(r.group_specs())
        self.units: Dict[str, Unit] = OrderedDict()
        self.skipped_steps = 0
        self._skip_run = 0  # consecutive skipped steps (warned about at SKIP_WARN_AFTER)
        self.last_step = StepInfo(skipped=False)
        self._warned: set = set()
        self._attach_capture()
        if params is None:
            params = [p for p in self.root.parameters() if p.requires_grad]
        super().__init__(params, defaults)
        self._initialised = True
        self._partition()

    def _attach_capture(self) -> None:
        self.capture = ModuleCapture()
        self.capture.watch_root(self.root)  # tells a zero-size batch from a zero gradient
        self._finalizer = weakref.finalize(self, self.capture.remove, "the optimizer was garbage-collected")

    # ------------------------------------------------------------------ configuration interface
    def _module_rule(self, name: str, module: nn.Module):
        """The rule of ``module``: a module :class:`Rule`, None (its parameters get parameter
        rules), or :class:`Unsupported`."""
        raise NotImplementedError

    def _is_block(self, name: str, module: nn.Module) -> bool:
        """Whether ``module`` is one controlled block: one unit holding every parameter of the module
        and its submodules, whose submodules get no unit of their own (default: no block)."""
        return False

    def _param_rule(self, name: str, param: Tensor) -> Tuple[Rule, Dict[str, Any]]:
        """``(rule, meta)`` of a parameter no module rule took."""
        raise NotImplementedError

    def _validate_group(self, group: Dict[str, Any]) -> None:
        """Cross-key checks of a configuration (the per-key ones come from the rules' specs)."""

    # ------------------------------------------------------------------ groups and validation
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        lr = group["lr"]
        group.setdefault("base_lr", lr.clone() if isinstance(lr, Tensor) else lr)  # the reference of lr_scale
        if getattr(self, "_initialised", False):
            self._partition()

    def _check_group(self, group: Dict[str, Any]) -> None:
        for key, spec in self._specs.items():
            if key in group:
                group[key] = spec.check(key, group[key])
        self._validate_group(group)

    # ------------------------------------------------------------------ partition
    def _partition(self) -> None:
        """Assign rules to modules/parameters (at construction and after ``add_param_group``);
        existing units keep their state."""
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        pname: Dict[int, str] = {}
        for n, p in self.root.named_parameters(remove_duplicate=False):
            pname.setdefault(id(p), n)
        claims: Dict[str, Tuple[Rule, Member, List[Tensor]]] = OrderedDict()  # rule, member, its params
        owners: Dict[int, List[str]] = {}
        why: Dict[int, str] = {}  # why a parameter takes the fallback (for strict=True)
        excluded = set()
        blocks: List[str] = []  # names of the controlled blocks met so far (their descendants are skipped)
        for name, module in self.root.named_modules():
            if any(name.startswith(b + ".") for b in blocks):
                continue  # inside a controlled block: the block is the unit
            is_block = self._is_block(name, module)
            if is_block:
                blocks.append(name)
            own = [(n, p) for n, p in module.named_parameters(recurse=is_block) if id(p) in group_of]
            if not own:
                continue
            if name in self._excluded:
                excluded.update(id(p) for _, p in own)
                continue
            choice = self._module_rule(name, module)
            if isinstance(choice, Unsupported):
                self._unsupported(name, module, choice.reason)
                continue
            if not isinstance(choice, Rule):
                for _, p in own:
                    why.setdefault(id(p), f"module {name!r} ({type(module).__name__}) is trained by the fallback "
                                          f"in {type(self).__name__}")
                continue
            member = self._member(name, module, choice, dict(own))
            if member is None:
                reason = f"the weight of {name!r} ({type(module).__name__}) is frozen, so its other parameters " \
                         "cannot be maximised with it"
                self._warn_fallback(("frozen", name), reason)
                for _, p in own:
                    why.setdefault(id(p), reason)
                continue
            taken_by_rule = [p for p in (member.weight, member.bias) if p is not None] if choice.adapter_kinds \
                else [p for _, p in own]
            claims[name] = (choice, member, taken_by_rule)
            for p in taken_by_rule:
                owners.setdefault(id(p), []).append(name)
        # connected components of modules sharing parameters
        parent = {n: n for n in claims}

        def find(n):
            while parent[n] != n:
                parent[n] = parent[parent[n]]
                n = parent[n]
            return n

        for names in owners.values():
            for other in names[1:]:
                parent[find(other)] = find(names[0])
        comps: Dict[str, List[str]] = OrderedDict()
        for n in claims:
            comps.setdefault(find(n), []).append(n)
        new_units: Dict[str, Unit] = OrderedDict()
        taken = set()
        for names in comps.values():
            rule = claims[names[0]][0]
            members = [claims[n][1] for n in names]
            if len(names) > 1:
                reason = self._join_reason(rule, [claims[n][0] for n in names], members)
                if reason is not None:
                    self._warn_fallback(("tied",) + tuple(names), f"modules {names} share parameters (tied weights) "
                                        f"and cannot be maximised jointly: {reason}")
                    continue
            params, seen = [], set()
            for n in names:
                for p in claims[n][2]:
                    if id(p) not in seen:
                        seen.add(id(p))
                        params.append(p)
            uname = "+".join(names)
            new_units[uname] = Unit(uname, rule, params, [pname.get(id(p), uname) for p in params], members)
            taken |= seen
        for g in self.param_groups:
            for p in g["params"]:
                if id(p) in taken:
                    continue
                n = pname.get(id(p), f"param{len(new_units)}")
                rule, meta = self._param_rule(n, p)
                new_units[n] = Unit(n, rule, [p], [n], [], None, meta)
                taken.add(id(p))
                if self.strict and rule.name == "fallback" and id(p) not in excluded:
                    raise ValueError(
                        f"strict=True: parameter {n!r} would take the fallback step: "
                        f"{why.get(id(p), 'it belongs to no module of the model')}. Pass exclude=[...] to accept "
                        "the fallback for a module explicitly")
        for name, unit in new_units.items():
            old = self.units.get(name)
            if old is not None and old.rule is unit.rule and [id(p) for p in old.params] == [id(p) for p in unit.params]:
                unit.state = old.state
            else:
                unit.state = unit.rule.init_state(unit)
                unit.rule.bind(unit, group_of[id(unit.primary)])
        self.units = new_units
        self._sync_capture()

    @staticmethod
    def _member(name, module, rule: Rule, own: Dict[str, Tensor]) -> Optional[Member]:
        """The module as a member of ``rule``'s unit, or None when the rule cannot take it (an
        affine module with a frozen weight: its bias then takes a parameter rule)."""
        if not rule.adapter_kinds:
            if "weight" not in own and "bias" not in own and own:  # a block: its first parameter is the sentinel
                return Member(name, module, None, next(iter(own.values())), None)
            return Member(name, module, None, own.get("weight"), own.get("bias"))
        adapter = adapter_for(module)
        if adapter is None or adapter.kind not in rule.adapter_kinds:
            return None
        in_groups = {id(p) for p in own.values()}
        weight, bias = adapter.weight(module), adapter.bias(module)
        weight = weight if weight is not None and id(weight) in in_groups else None
        bias = bias if bias is not None and id(bias) in in_groups else None
        if (adapter.kind != "channel" and weight is None) or (weight is None and bias is None):
            return None
        return Member(name, module, adapter, weight, bias)

    @staticmethod
    def _join_reason(rule: Rule, rules: List[Rule], members: List[Member]) -> Optional[str]:
        from .affine import join_reason

        if any(r is not rule for r in rules):
            return "they are assigned different rules"
        if not rule.affine:
            return f"the {rule.name} rule has no joint form"
        return join_reason(members)

    def _unsupported(self, name: str, module: nn.Module, reason: str) -> None:
        self._warn_fallback(("unsupported", name), f"module {name!r} ({type(module).__name__}) has no closed-form "
                            f"maximiser: {reason}", " Exclude it explicitly or use solver='iterative'.")

    def _warn_fallback(self, key, what: str, hint: str = " Pass exclude=[...] to accept the fallback explicitly.") -> None:
        """Warn once that ``what`` sends parameters to the fallback step; raise with ``strict=True``."""
        msg = f"{what}; its parameters take the fallback step"
        if self.strict:
            raise ValueError(f"{msg} (strict=True).{hint}")
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, stacklevel=5)

    def _sync_capture(self) -> None:
        """Register (or update) the hooks of every module whose rule needs captured states; a rule
        that needs none this step (``capture_spec`` None) leaves its hooks registered but inactive."""
        if self.capture.removed:
            return
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for unit in self.units.values():
            if not unit.rule.module_rule:
                continue
            group = group_of[id(unit.primary)]
            for mb in unit.members:
                spec = unit.rule.capture_spec(unit, mb, group)
                entry = self.capture._entries.get(mb.name)
                if entry is None:
                    if spec is not None:
                        self.capture.add(mb.name, mb.module, mb.adapter, spec, mb.sentinel,
                                         counter=mb.adapter or adapter_for(mb.module))
                elif entry.spec != spec:
                    entry.spec = spec

    def _group_of(self, p: Tensor) -> Dict[str, Any]:
        for g in self.param_groups:
            if any(q is p for q in g["params"]):
                return g
        raise KeyError("parameter is in no param group")

    def unit_of(self, param: Tensor) -> Unit:
        """The unit that updates ``param`` (its ``rule``, ``state`` record, ``members``)."""
        for unit in self.units.values():
            if any(p is param for p in unit.params):
                return unit
        raise KeyError("the parameter is not trained by this optimizer")

    def state_of(self, param: Tensor) -> Any:
        """The typed state record of the unit that updates ``param`` (e.g. ``.accumulator`` of a
        discrete weight, ``.exp_avg`` of an Adam fallback parameter, ``.latent`` of BinaryConnect)."""
        return self.unit_of(param).state

    def rule_table(self) -> "RuleTable":
        """One row per unit: ``{"unit", "rule", "params", "description"}`` — what each module or
        parameter is trained by. A list of dicts; ``print(opt.rule_table())`` shows it as a table."""
        out = RuleTable()
        for unit in self.units.values():
            group = self._group_of(unit.primary)
            out.append({"unit": unit.name, "rule": unit.rule.name, "params": list(unit.param_names),
                        "description": unit.rule.describe(unit, group)})
        return out

    def end_epoch(self) -> None:
        """Advance per-epoch schedules; call once at the end of every epoch. No-op here;
        configurations with an epoch schedule override it (e.g. DiscreteMSA's EMA decay)."""

    # ------------------------------------------------------------------ hooks and lifetime
    def detach(self) -> None:
        """Remove the hooks from the model (the model is left exactly as it was); the optimizer
        cannot step afterwards."""
        self.capture.remove("the optimizer was detached from its model (detach())")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()
        return False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad`` and drop the captured statistics with the gradients."""
        super().zero_grad(set_to_none=set_to_none)
        self.capture.reset()

    #: instance attributes that do not travel with a copy or a pickle: the hooks (re-registered on the
    #: copy's model), process-local handles, and what LR schedulers / GradScaler attach to ``step``
    _TRANSIENT = ("capture", "_finalizer", "process_group", "grad_scaler", "step", "_opt_called", "_structure_agreed")

    def __getstate__(self) -> Dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()
                if k not in self._TRANSIENT and not k.startswith("_optimizer_")}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        state = dict(state)
        state.setdefault("process_group", None)
        state.setdefault("grad_scaler", None)
        state.setdefault("shard_solves", True)
        super().__setstate__(state)
        self._attach_capture()
        self._sync_capture()

    # ------------------------------------------------------------------ AMP
    def _costate_inv_scale(self, has_grads: bool) -> float:
        """1/loss-scale of the captured costates: from the GradScaler whose ``step()`` called ours,
        or from ``grad_scaler=`` (whose stage must then be "unscaled")."""
        scaler = _calling_grad_scaler()
        if scaler is None and self.grad_scaler is not None:
            scaler = self.grad_scaler
            states = getattr(scaler, "_per_optimizer_states", None)
            # no entry: nothing was unscaled since the last update() (GradScaler's READY stage)
            stage = states.get(id(self), {}).get("stage") if isinstance(states, dict) else None
            if scaler.is_enabled() and has_grads and getattr(stage, "name", "READY") == "READY":
                raise RuntimeError(
                    f"{type(self).__name__}.step() was called with gradients that still carry the GradScaler's "
                    "loss scale: call scaler.step(optimizer) (after scaler.unscale_(optimizer) if you clip)"
                )
        if scaler is None or not scaler.is_enabled():
            return 1.0
        return 1.0 / float(scaler.get_scale())

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        """One step (see the module docstring). ``closure`` (optional) re-evaluates the model and
        returns the loss; it must call ``backward()``. Returns the closure's loss (or None)."""
        if self.capture.removed:
            raise RuntimeError(f"{type(self).__name__} cannot step: {self.capture.removed_reason}")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with phase("step"):
            self._step(loss)  # an exception leaves everything as it was, statistics included
            with phase("reset"):
                self.capture.reset()
                self._sync_capture()
        return loss

    #: consecutive skipped steps after which :meth:`step` warns (once per run of skips)
    SKIP_WARN_AFTER = 10

    def _skip(self, reason: str) -> None:
        self.skipped_steps += 1
        self._skip_run = getattr(self, "_skip_run", 0) + 1
        if self._skip_run == self.SKIP_WARN_AFTER:
            warnings.warn(
                f"{type(self).__name__}: the last {self._skip_run} steps were all skipped (this one: {reason}); "
                "nothing is being trained. opt.skipped_steps counts skipped steps, opt.last_step['skip_reason'] "
                "says why", RuntimeWarning, stacklevel=6)
        self.last_step = self._step_info(
            StepInfo(skipped=True, skip_reason=reason, controlled=0, fallback=0, hamiltonian_gain=0.0), [])

    def _empty_batch(self, grads_present: List[Tensor]) -> bool:
        """A zero-size batch on every rank: a recording module's backward pass carried no rows and
        every gradient is exactly zero (on every rank: the gradients are averaged already, and the
        row test is reduced across ranks, so every rank decides alike)."""
        world = pdist.world_size(self.process_group)
        if world == 1 and not self.capture.saw_empty_pass():
            return False
        if any(bool(g.any()) for g in (p.grad for p in grads_present)):
            return False
        if world > 1:
            flag = torch.tensor([0.0 if self.capture.saw_empty_pass() else 1.0], dtype=torch.float64,
                                device=grads_present[0].device)
            pdist.all_reduce_sum_([flag], self.process_group)
            return float(flag) == 0.0
        return True

    def _step_info(self, info: StepInfo, proposals) -> StepInfo:
        """Hook for configurations to add diagnostics (``proposals``: ``[(unit, Proposal)]``)."""
        return info

    def _step(self, loss) -> None:
        for g in self.param_groups:
            self._check_group(g)
        grads_present = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        world = pdist.world_size(self.process_group)
        sizes = weights = None
        if world > 1:  # before anything else: every rank raises, or none (before its first collective)
            sizes, weights = self._agree_across_ranks(world)
        if not grads_present:
            return  # as in torch: nothing to do without gradients
        costate_inv = self._costate_inv_scale(bool(grads_present))
        if world > 1 and self._sharded:  # FSDP2 averaged its DTensor gradients; the rest are this rank's
            pdist.all_reduce_mean_([p.grad for p in grads_present if not pdist.is_sharded(p)], self.process_group)
        if world > 1 and not self._grads_averaged_by_wrapper:
            if weights is None:
                pdist.all_reduce_mean_([p.grad for p in grads_present], self.process_group)
            else:
                self._weighted_grad_sum(weights, world)
        sharded = None
        if self._sharded:  # FSDP2: the step runs on whole-tensor stand-ins (pmptrain.optim.sharded)
            names = {id(p): n for n, p in self.root.named_parameters()}
            sharded = ShardedStep(self.units, {id(p): g for g in self.param_groups for p in g["params"]}, names)
            grads_present = sharded.grads_present(grads_present)
        if self._empty_batch(grads_present):
            # nothing to learn from, and every statistic would be divided by B = 0: skipped and
            # counted (the statistics are dropped; no weight, state or moment changes)
            self._skip("empty batch (zero samples)")
            return
        group_of = {id(p): g for g in self.param_groups for p in g["params"]} if sharded is None else sharded.group_of
        units = self.units if sharded is None else sharded.units
        ctx = StepContext(group_of, costate_inv, self.capture, self.process_group, world, sizes)
        proposals: List[Tuple[Unit, Proposal]] = []
        if world > 1 and self.shard_solves and any(u.rule.module_rule for u in units.values()):
            proposals = self._sharded_proposals(units, ctx, world, sizes, loss, grads_present)
            if proposals is None:
                return  # skipped on every rank
        else:
            for unit in units.values():
                try:
                    with phase("propose"):
                        prop = unit.rule.propose(unit, ctx)
                except torch.linalg.LinAlgError:
                    # δ > 0 keeps every factorisation well-posed: only non-finite data make it fail
                    self._skip(self._skip_reason(loss, grads_present, f"unit {unit.name!r}"))
                    return
                if prop is not None:
                    proposals.append((unit, prop))
        # ⟨∇J, Δθ⟩ of every update: the first-order gain of H, and at the same time the finiteness
        # check (a NaN/Inf in Δθ or in the gradient makes the product non-finite, even where Δθ = 0)
        with phase("check"):
            terms = []
            for _, prop in proposals:
                for u in prop.updates:
                    d = u.change()
                    g = ctx.grad(u.param)
                    if g is not None:
                        terms.append(torch.dot(g.reshape(-1).to(d.dtype), d.reshape(-1)))
                    else:
                        terms.append(d.sum() * 0.0)
            if isinstance(loss, Tensor):
                terms.append(loss.detach().float().sum() * 0.0)
            stacked = torch.stack([t.float() for t in terms]) if terms else None
            finite = stacked is None or bool(torch.isfinite(stacked).all())
        if not finite:
            self._skip(self._skip_reason(loss, grads_present, "an update"))
            return
        with phase("apply"):
            for _, prop in proposals:
                for u in prop.updates:
                    p = u.param
                    if u.value is not None:
                        p.copy_(u.value)
                        continue
                    if u.decay:
                        p.mul_(1.0 - u.decay)
                    p.add_(u.delta.to(p.dtype), alpha=u.alpha)
            if sharded is not None:
                sharded.write_back()
        for unit, prop in proposals:
            self.units[unit.name].state = prop.state
        self._skip_run = 0
        n_mod = sum(1 for unit, _ in proposals if unit.rule.module_rule)
        n_fb = sum(1 for unit, _ in proposals if unit.rule.name == "fallback")
        gain = -float(stacked.sum()) if stacked is not None else 0.0
        self.last_step = self._step_info(
            StepInfo(skipped=False, skip_reason=None, controlled=n_mod, fallback=n_fb, hamiltonian_gain=gain),
            proposals)

    def _sharded_proposals(self, units, ctx: StepContext, world: int, sizes, loss, grads_present):
        """The propose phase with solve sharding (:mod:`pmptrain.optim.solve_shard`): every rank runs
        every rule up to its solve (the statistics' collectives), the owners solve, and one exchange
        gives every rank the owners' proposals. Returns ``[(unit, Proposal)]``, identical on every
        rank, or None when the step was skipped (a ``LinAlgError`` on any rank); an owner's other
        exceptions are raised on every rank."""
        ctx.owners = assign_owners(list(units.values()), world, sizes)
        ctx.me = pdist.rank(self.process_group)
        results: Dict[str, Any] = {}
        for unit in units.values():
            try:
                with phase("propose"):
                    results[unit.name] = unit.rule.propose(unit, ctx)
            except Exception as exc:  # reported to every rank by the exchange (no rank may leave it)
                results[unit.name] = exc
        asked = set(ctx.asked)
        device = next(iter(units.values())).primary.device
        with phase("exchange"):
            shared, failures = exchange({n: r for n, r in results.items() if n in asked or isinstance(r, BaseException)},
                                        units, ctx.owners, ctx.me, self.process_group, device)
        raised = [f for f in failures if f[3] != "LinAlgError"]
        if raised:
            own = [f[2] for f in raised if f[2] is not None]
            if own:
                raise own[0]
            r, name, _, msg = raised[0]
            raise SolveFailure(f"rank {r} failed on unit {name!r}: {msg}")
        if failures:
            # δ > 0 keeps every factorisation well-posed: only non-finite data make it fail
            self._skip(self._skip_reason(loss, grads_present, f"unit {failures[0][1]!r}"))
            return None
        proposals = []
        for unit in units.values():
            prop = shared[unit.name] if unit.name in shared else results[unit.name]
            if isinstance(prop, Deferred):  # pragma: no cover - exchange replaces every deferred unit
                raise RuntimeError(f"unit {unit.name!r}: the owner's proposal did not arrive")
            if prop is not None:
                proposals.append((unit, prop))
        return proposals

    def _agree_across_ranks(self, world: int):
        """One all-gather of a small integer vector per rank (``pmptrain.optim.ranks``): raises the
        same ``RuntimeError`` on every rank when the ranks ran different modules, or (under DDP) had
        different batch sizes; returns the union ``(samples, rows)`` of every captured module and the
        gradient weights (None: the plain mean is exact). The first step after a (re)partition
        also checks, with one more all-gather, that every rank has the same units."""
        units = list(self.units.values())
        device = units[0].primary.device if units else None
        if getattr(self, "_structure_agreed", None) is not self.units:
            ranks.check_structure(pdist.all_gather_ints(ranks.structure_signature(units), self.process_group, device))
            self._structure_agreed = self.units
        table = pdist.all_gather_ints(ranks.local_signature(units, self.capture), self.process_group, device)
        ranks.check_agreement(table, units)
        samples = ranks.unit_samples(table, units)
        if self._grads_averaged_by_wrapper:
            ranks.check_uniform_for_wrapper(samples)
            weights = None
        else:
            with_grads = [u.name for u in units if any(p.grad is not None for p in u.params)]
            weights = ranks.grad_weights(samples, with_grads, world)
        return ranks.union_sizes(table, units), weights

    def _weighted_grad_sum(self, weights, world: int) -> None:
        """``.grad ← Σ_r w_r·.grad_r`` (``w_r = B_r/B`` of the parameter's unit): the gradient of the
        mean loss over the union batch, each rank's loss being the mean over its own batch."""
        me = pdist.rank(self.process_group)
        grads = []
        for unit in self.units.values():
            w = weights.get(unit.name)
            for p in unit.params:
                if p.grad is not None:
                    p.grad.mul_(float(w[me]) if w is not None else 1.0 / world)
                    grads.append(p.grad)
        pdist.all_reduce_sum_(grads, self.process_group)

    def _skip_reason(self, loss, params, where: str) -> str:
        bad = isinstance(loss, Tensor) and not bool(torch.isfinite(loss.detach()).all())
        if pdist.world_size(self.process_group) > 1 and params:  # each rank has its own loss: agree
            flag = torch.tensor([1.0 if bad else 0.0], dtype=torch.float64, device=params[0].device)
            pdist.all_reduce_sum_([flag], self.process_group)
            bad = float(flag) > 0.0
        if bad:
            return "non-finite loss"
        sums = [p.grad.sum() for p in params]
        if sums and not bool(torch.isfinite(torch.stack([s.float() for s in sums])).all()):
            return "non-finite gradient"
        return f"non-finite statistics or update in {where}"

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        post = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = OrderedDict()
        try:
            sd = super().state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = post
        sd["pmptrain"] = {
            "format": _FORMAT,
            "optimizer": type(self).__name__,
            "skipped_steps": self.skipped_steps,
            "units": {name: {"rule": u.rule.name, "params": list(u.param_names),
                             "state": u.rule.state_to_dict(u.state)} for name, u in self.units.items()},
        }
        for hook in post.values():
            out = hook(self, sd)
            if out is not None:
                sd = out
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        sd = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, sd)
            if out is not None:
                sd = out
        extra = sd.pop("pmptrain", None)
        if not isinstance(extra, dict) or extra.get("format") != _FORMAT:
            raise ValueError(
                "state_dict has no pmptrain section of format 2: it was not produced by this version "
                "of a pmptrain optimizer"
            )
        saved = extra.get("units")
        if not isinstance(saved, dict) or set(saved) != set(self.units):
            missing = sorted(set(self.units) - set(saved or {}))
            unknown = sorted(set(saved or {}) - set(self.units))
            raise ValueError(f"state_dict units do not match this optimizer: missing {missing}, unknown {unknown}")
        states = {}
        for name, unit in self.units.items():
            entry = saved[name]
            if entry.get("rule") != unit.rule.name:
                raise ValueError(f"state_dict: unit {name!r} was trained by rule {entry.get('rule')!r}, "
                                 f"this optimizer uses {unit.rule.name!r}")
            states[name] = unit.rule.state_from_dict(entry.get("state"), unit)
        pre, post = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            super().load_state_dict(sd)
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = pre, post
        for g in self.param_groups:
            self._check_group(g)
        with torch.no_grad():
            for name, st in states.items():
                unit = self.units[name]
                unit.state = st
                unit.rule.restore(unit, self._group_of(unit.primary))
        self.skipped_steps = int(extra.get("skipped_steps", 0))
        self._sync_capture()
        for hook in post.values():
            hook(self)
