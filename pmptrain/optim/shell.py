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

Each unit's state record is visible where torch tools look for per-parameter state: in
``opt.state[p]`` of the unit's primary parameter (its fields; the record's own tensors, so a tool that
moves them moves the state the next step uses) and in ``state_dict()["state"]`` under that
parameter's index, as plain data that ``torch.load(..., weights_only=True)`` reads;
``state_dict()["pmptrain"]`` names the units and their rules. Hooks are removed with :meth:`detach`,
when the optimizer is garbage-collected, or when another pmptrain optimizer hooks the same modules.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import warnings
import weakref
from collections import OrderedDict, defaultdict
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from .. import _deferred
from .. import distributed as pdist
from .._profile import phase
from ..capture import ModuleCapture
from ..modules import adapter_for, bypassed_by_parent
from ..taps import attach_parent_tap
from ..trust import gain_factor
from ..views import views_of
from . import ranks
from .hyper import PENALTY_MAX, Real, Spec, is_number
from .rule import Member, Proposal, Rule, StepContext, Unit, cast_state, clone_state, record_from_view, record_view
from .sharded import ShardedStep, has_sharded_params, shard_record
from .solve_shard import Deferred, SolveFailure, assign_owners, exchange

__all__ = ["PMPOptimizer", "StepInfo", "Unsupported", "unwrap_model"]

_FORMAT = 3  # 3: records in ["state"] by parameter index; 2 (still loaded): records under ["pmptrain"]["units"]


class StepInfo(dict):
    """Diagnostics of the last step (a dict, for logging).

    Keys: ``skipped`` (bool), ``skip_reason`` (str or None: ``"non-finite loss"``, ``"non-finite
    gradient"``, ``"non-finite statistics or update in …"``, ``"empty batch (zero samples)"``), ``controlled`` (module units updated by
    their maximiser), ``fallback`` (parameters updated by the fallback), ``hamiltonian_gain``
    (``Σ −⟨∇J, Δθ⟩`` over every rule update, decay excluded: the first-order gain of H),
    ``gain_scale`` (the factor of E-MSA's predicted-gain guard, ``max_gain``; 1 when it did not act); discrete
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
    #: a line printed above the table (EMSA: the setting its defaults took, and why), or None
    note: Optional[str] = None

    def __str__(self) -> str:
        cells = [[", ".join(r[c]) if c == "params" else str(r[c]) for c in self.COLUMNS] for r in self]
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(self.COLUMNS)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(self.COLUMNS, widths)).rstrip(),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
        return "\n".join(([self.note] if self.note else []) + lines)


class Unsupported:
    """A module rule choice: the module has parameters but no rule (``reason`` says why); its
    parameters take the fallback step with a warning, or raise with ``strict=True``. ``hint``: what
    the strict error suggests instead (default: exclude it or the iterative solver); ``silent``:
    the module has a rule but its hooks cannot see its parameters' use (a parent reads them)."""

    def __init__(self, reason: str, hint: Optional[str] = None, silent: bool = False):
        self.reason, self.hint, self.silent = reason, hint, silent


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


