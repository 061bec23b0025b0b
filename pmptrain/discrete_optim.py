r"""Discrete-weight MSA (Li & Hao, ICML 2018) as a torch optimizer: :class:`DiscreteMSA`.

The optimizer is the shell of :mod:`pmptrain.optim` (torch.optim contract, fallback, non-finite
guard, GradScaler, distributed gradient averaging) with one more module kind, ``"discrete"``, whose
update is the pure rule of :mod:`pmptrain.discrete` (``ALGORITHMS.md`` §3; derivation in
``docs/discrete.md``). :class:`GroupScheduler` schedules any param-group key (ρ, λ, the EMA rate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .discrete import (
    Grid,
    discrete_argmax,
    discrete_msa_delta,
    has_fast_path,
    penalty_scale,
    relative_lambda,
)
from .optim import EMSA, _unwrap
from .quant import DiscreteTensor, ScaleParametrization, discrete_parameters, is_discrete_module

__all__ = ["DiscreteMSA", "GroupScheduler", "DiscreteDiagnostics"]

_ACC_INIT_MAX = 1e-6


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class DiscreteDiagnostics(Mapping):
    """Diagnostics of the discrete tensors in one step, computed lazily.

    The step stores 0-dim tensors and references to the step's ``W_new − W`` and new accumulator
    (neither is modified afterwards); flips and ``|M|`` mean are counted, and everything converted
    with one ``torch.stack(...).tolist()``, only on first access — a loop that does not read the
    diagnostics pays nothing for them. Keys:

    * ``"layers"``: ``{module name: {"flips", "numel", "flip_ratio", "density", "rho_k",
      "acc_abs_mean", "acc_abs_max"}}`` — flips: entries that changed; density: fraction of non-zero
      codes after the step (1.0 on grids without 0); ``rho_k``: the absolute penalty ``ρ·max_wrong|M|``
      used (0 ⇔ empty wrong set, tensor unchanged); ``acc_abs_*``: statistics of the updated ``|M|``.
    * ``"total"``: ``{"flips", "numel", "flip_ratio", "density"}`` over all discrete tensors updated.

    Empty (``layers == {}``) when the step was skipped.
    """

    _KEYS = ("flips", "density_nnz", "rho_k", "acc_abs_sum", "acc_abs_max")

    def __init__(self, raw: Optional[Dict[str, Dict[str, Any]]] = None):
        self._raw = raw or {}
        self._data: Optional[Dict[str, Any]] = None

    def _materialise(self) -> Dict[str, Any]:
        if self._data is not None:
            return self._data
        names = list(self._raw)
        vals: List[List[float]] = []
        if names:
            flat = []
            for n in names:
                r = self._raw[n]
                r.setdefault("flips", torch.count_nonzero(r.pop("delta")))
                r.setdefault("acc_abs_sum", r.pop("acc").abs().sum(dtype=torch.float64))
                flat += [torch.as_tensor(r[k]).detach().to("cpu", torch.float64).reshape(()) for k in self._KEYS]
            allv = torch.stack(flat).tolist()
            vals = [allv[i * len(self._KEYS):(i + 1) * len(self._KEYS)] for i in range(len(names))]
        layers, flips_t, numel_t, nnz_t = {}, 0, 0, 0.0
        for n, v in zip(names, vals):
            numel = int(self._raw[n]["numel"])
            flips, nnz, rho_k, acc_sum, acc_max = v
            layers[n] = {
                "flips": int(flips), "numel": numel, "flip_ratio": flips / numel if numel else 0.0,
                "density": nnz / numel if numel else 0.0, "rho_k": rho_k,
                "acc_abs_mean": acc_sum / numel if numel else 0.0, "acc_abs_max": acc_max,
            }
            flips_t, numel_t, nnz_t = flips_t + int(flips), numel_t + numel, nnz_t + nnz
        total = {"flips": flips_t, "numel": numel_t, "flip_ratio": flips_t / numel_t if numel_t else 0.0,
                 "density": nnz_t / numel_t if numel_t else 0.0}
        self._data = {"layers": layers, "total": total}
        return self._data

    def __getitem__(self, key):
        return self._materialise()[key]

    def __iter__(self):
        return iter(("layers", "total"))

    def __len__(self) -> int:
        return 2

    def __repr__(self) -> str:
        return f"DiscreteDiagnostics({self._materialise()!r})"


class DiscreteMSA(EMSA):
    r"""Latent-free discrete-weight method of successive approximations (Li & Hao, ICML 2018).

    For every discrete weight tensor ``W`` (codes on a grid ``Q``, see
    :func:`pmptrain.quant.discretize_`) and every step, with ``g = −∇_W J`` the Hamiltonian gradient
    (one ordinary ``loss.backward()``; ``ALGORITHMS.md`` §1, §3):

    .. math::

        M &← a·M + (1−a)·g                                         \quad\text{(EMA, state "accumulator")}\\
        ρ_k &= ρ · \max\{|M_{ij}| : W_{ij} ∉ \arg\max_{q∈Q} [M_{ij} q − λ|q|]\}  \quad(0 \text{ if empty})\\
        W_{ij} &← \arg\max_{q∈Q}\ [M_{ij}q − λ|q| − \tfrac{ρ_k}{2}(q − W_{ij})^2]   \quad\text{(ties keep } W_{ij})

    Binary: ``W_ij`` flips iff ``−M_ij W_ij > ρ_k``; ρ = 0 flips every wrong sign, ρ ≥ 1 freezes.
    Ternary: λ ≥ 0 acts through the thresholds (sparsity). An empty wrong set leaves ``W`` unchanged.
    The binary and ternary grids use the fused rule :func:`pmptrain.discrete.discrete_msa_delta`
    (identical decisions, no host synchronisation); other grids the reference
    :func:`~pmptrain.discrete.penalty_scale` + :func:`~pmptrain.discrete.discrete_argmax`.

    Every other parameter — BatchNorm affine, biases (also of discrete layers), trainable scales α,
    kept full-precision layers — takes the fallback step (Adam/SGD on ``−∇J``, i.e. ascent on H),
    or, with ``continuous="emsa"``, kept ``Linear``/``Conv`` layers take the closed-form
    :class:`~pmptrain.optim.EMSA` step (``lr=emsa_lr``, ρ = ``emsa_rho``).

    Args:
        model: the model (or its ``DistributedDataParallel`` wrapper) after ``discretize_``; it must
            hold at least one discrete tensor.
        params: optional parameters / param-group dicts (default: all trainable parameters, one
            group). Every key below may be set per group (schedules: :class:`GroupScheduler`, or
            assign ``group["rho"]`` directly). A module's parameters must share one group.
        rho: ρ ≥ 0, the *relative* penalty (default 0.5, the reference binary value; their ternary
            ``ρ = 0.25`` with a full-square penalty is ρ = 0.5 here).
        decay: the EMA rate ``a ∈ [0, 1]`` (default 0.999).
        lam: λ ≥ 0, sparsity weight (default 0; the reference ternary runs use 1e-7). No effect on
            binary grids.
        decay_gamma: γ ∈ (0, 1]; :meth:`end_epoch` sets ``1−a ← max(γ(1−a), decay_floor)`` (default
            1.0: constant; the reference protocol uses 0.95, 0.98 on CIFAR-10).
        decay_floor: lower bound of ``1−a`` in :meth:`end_epoch`, in [0, 1) (default 0.0; a value
            already below it is left alone).
        rho_scope: ``"tensor"`` (default, the reference: one ``ρ_k = ρ·max_wrong|M|`` per tensor) or
            ``"channel"`` (one per output row / filter, :func:`~pmptrain.discrete.penalty_scale`).
            Measured on Fashion-MNIST: ``"channel"`` is worse (it forces a flip in every row every step).
        lam_mode: ``"absolute"`` (default, the reference: λ as given) or ``"relative"``
            (``λ_k = λ·max|M|`` over the same scope, :func:`~pmptrain.discrete.relative_lambda`;
            scale-free like ρ). Recommended ternary setting from ``docs/discrete.md`` §6:
            ``rho=0.95, lam=0.2, lam_mode="relative"`` (≤ 10 % non-zero); binary ``rho=0.95``.
        acc_init: ``M`` starts at ``acc_init·sgn(W)`` with ``sgn(0) = +1``: tiny, never exactly 0,
            deterministic, and agreeing with the current signs, so that a binary weight is never
            "wrong" before data was seen and a weight whose gradient stays exactly 0 (dead unit)
            keeps its sign. In (0, 1e-6] (default 1e-12: a tie-breaker only — one step of
            ``(1−a)·∇J`` with ``1−a = 1e-3`` and per-weight gradients ~1e-6–1e-4 is 1e3–1e5 times
            larger). Ternary zero codes start at ``+acc_init``: with λ < acc_init they are "wrong"
            by that amount, which moves them only if every other wrong ``|M|`` in the tensor is as
            tiny (e.g. an exactly-zero gradient for the whole tensor).
        continuous: ``"fallback"`` (default) or ``"emsa"`` — the rule of kept full-precision
            ``Linear``/``Conv`` layers. Default fallback: the reference protocol has no kept layers,
            and with BatchNorm after every layer Adam at 1e-3 is what trains the rest there; it is
            also what the baselines (BinaryConnect, TWN, Bop) use, so comparisons stay fair.
        emsa_lr, emsa_rho: ``lr`` (δ = 1/lr) and ρ of the closed-form E-MSA for those layers
            (defaults 1.0 and 1.0, :class:`~pmptrain.optim.EMSA`'s). ``emsa_lr`` is the group's
            ``"lr"`` key (what a torch LR scheduler changes); it does not affect discrete tensors.
        fallback, fallback_lr, betas, eps, momentum, weight_decay: the fallback step (defaults
            ``"adam"``, 1e-3, (0.9, 0.999), 1e-8, 0.9, 0), as in :class:`~pmptrain.optim.EMSA`.
        exclude: module names whose parameters take the fallback step (for a discrete module:
            its codes would then be updated by Adam and leave the grid — do not).
        strict: raise instead of warning for modules without a rule.
        process_group: ``torch.distributed`` group for unwrapped models (default world). Gradients
            are averaged over ranks (by DDP, or by the shell), so every rank computes the same ``M``
            and the same codes.

    Diagnostics: after each step ``opt.last_step["discrete"]`` is a :class:`DiscreteDiagnostics`
    (per-layer flip ratio, density, ρ_k, ``|M|`` mean/max, totals), converted lazily.

    Note:
        * ``g`` is the gradient w.r.t. the *codes*; with a scale ``W_eff = α·codes`` it is
          ``α·∇_{W_eff}J``, the Hamiltonian gradient of the control the optimizer owns. With a
          per-tensor α the rule is unchanged (ρ is relative); per-channel α weight the channels.
        * ``rho_k`` is per tensor and per step; no latent real weights: memory is one accumulator
          per discrete weight.

    Reference: Q. Li, S. Hao, "An Optimal Control Approach to Deep Learning and Applications to
    Discrete-Weight Neural Networks", ICML 2018.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Optional[Iterable] = None,
        *,
        rho: float = 0.5,
        decay: float = 0.999,
        lam: float = 0.0,
        decay_gamma: float = 1.0,
        decay_floor: float = 0.0,
        rho_scope: str = "tensor",
        lam_mode: str = "absolute",
        acc_init: float = 1e-12,
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
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if continuous not in ("fallback", "emsa"):
            raise ValueError(f"invalid continuous={continuous!r}: must be 'fallback' or 'emsa'")
        if not (_number(acc_init) and 0.0 < acc_init <= _ACC_INIT_MAX):
            raise ValueError(f"invalid acc_init={acc_init!r}: must be a number in (0, {_ACC_INIT_MAX}]")
        self.continuous = continuous
        self.acc_init = float(acc_init)
        dts = discrete_parameters(_unwrap(model))
        if not dts:
            raise ValueError("model: it has no discrete weights; call pmptrain.discretize_(model, ...) first")
        self._discrete: Dict[int, DiscreteTensor] = {id(d.param): d for d in dts}
        self._extra_defaults = dict(decay=decay, lam=lam, decay_gamma=decay_gamma,
                                    decay_floor=decay_floor, emsa_rho=emsa_rho,
                                    rho_scope=rho_scope, lam_mode=lam_mode)
        self._pending: Dict[str, Dict[str, Any]] = {}
        super().__init__(
            model, params, lr=emsa_lr, rho=rho, fallback=fallback, fallback_lr=fallback_lr,
            betas=betas, eps=eps, momentum=momentum, weight_decay=weight_decay, exclude=exclude,
            strict=strict, process_group=process_group,
        )
        self.defaults.update(self._extra_defaults)
        self.last_step["discrete"] = DiscreteDiagnostics()

    # ------------------------------------------------------------------ hyper-parameters
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if isinstance(param_group, dict):
            param_group = dict(param_group)
            for k, v in self._extra_defaults.items():
                param_group.setdefault(k, v)
        super().add_param_group(param_group)

    def _validate_group(self, group: Dict[str, Any]) -> None:
        super()._validate_group(group)

        def check(key, cond, what):
            if not cond(group[key]):
                raise ValueError(f"invalid {key}={group[key]!r}: {what}")

        check("rho", lambda v: _number(v) and v >= 0, "must be a finite number >= 0")
        check("decay", lambda v: _number(v) and 0 <= v <= 1, "must be a number in [0, 1]")
        check("lam", lambda v: _number(v) and v >= 0, "must be a finite number >= 0")
        check("decay_gamma", lambda v: _number(v) and 0 < v <= 1, "must be a number in (0, 1]")
        check("decay_floor", lambda v: _number(v) and 0 <= v < 1, "must be a number in [0, 1)")
        check("emsa_rho", lambda v: _number(v) and v >= 0, "must be a finite number >= 0")
        check("rho_scope", lambda v: v in ("tensor", "channel"), "must be 'tensor' or 'channel'")
        check("lam_mode", lambda v: v in ("absolute", "relative"), "must be 'absolute' or 'relative'")

    def end_epoch(self) -> None:
        """The per-epoch EMA schedule of every group: ``1−a ← max(γ·(1−a), floor)`` with
        ``a = group["decay"]``, ``γ = group["decay_gamma"]``, ``floor = group["decay_floor"]``
        (a ``1−a`` already at or below the floor is kept). Call once at the end of every epoch."""
        for g in self.param_groups:
            one_minus = 1.0 - float(g["decay"])
            if one_minus > g["decay_floor"]:
                g["decay"] = 1.0 - max(g["decay_gamma"] * one_minus, g["decay_floor"])

    # ------------------------------------------------------------------ module selection
    def _module_kind(self, name: str, module: nn.Module) -> Optional[str]:
        own = list(module.parameters(recurse=False))
        if any(id(p) in self._discrete for p in own):
            return "discrete"  # owns the codes: the Linear/Conv itself, or its ParametrizationList
        if isinstance(module, ScaleParametrization):
            return "fallback"  # trainable α
        if is_discrete_module(module) or parametrize.is_parametrized(module, "weight"):
            return "fallback"  # a parametrized discrete layer: its own parameter is the bias
        if self.continuous == "emsa":
            return super()._module_kind(name, module)
        return "fallback"

    def _kind_needs_capture(self, kind: str) -> bool:
        return kind != "discrete"

    # ------------------------------------------------------------------ the update
    def _module_update(self, name, module, kind, records, group, inv_scale):
        if kind != "discrete":
            return super()._module_update(name, module, kind, records, dict(group, rho=group["emsa_rho"]), inv_scale)
        updates: List[Tuple[Tensor, Tensor]] = []
        commits: List[Callable[[], None]] = []
        for p in module.parameters(recurse=False):
            if p.grad is None:
                continue
            grad = p.grad if inv_scale == 1.0 else p.grad * inv_scale
            d = self._discrete.get(id(p))
            if d is None:  # the bias of a discrete Linear/Conv without scale
                delta, commit = self._fallback_update(p, grad, group)
                updates.append((p, delta))
                commits.append(commit)
                continue
            delta, commit = self._discrete_update(d, p, grad, group)
            updates.append((p, delta))
            commits.append(commit)
        return updates, commits

    def _discrete_update(self, d: DiscreteTensor, p: Tensor, grad: Tensor, group):
        """``(W_new − W, commit)`` for one discrete tensor; the state is written by ``commit`` only."""
        state = self.state[p]
        a, rho, lam = float(group["decay"]), float(group["rho"]), float(group["lam"])
        w = p.detach()
        grid: Grid = d.grid
        fast = has_fast_path(grid)
        ternary = grid.values == (-1.0, 0.0, 1.0)
        acc = state.get("accumulator")
        if acc is None:  # M_0 = acc_init · sgn(W), sgn(0) = +1
            acc = torch.where(w >= 0, self.acc_init, -self.acc_init).to(w.dtype)
        # M ← a·M + (1−a)·(−∇J): the same operations as ema_accumulate_(M, −grad, a), out of place.
        # (Reusing persistent buffers here and for delta was measured: no gain within noise on CPU —
        # the allocator recycles the freed accumulator — at +2 floats per weight; not done.)
        new_acc = acc.mul(a).add_(grad.to(w.dtype), alpha=-(1.0 - a))
        scope = group["rho_scope"] if w.dim() >= 2 else "tensor"
        if group["lam_mode"] == "relative":
            lam = relative_lambda(new_acc, lam, scope)
        new_w = None
        if fast:
            delta, rho_k, acc_max = discrete_msa_delta(w, new_acc, grid, rho, lam, scope)
        else:
            rho_k, _ = penalty_scale(new_acc, w, grid, rho, lam, scope=scope)
            new_w = discrete_argmax(w, new_acc, grid, rho_k, lam)
            delta = new_w - w
            acc_max = new_acc.abs().amax()
        if rho_k.dim():
            rho_k = rho_k.amax()  # diagnostics: the largest per-channel ρ_k
        name, numel = d.name, w.numel()

        def commit():
            if new_w is not None:  # W + (W_new − W) may round off the grid: write the codes exactly
                p.copy_(new_w)
            state["accumulator"] = new_acc
            state["step"] = int(state.get("step", 0)) + 1
            if not grid.has_zero:
                nnz = torch.tensor(float(numel))
            elif ternary:  # Σ W² counts the non-zero codes exactly (integers < 2^24 per partial sum)
                flat = p.detach().reshape(-1)
                nnz = torch.dot(flat, flat)
            else:
                nnz = torch.count_nonzero(p)
            self._pending[name] = {
                "delta": delta, "acc": new_acc, "numel": numel, "rho_k": rho_k,
                "acc_abs_max": acc_max, "density_nnz": nnz,
            }

        return delta, commit

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        """One step (see the class docstring); ``closure`` as for :class:`~pmptrain.optim.EMSA`."""
        self._pending = {}
        try:
            return super().step(closure)
        finally:
            self.last_step["discrete"] = DiscreteDiagnostics(self._pending)
            self._pending = {}


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