class _LazyHook:
    """Forward pre-hook of a lazy module: partitions the optimizer again once the module has
    initialised its parameters (weak references: the hook keeps neither alive; copies and pickles
    of the model carry an inert hook)."""

    def __init__(self, opt, module):
        self.opt, self.module = weakref.ref(opt), weakref.ref(module)

    def __call__(self, module, args):
        opt = self.opt()
        if opt is None or module is not self.module() or opt.capture.removed:
            return
        if not any(is_lazy(p) for p in module.parameters(recurse=False)):
            opt._partition()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.opt = self.module = lambda: None


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
        shard_statistics: under FSDP2, the statistics a module unit keeps between steps (E-MSA's
            ``C_x``, ``C_p`` and their eigenbases with ``stat_decay``/``stat_every``) are stored as
            ``DTensor`` row shards, 1/world per rank, and all-gathered for each step
            (:func:`~pmptrain.optim.sharded.shard_record`); False: every rank keeps them whole. No
            effect without FSDP2's sharded parameters.
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
        shard_statistics: bool = True,
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
        if not isinstance(shard_statistics, bool):
            raise TypeError(f"invalid shard_statistics={shard_statistics!r}: must be True or False")
        self.shard_statistics = shard_statistics
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
        self._lazy_hooks: List[Any] = []  # forward pre-hooks of lazy modules (partitioned at their first call)
        self._stepped: Dict[str, Tuple[Any, int]] = {}  # sentinel .grad of each captured member at the last step
        self._silenced: Dict[str, str] = {}  # module name → why its claimed rule cannot see it (fallback)
        self._attach_capture()
        params, defaults = self._positional_lr(params, defaults)
        self._group_keys = tuple(defaults)  # the keys a loaded group lacking them takes from defaults
        if params is None:
            params = [p for p in self.root.parameters() if p.requires_grad]
        super().__init__(params, defaults)
        self._initialised = True
        self._partition()

    def _positional_lr(self, params, defaults):
        """``EMSA(model, 0.1)`` (torch's ``Adam(params, 0.1)`` habit): a number where ``params``
        goes is the learning rate — unambiguous, ``params`` being an iterable."""
        if not is_number(params, tensor_ok=True) or (isinstance(params, Tensor) and params.dim() != 0):
            return params, defaults
        sig = inspect.signature(type(self).__init__).parameters.get("lr")
        given = defaults.get("lr")
        if sig is not None and (isinstance(given, Tensor) or given != sig.default):
            raise TypeError(f"{type(self).__name__}() got lr twice: positionally ({params!r}, where params goes) "
                            f"and as lr={given!r}")
        return None, dict(defaults, lr=params)

    def _attach_capture(self) -> None:
        self.capture = ModuleCapture()
        # tells a zero-size batch from a zero gradient; notes the loss the root returns (max_gain)
        self.capture.watch_root(self.root, losses=getattr(self, "max_gain", None) is not None)
        self.capture.watch_grads(self.root.parameters())  # ‖∇J‖² at backward: rescalings of .grad (rho_scale="costate")
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
            self._check_in_model(group)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        lr = group["lr"]
        group.setdefault("base_lr", lr.clone() if isinstance(lr, Tensor) else lr)  # the reference of lr_scale
        if getattr(self, "_initialised", False):
            self._partition()

    def _check_in_model(self, group: Dict[str, Any]) -> None:
        """Every parameter of ``group`` is one of the model's: a tensor the optimizer cannot see
        enter the model has no module, so no rule (it was trained by the fallback, silently)."""
        known = {id(p) for _, p in self.root.named_parameters(remove_duplicate=False)}
        for i, p in enumerate(group["params"]):
            if id(p) not in known:
                raise ValueError(
                    f"invalid params: param group {len(self.param_groups) - 1}, position {i}: not a parameter of "
                    f"the model (a {p.dtype} tensor of shape {tuple(p.shape)}); {type(self).__name__} trains the "
                    "parameters of the modules of the model it was given: register the tensor in a module "
                    "(an nn.Parameter attribute) or train it with a separate optimizer")

    def _check_group(self, group: Dict[str, Any]) -> None:
        for key, spec in self._specs.items():
            if key in group:
                group[key] = spec.check(key, group[key])
        self._validate_group(group)

    # ------------------------------------------------------------------ partition
    def _want_grad_norms(self) -> None:
        """Record ``‖∇J_p‖²`` in the coming backward passes only when a group measures ρ in costate
        units (``rho_scale="costate"``: :meth:`StepContext.grad_rescale`); nothing otherwise."""
        self.capture.record_grad_sq = any(g.get("rho_scale") == "costate" for g in self.param_groups)

    def _partition(self) -> None:
        """Assign rules to modules/parameters (at construction and after ``add_param_group``);
        existing units keep their state."""
        self.capture.watch_grads(self.root.parameters())  # lazy parameters, now initialised
        self._want_grad_norms()
        group_of = self._group_map()
        lazy = self._hook_lazy(group_of)  # parameters of lazy modules not initialised yet: no unit for now
        pname: Dict[int, str] = {}
        for n, p in self.root.named_parameters(remove_duplicate=False):
            pname.setdefault(id(p), n)
        claims: Dict[str, Tuple[Rule, Member, List[Tensor]]] = OrderedDict()  # rule, member, its params
        owners: Dict[int, List[str]] = {}
        why: Dict[int, str] = {}  # why a parameter takes the fallback (for strict=True)
        excluded = set()
        blocks: List[str] = []  # names of the controlled blocks met so far (their descendants are skipped)
        all_modules = dict(self.root.named_modules())
        pending: List[Tuple[str, nn.Module, Unsupported, List[Tensor]]] = []  # modules without a rule
        for name, module in self._modules_and_views():
            if any(name.startswith(b + ".") or (b == "" and name) for b in blocks):
                continue  # inside a controlled block: the block is the unit
            is_block = self._is_block(name, module)
            if is_block:
                blocks.append(name)
            own = [(n, p) for n, p in module.named_parameters(recurse=is_block) if id(p) in group_of]
            if not own:
                continue
            if any(id(p) in lazy for _, p in own):
                lazy.update(id(p) for _, p in own)  # the whole module (block) waits for its initialisation
                continue
            if name in self._excluded:
                excluded.update(id(p) for _, p in own)
                continue
            choice = self._module_rule(name, module)
            if isinstance(choice, Rule) and choice.module_rule:
                cause = self._silenced.get(name) or self._structurally_silent(name, module, all_modules)
                if cause is not None:
                    choice = Unsupported(cause, silent=True)
            if isinstance(choice, Unsupported):
                pending.append((name, module, choice, [p for _, p in own]))
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
        self._settle_unsupported(pending, claims, owners, why, pname)
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
                if id(p) in taken or id(p) in lazy:
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
        self._publish_state()
        self._sync_capture()

    def _hook_lazy(self, group_of) -> set:
        """The ids of the trained parameters of lazy modules (``nn.LazyLinear`` …) that are not
        initialised yet. Each such module gets a forward pre-hook that runs after its own
        initialisation, in its first call, and partitions again: the module's rule and capture
        hooks are in place for that very call, so the first step is the same as for the eager
        model of the same shape."""
        for h in self._lazy_hooks:
            h.remove()
        self._lazy_hooks = []
        lazy = set()
        for name, module in self.root.named_modules():
            own = [p for p in module.parameters(recurse=False) if id(p) in group_of and is_lazy(p)]
            if own:
                lazy.update(id(p) for p in own)
                self._lazy_hooks.append(module.register_forward_pre_hook(_LazyHook(self, module)))
        return lazy

    def _settle_unsupported(self, pending, claims, owners, why, pname) -> None:
        """One truth for the parameters of modules without a rule (``pending``): a parameter that a
        module without a rule holds only as an alias of a parameter of its own descendant with a
        rule (Hugging Face's ``cls.predictions.bias`` is ``cls.predictions.decoder.bias``) is the
        descendant's; any other parameter of such a module takes the fallback (warned, or raised
        with ``strict=True``), and so does every module rule claiming one of them (a tie with a
        module without a closed form cannot be maximised jointly): the warning, ``rule_table()``
        and ``strict`` say the same."""
        for name, module, choice, params in pending:
            prefix = name + "." if name else ""
            used = [p for p in params
                    if not any(o.startswith(prefix) and o != name for o in owners.get(id(p), []))]
            if not used:
                continue  # aliases of its descendants' parameters: it holds them, the descendants use them
            self._unsupported(name, module, choice)
            for p in used:
                why.setdefault(id(p), f"module {name!r} ({type(module).__name__}) has no closed form: {choice.reason}")
                for other in list(owners.pop(id(p), [])):
                    if other not in claims:
                        continue
                    reason = (f"module {other!r} ({type(claims[other][1].module).__name__}) shares parameter "
                              f"{pname.get(id(p), '?')!r} with module {name!r} ({type(module).__name__}), which has no "
                              "closed form, so the tie cannot be maximised jointly")
                    _, _, taken = claims.pop(other)
                    for q in taken:
                        why.setdefault(id(q), reason)
                        if id(q) in owners and other in owners[id(q)]:
                            owners[id(q)].remove(other)
                    self._warn_fallback(("tied-unsupported", other, name), reason)

    def _modules_and_views(self):
        """``root.named_modules()`` with every host of fused affine maps (an ``nn.LSTM``, Mixtral's
        experts; :mod:`pmptrain.views`) replaced by its views, named ``host.suffix``."""
        for name, module in self.root.named_modules():
            views = None if self._is_block(name, module) else views_of(module)
            if views is None:
                yield name, module
                continue
            for suffix, view in views:
                yield (f"{name}.{suffix}" if name else suffix) if suffix else name, view

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
    def _structurally_silent(name: str, module: nn.Module, modules: Dict[str, nn.Module]) -> Optional[str]:
        """Why hooks on ``module`` cannot see how its parameters are used, read from the model's
        structure (:func:`pmptrain.modules.bypassed_by_parent`), or None."""
        if not name:
            return None
        parent_name, _, child = name.rpartition(".")
        parent = modules.get(parent_name)
        return bypassed_by_parent(parent, child) if parent is not None else None

    def _demote_silent(self, sizes=None) -> None:
        """The first step's check that no claimed module went silent: a unit whose every member's
        parameters received a gradient in a training-mode forward while no member's forward hook
        recorded (:meth:`~pmptrain.capture.ModuleCapture.silent_keys`) cannot form its Hamiltonian;
        its modules take the fallback from now on, with one warning naming each module and the
        cause (``strict=True`` raises), instead of an error at every step. With several ranks
        (``sizes``: the members' samples summed over the ranks) a member counts as silent only if
        no rank recorded it; ranks running the same model decide alike, and ranks that do not are
        stopped by the next step's structure check."""
        silent = set(self.capture.silent_keys())
        if sizes is not None:
            silent = {k for k in silent if sizes.get(k, (0, 0))[0] == 0}
        if not silent:
            return
        modules = dict(self.root.named_modules())
        found = {}
        for unit in self.units.values():
            keys = getattr(unit.rule, "capture_keys", None)
            names = keys(unit) if keys is not None else [mb.name for mb in unit.members]
            if names and all(n in silent for n in names):
                for n in ([mb.name for mb in unit.members] if keys is not None else names):
                    parent = n.rpartition(".")[0]
                    ptype = type(modules[parent]).__name__ if parent in modules else "the model"
                    found[n] = (f"its forward never ran through its hooks while its parameters received "
                                f"gradients in a training-mode forward pass: its parent ({parent or 'the root'}, "
                                f"{ptype}) uses them without calling the module (a functional or fused kernel "
                                "reading the weight), so its captured states are missing")
        if not found:
            return
        self._silenced.update(found)
        self._partition()

    @staticmethod
    def _join_reason(rule: Rule, rules: List[Rule], members: List[Member]) -> Optional[str]:
        from .affine import join_reason

        if any(r is not rule for r in rules):
            return "they are assigned different rules"
        if not rule.affine:
            return f"the {rule.name} rule has no joint form"
        return join_reason(members)

    def _unsupported(self, name: str, module: nn.Module, choice: "Unsupported") -> None:
        if choice.silent:
            what = f"module {name!r} ({type(module).__name__}) cannot be controlled by its closed form: {choice.reason}"
            hint = f" Pass exclude=[{name!r}] to accept the fallback for it explicitly."
        else:
            what = f"module {name!r} ({type(module).__name__}) has no closed-form maximiser: {choice.reason}"
            hint = choice.hint if choice.hint is not None else (
                f" Exclude it explicitly (exclude=[{name!r}]) or use solver='iterative'.")
        # a registration hint is worth reading in the warning too; the generic one only under strict
        self._warn_fallback(("unsupported", name), what, hint, in_warning=choice.hint is not None)

    def _warn_fallback(self, key, what: str, hint: str = " Pass exclude=[...] to accept the fallback explicitly.",
                       in_warning: bool = False) -> None:
        """Warn once that ``what`` sends parameters to the fallback step (with ``hint`` when
        ``in_warning``); raise with ``strict=True``, always with ``hint``."""
        msg = f"{what}; its parameters take the fallback step"
        if self.strict:
            raise ValueError(f"{msg} (strict=True).{hint}")
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg + "." + hint if in_warning else msg, stacklevel=5)

    def _sync_capture(self) -> None:
        """Register (or update) the hooks of every module whose rule needs captured states; a rule
        that needs none this step (``capture_spec`` None) leaves its hooks registered but inactive."""
        if self.capture.removed:
            return
        group_of = self._group_map()
        for unit in self.units.values():
            if not unit.rule.module_rule:
                continue
            group = group_of[id(unit.primary)]
            if hasattr(unit.rule, "sync_capture"):  # a rule that records calls inside its module's forward
                unit.rule.sync_capture(unit, group, self.capture)
                continue
            observer = getattr(unit.rule, "observer", None)
            if observer is not None:  # a rule that reads the module's calls itself (additive parameters)
                for mb in unit.members:
                    if self.capture.observation(mb.name) is None:
                        self.capture.observe(mb.name, mb.module, observer(unit))
            for mb in unit.members:
                spec = unit.rule.capture_spec(unit, mb, group)
                entry = self.capture._entries.get(mb.name)
                if entry is None:
                    if spec is not None:
                        self.capture.add(mb.name, mb.module, mb.adapter, spec, mb.sentinel,
                                         counter=mb.adapter or adapter_for(mb.module))
                        attach_parent_tap(self.capture, self.root, mb.name, mb.module)  # pmptrain.taps
                elif entry.spec != spec:
                    entry.spec = spec

    # ------------------------------------------------------------------ opt.state
    def _publish_state(self) -> None:
        """``opt.state`` anew: each unit's record on its primary parameter (:meth:`_publish`)."""
        self.state = defaultdict(dict)
        for unit in self.units.values():
            self._publish(unit)

    def _publish(self, unit: Unit) -> None:
        """``opt.state[unit.primary]`` ← the unit's record as torch tools expect it
        (:func:`~pmptrain.optim.rule.record_view`: the record's own tensors, ``step`` a tensor).
        The dict is updated in place; what was published is remembered, so :meth:`_pull_state`
        sees what a tool replaced. The unit's other parameters (a module's bias) carry its
        ``step`` only: tools that expect state for every trainable parameter
        (``torch.distributed.checkpoint``'s ``set_optimizer_state_dict``) find it."""
        p = unit.primary
        if unit.state is None:
            for q in unit.params:
                self.state.pop(q, None)
            return
        d = self.state[p]
        d.clear()
        d.update(record_view(unit.state))
        unit.scratch["published"] = (d, list(d.items()))
        step = getattr(unit.state, "step", None)
        for q in unit.params[1:]:
            if isinstance(step, int):
                self.state[q] = {"step": torch.tensor(step, dtype=torch.int64, device="cpu")}

    def _pull_state(self) -> None:
        """Every unit's record from ``opt.state``: a tensor a tool put there (Lightning's move to
        the device, an edit) is the one the next step uses. Units whose dict is as published
        are left alone (no work on the usual step)."""
        for unit in self.units.values():
            if unit.state is None:
                continue
            d = dict.get(self.state, unit.primary)
            if d is None:
                continue
            seen = unit.scratch.get("published")
            if seen is not None and seen[0] is d and len(d) == len(seen[1]) \
                    and all(d.get(k) is v for k, v in seen[1]):
                continue
            unit.state = record_from_view(type(unit.state), d)
            unit.scratch["published"] = (d, list(d.items()))

    def _group_map(self) -> Dict[int, Dict[str, Any]]:
        """``{id(p): its param group}`` for every parameter of the optimizer."""
        return {id(p): g for g in self.param_groups for p in g["params"]}

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
        self._pull_state()
        return self.unit_of(param).state

    def rule_table(self) -> "RuleTable":
        """One row per unit: ``{"unit", "rule", "params", "description"}`` — what each module or
        parameter is trained by. A list of dicts; ``print(opt.rule_table())`` shows it as a table."""
        out = RuleTable()
        out.note = self._table_note()
        for unit in self.units.values():
            group = self._group_of(unit.primary)
            out.append({"unit": unit.name, "rule": unit.rule.name, "params": list(unit.param_names),
                        "description": unit.rule.describe(unit, group)})
        return out

    def _table_note(self) -> Optional[str]:
        """The line :meth:`rule_table` prints above its rows (None: none)."""
        return None

    def end_epoch(self) -> None:
        """Advance per-epoch schedules; call once at the end of every epoch. No-op here;
        configurations with an epoch schedule override it (e.g. DiscreteMSA's EMA decay)."""

    # ------------------------------------------------------------------ hooks and lifetime
    def detach(self) -> None:
        """Remove the hooks from the model (the model is left exactly as it was); the optimizer
        cannot step afterwards."""
        self.capture.remove("the optimizer was detached from its model (detach())")
        for h in self._lazy_hooks:
            h.remove()
        self._lazy_hooks = []

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
    _TRANSIENT = ("capture", "_finalizer", "process_group", "grad_scaler", "step", "_opt_called", "_structure_agreed",
                  "_lazy_hooks", "_stepped")

    def __getstate__(self) -> Dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()
                if k not in self._TRANSIENT and not k.startswith("_optimizer_")}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        state = dict(state)
        copied = "units" in state  # a copy or an unpickled optimizer (torch's load_state_dict passes two keys)
        if copied:  # (defaults only here: torch's load_state_dict must not reset the user's settings)
            state.setdefault("process_group", None)
            state.setdefault("grad_scaler", None)
            state.setdefault("shard_solves", True)
            state.setdefault("shard_statistics", True)
            state["_lazy_hooks"], state["_stepped"] = [], {}
        super().__setstate__(state)
        self._attach_capture()
        if copied:
            self._hook_lazy(self._group_map())
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
            self._check_new_backward()
            self._step(loss)  # an exception leaves everything as it was, statistics included
            self._remember_grads()
            self._want_grad_norms()
            with phase("reset"):
                self.capture.reset()
                self._sync_capture()
        return loss

    def _remember_grads(self) -> None:
        """The ``.grad`` of every recording module's sentinel at this step (a weak reference and
        its version counter): a later step with the same gradient had no backward pass since."""
        stepped = {}
        for name, entry in self.capture._entries.items():
            g = entry.sentinel.grad if entry.sentinel is not None else None
            if g is not None:
                stepped[name] = (weakref.ref(g), g._version)
        self._stepped = stepped

    def _check_new_backward(self) -> None:
        """A step whose statistics were consumed by the last step, on the same gradient: raise
        saying so (before anything changes) instead of blaming eval mode or compile."""
        for name, entry in self.capture._entries.items():
            seen = self._stepped.get(name)
            g = entry.sentinel.grad if entry.sentinel is not None else None
            if (seen is None or g is None or entry.spec is None or not entry.stats.empty
                    or seen[0]() is not g or seen[1] != g._version):
                continue
            raise RuntimeError(
                f"{type(self).__name__}.step() called again without a new backward pass since the last step: "
                f"module {name!r} has the same .grad as at that step, and the states and costates captured "
                "with it were consumed by it (they belong to the forward pass at the weights before that "
                "update, so they cannot form this step's augmented Hamiltonian). Nothing was changed. Run "
                "forward and backward again before each step() (zero_grad(), loss.backward(), step()); "
                "optimizers without captured statistics (MSA, DiscreteMSA, the baselines) step again with "
                "the same .grad, as torch's do")

    #: whether a one-process step takes the rules' fast path with its checks deferred to the step's
    #: one read (False: the careful path throughout, the reference the fast path is tested against)
    _deferred_checks = True

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
        self._pull_state()
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
        sharded = self._sharded_step() if self._sharded else None  # FSDP2: whole-tensor stand-ins
        if sharded is not None:
            grads_present = sharded.grads_present(grads_present)
        if self._empty_batch(grads_present):
            # nothing to learn from, and every statistic would be divided by B = 0: skipped and
            # counted (the statistics are dropped; no weight, state or moment changes)
            self._skip("empty batch (zero samples)")
            return
        before = self.units
        self._demote_silent(sizes)
        if sharded is not None and self.units is not before:
            sharded = self._sharded_step()
        group_of = self._group_map() if sharded is None else sharded.group_of
        units = self.units if sharded is None else sharded.units
        ctx = StepContext(group_of, costate_inv, self.capture, self.process_group, world, sizes)
        if world > 1 or sharded is not None:
            ctx.grad_sq = self._union_grad_sq(units, group_of, sharded, world)
        # one process: the rules take the fast path, whose safety nets are deferred to the one check
        # below (pmptrain._deferred); if it fails, every proposal is redone on the careful path
        # before the step is skipped. (Several ranks: the careful path, so that every rank runs the
        # same collectives; with solve sharding each unit is solved by its owner rank only.)
        deferred = world == 1 and self._deferred_checks
        kept = self.capture.snapshot() if deferred else None
        if world > 1 and self.shard_solves and any(u.rule.module_rule for u in units.values()):
            proposals = self._sharded_proposals(units, ctx, world, sizes, loss, grads_present)
            if proposals is None:
                return  # skipped on every rank
            flags, failed = [], None
        else:
            proposals, flags, failed = self._propose(ctx, deferred, units)
        stacked = None
        if failed is None:
            stacked, finite = self._check(proposals, flags, ctx, loss)
        if deferred and (failed is not None or not finite):
            self.capture.restore(kept)
            proposals, flags, failed = self._propose(ctx, False, units)
            if failed is None:
                stacked, finite = self._check(proposals, flags, ctx, loss)
        if failed is not None:
            # δ > 0 keeps every factorisation well-posed: only non-finite data make it fail
            self._skip(self._skip_reason(loss, grads_present, f"unit {failed!r}"))
            return
        if not finite:
            self._skip(self._skip_reason(loss, grads_present, "an update"))
            return
        scale = self._guard_gain(proposals, world, sharded)
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
            real = self.units[unit.name]  # (under FSDP2 `unit` is the step's whole-tensor stand-in)
            real.state = prop.state if sharded is None else sharded.keep(real, prop.state, self.shard_statistics)
            self._publish(real)
        self._skip_run = 0
        n_mod = sum(1 for unit, _ in proposals if unit.rule.module_rule)
        n_fb = sum(1 for unit, _ in proposals if unit.rule.name == "fallback")
        gain = -self._gain if stacked is not None else 0.0
        self.last_step = self._step_info(
            StepInfo(skipped=False, skip_reason=None, controlled=n_mod, fallback=n_fb, hamiltonian_gain=gain,
                     gain_scale=scale),
            proposals)

    def _guard_gain(self, proposals, world: int, sharded) -> float:
        """The predicted-gain guard (``max_gain = κ``; :func:`pmptrain.trust.gain_factor`): when the
        loss ``J`` of this gradient is known (``step(closure)``, or the root module returned it) and
        the step's first-order gain ``G`` exceeds ``κJ``, every update is shortened along itself by
        ``a = κJ/G`` (decay included: ``θ ← θ + a·(Δθ − decay·θ)``). Returns ``a`` (1: unchanged).
        One process only (ranks see different losses); not for exact codes (discrete values)."""
        kappa = getattr(self, "max_gain", None)
        ref = getattr(self, "_ref_loss", None)
        if kappa is None or ref is None or world > 1 or sharded is not None:
            return 1.0
        if any(u.value is not None for _, prop in proposals for u in prop.updates):
            return 1.0
        a = gain_factor(-self._gain, ref, kappa)
        if a < 1.0:
            for _, prop in proposals:
                for u in prop.updates:
                    u.alpha *= a
                    u.decay *= a
            self._gain *= a
        return a

    def _union_grad_sq(self, units, group_of, sharded, world: int):
        """With several ranks, or FSDP2's stand-ins: ``{id(p): (‖.grad_p‖², ‖∇J_p‖²)}``, the second of
        the union batch's gradient at the end of the backward pass, before the loop rescaled ``.grad``
        (:meth:`StepContext.grad_rescale`), for the parameters of costate-scaled units as the rules
        see them (FSDP2: the stand-ins).

        Each value is ``(‖.grad‖², ‖∇J‖²)``, the first None where the rules take it from ``.grad``.
        DDP: ``(None, the capture's record)`` (taken after DDP's averaging,
        :meth:`ModuleCapture.watch_grads`: every rank holds the same). FSDP2: both from the local
        shards, summed over the ranks in the same order (one all-reduce of three numbers per sharded
        parameter, every rank alike: the units agree; an untouched gradient gives a ratio of exactly
        1), divided by the number of ranks holding each shard (HSDP's replicas; 1 under plain
        FSDP2). A parameter some rank has no record or gradient of gets ``(0, 0)`` (its unit's ratio
        falls back to the others'). Left out with several ranks: gradients pmptrain averages in ``step()`` — every one
        without a wrapper (DDP-style), and the parameters FSDP2 leaves unsharded —, whose ranks'
        records precede that average (and the loop's clip, of each rank's own gradient). None:
        nothing recorded."""
        if not self._grads_averaged_by_wrapper or not self.capture.record_grad_sq:
            return None
        out: Dict[int, Tuple[Optional[Tensor], Tensor]] = {}
        pending = []  # (parameter the rules see, its sharded parameter)
        seen = set()
        for unit in units.values():
            for p in unit.params:
                if p is None or id(p) in seen or group_of[id(p)].get("rho_scale") != "costate":
                    continue
                seen.add(id(p))
                real = sharded.real(p) if sharded is not None else p
                if pdist.is_sharded(real):
                    pending.append((p, real))
                elif not self._sharded or world == 1:  # DDP: every parameter's gradient is the ranks' average
                    ref = self.capture.grad_sq(real)
                    if ref is not None:
                        out[id(p)] = (None, ref)
        if pending:
            device = pending[0][1].to_local().device
            zero = torch.zeros((), dtype=torch.float64, device=device)
            rows = []
            for _, real in pending:
                ref, g = self.capture.grad_sq(real), real.grad
                if ref is None or g is None:
                    rows.append(torch.stack((zero, zero, zero)))
                    continue
                g = g.detach().to_local()
                now = (g.abs().square() if g.is_complex() else g.square()).sum().to(torch.float64)
                rows.append(torch.stack((ref.to(torch.float64), now, zero + 1.0)))
            sums = torch.stack(rows)
            pdist.all_reduce_sum_([sums], self.process_group)
            for i, (p, real) in enumerate(pending):
                copies = world // pdist.shard_count(real)
                known = sums[i, 2] == world
                out[id(p)] = (torch.where(known, sums[i, 1] / copies, zero), torch.where(known, sums[i, 0] / copies, zero))
        return out

    def _sharded_step(self) -> ShardedStep:
        """The units of this step with whole-tensor stand-ins for FSDP2's sharded parameters
        (:mod:`pmptrain.optim.sharded`)."""
        names = {id(p): n for n, p in self.root.named_parameters()}
        return ShardedStep(self.units, self._group_map(), names)

    def _propose(self, ctx: StepContext, deferred: bool, units: Dict[str, Unit]):
        """``(proposals, deferred checks, failed)``: every unit's (of ``units``: ``self.units``, or
        their FSDP2 stand-ins) :class:`Proposal` (rules modify nothing), the tensors handed to :func:`pmptrain._deferred.defer` (only when ``deferred``),
        and the name of the unit whose factorisation raised ``LinAlgError`` (else None)."""
        proposals: List[Tuple[Unit, Proposal]] = []
        with (_deferred.collecting() if deferred else contextlib.nullcontext([])) as flags:
            for unit in units.values():
                try:
                    with phase("propose"):
                        prop = unit.rule.proposal(unit, ctx)
                except torch.linalg.LinAlgError:
                    return proposals, flags, unit.name
                if prop is not None:
                    proposals.append((unit, prop))
        return proposals, flags, None

    def _check(self, proposals, checks, ctx: StepContext, loss) -> Tuple[Optional[Tensor], bool]:
        """``(terms, finite)``: ``⟨∇J, Δθ⟩`` of every update — the first-order gain of H, and at the
        same time the finiteness check (a NaN/Inf in Δθ or in the gradient makes the product
        non-finite, even where Δθ = 0) — with the loss and the deferred ``checks``
        (:class:`pmptrain._deferred.Checks`, or ``[]``) folded in; one read from the device
        (``finite`` and the gain, kept in ``self._gain``)."""
        with phase("check"):
            terms = []
            for _, prop in proposals:
                for u in prop.updates:
                    d = u.change()
                    g = ctx.grad(u.param)
                    if g is not None:
                        g = g if g.dtype == d.dtype else g.to(d.dtype)
                        if d.is_complex():  # Re⟨g, Δθ⟩: the first-order change of J
                            terms.append(torch.vdot(g.reshape(-1), d.reshape(-1)).real)
                        else:
                            terms.append(torch.dot(g.reshape(-1), d.reshape(-1)))
                    else:
                        terms.append(d.sum() * 0.0)
            if isinstance(loss, Tensor):
                terms.append(loss.detach().float().sum() * 0.0)
            deferred = checks.ok() if checks else None
            self._ref_loss = None
            if not terms and deferred is None:
                self._gain = 0.0
                return None, True
            stacked = torch.stack(terms).float() if terms else torch.zeros(0, device=deferred.device)
            ok = torch.isfinite(stacked).all()
            if deferred is not None:
                ok = ok & deferred
            # the loss the predicted-gain guard compares with: the closure's, else what the root returned
            ref = loss if isinstance(loss, Tensor) else self.capture.root_loss
            read = [ok.to(stacked.dtype), stacked.sum()]
            if ref is not None and getattr(self, "max_gain", None) is not None:
                read.append(ref.detach().float().sum().to(stacked.device))
            values = torch.stack(read).tolist()  # the one read
            finite, gain = values[0], values[1]
            self._gain = gain
            self._ref_loss = values[2] if len(values) > 2 else None
            return (stacked if terms else None), bool(finite)

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
                    results[unit.name] = unit.rule.proposal(unit, ctx)
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
            # without step(closure) the loss is unseen: a non-finite loss shows only as this
            return "non-finite gradient" + ("" if isinstance(loss, Tensor) else
                                            " (the loss was not seen: step(closure) tells a non-finite loss apart)")
        return f"non-finite statistics or update in {where}"

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """torch's format: ``"state"`` maps the index of each unit's primary parameter (its
        weight, for a module unit) to the unit's record — ``{field: value}``, tensors copied, ``step``
        an int64 tensor —, ``"param_groups"`` as torch writes them; and ``"pmptrain"``: ``format``
        (3), ``optimizer``, ``skipped_steps`` and ``units`` (``{name: {"rule", "params", "index"}}``,
        ``index`` = the key of the unit's record in ``"state"``)."""
        post = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = OrderedDict()
        try:
            sd = super().state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = post
        sd["state"] = {k: clone_state(v) for k, v in sd["state"].items() if v}
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        sd["pmptrain"] = {
            "format": _FORMAT,
            "optimizer": type(self).__name__,
            "skipped_steps": self.skipped_steps,
            "silenced": dict(self._silenced),
            "units": {name: {"rule": u.rule.name, "params": list(u.param_names), "index": index[id(u.primary)]}
                      for name, u in self.units.items()},
        }
        for hook in post.values():
            out = hook(self, sd)
            if out is not None:
                sd = out
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Loads :meth:`state_dict` output: format 3; format 2 (records under
        ``["pmptrain"]["units"][name]["state"]``); or, without the ``"pmptrain"`` section, a dict of
        ``"state"`` and ``"param_groups"`` only (what ``torch.distributed.checkpoint``'s
        ``set_optimizer_state_dict`` passes), whose groups must be a pmptrain optimizer's. As in
        torch, each state tensor goes to its parameter's device, floating ones cast to the dtype
        this optimizer keeps them in (:func:`~pmptrain.optim.rule.cast_state`; step counters are
        not cast), and group keys the saved groups lack (added in a later version) take this
        optimizer's defaults."""
        sd = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, sd)
            if out is not None:
                sd = out
        extra = sd.pop("pmptrain", None)
        saved_groups = sd.get("param_groups")
        fmt = extra.get("format") if isinstance(extra, dict) else None
        if extra is None:
            if not (isinstance(saved_groups, list) and saved_groups
                    and all(isinstance(g, dict) and "base_lr" in g for g in saved_groups)):
                raise ValueError("state_dict has no pmptrain section and its param groups are not a pmptrain "
                                 "optimizer's: it was not produced by a pmptrain optimizer")
        elif fmt not in (2, _FORMAT):
            raise ValueError(f"state_dict has a pmptrain section of format {fmt!r}: this version of pmptrain reads "
                             f"formats 2 and {_FORMAT}")
        saved = extra.get("units") if extra is not None else None
        silenced = (extra.get("silenced") or {}) if extra is not None else {}
        if isinstance(silenced, dict) and set(silenced) - set(self._silenced):
            # modules the saving optimizer found silent at its first step: the same layout here
            self._silenced.update({str(k): str(v) for k, v in silenced.items()})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # warned when they were found
                self._partition()
        if extra is not None:
            if not isinstance(saved, dict) or set(saved) != set(self.units):
                missing = sorted(set(self.units) - set(saved or {}))
                unknown = sorted(set(saved or {}) - set(self.units))
                raise ValueError(f"state_dict units do not match this optimizer: missing {missing}, unknown {unknown}")
            for name, unit in self.units.items():
                if saved[name].get("rule") != unit.rule.name:
                    raise ValueError(f"state_dict: unit {name!r} was trained by rule {saved[name].get('rule')!r}, "
                                     f"this optimizer uses {unit.rule.name!r}")
        # torch's checks of the groups, before anything changes
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(self.param_groups, saved_groups)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                             "optimizer's group")
        saved_groups = [dict(s) for s in saved_groups]
        for s in saved_groups:
            for key in getattr(self, "_group_keys", ()):
                s.setdefault(key, self.defaults[key])  # a key added after the state_dict was saved (as torch does)
            s.setdefault("base_lr", s["lr"].clone() if isinstance(s["lr"], Tensor) else s["lr"])
        current = [p for g in self.param_groups for p in g["params"]]
        saved_index = {id(p): i for p, i in zip(current, (i for s in saved_groups for i in s["params"]))}
        saved_state = sd.get("state") or {}
        self._pull_state()
        states = {}
        for name, unit in self.units.items():
            if fmt == 2:
                raw = saved[name].get("state")
            else:
                raw = saved_state.get(saved_index[id(unit.primary)])
                if raw is None and unit.state is not None:
                    raise ValueError(f"state_dict has no state for unit {name!r} (parameter {unit.param_names[0]!r}, "
                                     f"index {saved_index[id(unit.primary)]})")
            like = record_view(unit.state) if unit.state is not None else None
            states[name] = unit.rule.state_from_dict(cast_state(raw, like, unit.primary), unit)
        pre, post = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            super().load_state_dict({"state": {}, "param_groups": saved_groups})
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = pre, post
        for g in self.param_groups:
            self._check_group(g)
        with torch.no_grad():
            for name, st in states.items():
                unit = self.units[name]
                # FSDP2: each rank keeps its rows
                unit.state = shard_record(st, unit.primary, unit.params, statistics=self.shard_statistics)
                unit.rule.restore(unit, self._group_of(unit.primary))
        self._publish_state()
        if extra is not None:
            self.skipped_steps = int(extra.get("skipped_steps", 0))
        self._sync_capture()
        for hook in post.values():
            hook(self)
