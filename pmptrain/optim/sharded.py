"""Whole-tensor stand-ins for FSDP2-sharded parameters during one optimizer step.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter is a ``DTensor`` holding one
shard (rows of dimension 0) per rank, and its ``.grad`` is the matching shard of the gradient
averaged over the ranks. E-MSA's closed form couples every entry of a unit's weight (``(δI + ρ̃ S)⁻¹``
acts on whole rows and columns), and the discrete rules with a per-tensor scale (ρ relative to the
tensor, TWN's threshold) reduce over the whole tensor, so a shard alone does not determine its
update. :class:`ShardedStep` gives the rules, for one step, plain tensors holding the whole
parameter and the whole gradient (one all-gather each), lets the shell run the step on them
exactly as in one process, and then copies each rank's rows of the updated tensors back into its
shard.

The update therefore equals the one a single process computes on the union batch: the captured
statistics of a module are summed over the ranks by the rules, as under DDP, and the gradients are
FSDP2's averages, as DDP's.

Optimizer state between steps stays sharded like the parameters (:func:`shard_record`): a record
field listed in its type's ``_param_shaped`` (the fallback's Adam moments and SGD momentum, the
discrete rules' accumulators, latent weights and their moments, Bop's EMA, a normalisation layer's
per-channel statistics) holds the primary parameter's shape, and is kept as a ``DTensor`` with that
parameter's mesh and placements (a listed field holding a list — the closed-form units' averaged
gradients ``grad_avg``, one per parameter of the unit — has each entry sharded like its own parameter): each rank stores its own rows, so that part of the state costs
1/world of its size per rank. The statistics of a module unit that couple all of its rows and
columns (E-MSA's covariances C_x, C_p and their eigenbases, kept between refreshes with
``stat_decay``/``stat_every``: ``n×n`` and ``m×m``, not parameter-shaped) are split by their own rows
the same way (``shard_statistics=True``, the default): rank r keeps the rows FSDP2 would give it of
a parameter with that many rows, so they too cost 1/world per rank between steps; vectors
(means, eigenvalues) and counters stay whole. ``shard_statistics=False`` keeps the matrices whole on
every rank.

Cost per step: one all-gather of every sharded parameter, of its gradient and of each of its
sharded state tensors, kept statistics included (the stand-ins), no collective to re-shard (each
rank keeps its rows of the result); memory during the step: the whole parameters, gradients and
state of every sharded unit (the stand-ins of all units exist together until the step is applied).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List

import torch
from torch import Tensor, nn

from .. import distributed as pdist
from .rule import Unit

__all__ = ["ShardedStep", "has_sharded_params", "whole_record", "shard_record", "state_bytes", "whole_state_dict"]


def has_sharded_params(params) -> bool:
    """Whether any of ``params`` is a ``DTensor`` (the model is sharded by FSDP2)."""
    return any(pdist.is_sharded(p) for p in params)


def _whole(v, cache=None):
    """``v`` with every DTensor inside (a record's fields, lists, dicts) replaced by its whole tensor:
    state records built from sharded parameters at construction hold DTensors. ``cache``: ``{id(t):
    whole}`` of DTensors gathered already (:func:`_dtensors_in`)."""
    if pdist.is_sharded(v):
        return cache[id(v)] if cache is not None and id(v) in cache else v.full_tensor()
    if isinstance(v, dict):
        return {k: _whole(x, cache) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_whole(x, cache) for x in v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return whole_record(v, cache)
    return v


def _dtensors_in(v, out: List[Tensor]) -> List[Tensor]:
    """Append every DTensor inside ``v`` (records, lists, tuples, dicts) to ``out``, in the order
    :func:`_whole` visits them."""
    if pdist.is_sharded(v):
        out.append(v)
    elif isinstance(v, dict):
        for x in v.values():
            _dtensors_in(x, out)
    elif isinstance(v, (list, tuple)):
        for x in v:
            _dtensors_in(x, out)
    elif dataclasses.is_dataclass(v) and not isinstance(v, type):
        for f in dataclasses.fields(v):
            _dtensors_in(getattr(v, f.name), out)
    return out


def whole_record(rec, cache=None):
    """A state record with every DTensor inside replaced by its whole tensor (a collective, unless
    ``cache`` — ``{id(t): whole}`` — holds it already)."""
    if rec is None or not dataclasses.is_dataclass(rec):
        return _whole(rec, cache)
    changes = {f.name: _whole(getattr(rec, f.name), cache) for f in dataclasses.fields(rec)}
    if all(changes[k] is getattr(rec, k) for k in changes):
        return rec
    return dataclasses.replace(rec, **changes)


def _shardable(v, param) -> bool:
    return (isinstance(v, Tensor) and param is not None and pdist.is_sharded(param) and not pdist.is_sharded(v)
            and tuple(v.shape) == tuple(param.shape) and v.dim() > 0)


def _shard_rows(whole: Tensor, param) -> Tensor:
    """This rank's rows of ``whole`` (a tensor of one or more dimensions: a parameter-shaped moment,
    a covariance, an eigenbasis) as a ``DTensor`` with ``param``'s mesh and placements, split along
    its own dimension 0 as FSDP2 splits a parameter of that many rows — for a tensor of ``param``'s
    shape, the rows of ``param``'s own shard (no collective: sliced locally, then copied, so that
    the whole tensor is freed)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(whole.shape, param.device_mesh, param.placements)
    local = whole[offset[0]:offset[0] + shape[0]]
    return DTensor.from_local(local.detach().clone(), param.device_mesh, param.placements, run_check=False,
                              shape=whole.shape, stride=torch.empty(whole.shape, device="meta").stride())


def _shard_stats(v, param):
    """``v`` (a field of a record, nested records, lists, tuples and dicts included) with every plain
    tensor of two or more dimensions — the n×n statistics of a module unit and their eigenbases —
    replaced by this rank's rows of it (:func:`_shard_rows`); vectors, scalars and numbers stay whole
    (``v`` itself when nothing changes)."""
    if isinstance(v, Tensor):
        return _shard_rows(v, param) if v.dim() >= 2 and not pdist.is_sharded(v) else v
    if isinstance(v, dict):
        new = {k: _shard_stats(x, param) for k, x in v.items()}
        return new if any(new[k] is not v[k] for k in v) else v
    if isinstance(v, (list, tuple)):
        new = type(v)(_shard_stats(x, param) for x in v)
        return new if any(a is not b for a, b in zip(new, v)) else v
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        changes = {f.name: _shard_stats(getattr(v, f.name), param) for f in dataclasses.fields(v)}
        changes = {k: x for k, x in changes.items() if x is not getattr(v, k)}
        return dataclasses.replace(v, **changes) if changes else v
    return v


def shard_record(rec, param, params=None, statistics: bool = True):
    """``rec`` as a rank keeps it between steps under FSDP2: every tensor in it a ``DTensor`` with
    ``param``'s mesh and placements, each rank holding its rows of dimension 0.

    * Each field its type lists in ``_param_shaped`` that holds a plain tensor of ``param``'s
      (global) shape: this rank's rows of it, the rows of ``param``'s own shard; a listed field
      holding a list (``grad_avg``: one tensor per parameter of the unit, in ``params`` order, the
      unit's ``params``) has each entry sharded like its own parameter.
    * Every other tensor of two or more dimensions, in nested records too (a module unit's kept
      covariances ``C_x``, ``C_p`` and their eigenbases, ``n×n`` and ``m×m``): its own rows split as
      FSDP2 would split a parameter of that many rows (:func:`_shard_stats`), so that each rank
      stores ``1/world`` of them; :func:`whole_record` gathers them for the step.
      ``statistics=False`` (the optimizer's ``shard_statistics=False``) keeps them whole.
    * Vectors (means, eigenvalues, index counts), scalars and counters stay whole.

    ``param`` is the unit's primary parameter; ``rec`` itself when no parameter is sharded or
    nothing changes."""
    params = list(params) if params is not None else [param]
    if rec is None or not dataclasses.is_dataclass(rec) or not any(pdist.is_sharded(p) for p in params + [param]):
        return rec
    changes = {}
    listed = getattr(type(rec), "_param_shaped", ())
    for name in listed:
        v = getattr(rec, name)
        if isinstance(v, list):
            new = [_shard_rows(t, p) if _shardable(t, p) else t
                   for t, p in zip(v, params + [None] * (len(v) - len(params)))]
            if any(a is not b for a, b in zip(new, v)):
                changes[name] = new
        elif _shardable(v, param):
            changes[name] = _shard_rows(v, param)
    mesh_of = param if pdist.is_sharded(param) else next(p for p in params if pdist.is_sharded(p))
    for f in dataclasses.fields(rec) if statistics else ():
        if f.name in listed:
            continue
        v = getattr(rec, f.name)
        new = _shard_stats(v, mesh_of)
        if new is not v:
            changes[f.name] = new
    return dataclasses.replace(rec, **changes) if changes else rec


def whole_state_dict(sd):
    """An optimizer ``state_dict()`` with every ``DTensor`` replaced by its whole tensor (a collective
    per sharded tensor: every rank calls it, in the same order): what one rank can ``torch.save``
    and any number of ranks load (``load_state_dict`` shards it again)."""
    return _whole(sd)


def state_bytes(opt) -> Dict[str, int]:
    """The bytes of optimizer state this rank stores, from ``opt.state``: ``"sharded"`` — the local
    shards of ``DTensor`` state (1/world of it per rank, to the rows of each shard), ``"whole"`` —
    plain tensors (module statistics, eigenbases, state of unsharded parameters, step counters).
    No collective."""
    out = {"sharded": 0, "whole": 0}
    seen = set()

    def walk(v):
        if isinstance(v, Tensor):
            if id(v) in seen:
                return
            seen.add(id(v))
            if pdist.is_sharded(v):
                loc = v.to_local()
                out["sharded"] += loc.numel() * loc.element_size()
            else:
                out["whole"] += v.numel() * v.element_size()
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    for d in opt.state.values():
        walk(d)
    return out


class ShardedStep:
    """Stand-ins for the sharded parameters of ``units`` during one step.

    ``unit(u)`` is ``u`` with every sharded parameter replaced by a plain tensor holding the whole
    parameter, whose ``.grad`` holds the whole gradient (same names, members, state and scratch);
    ``group_of`` gains the stand-ins (a stand-in is in its parameter's group); ``write_back()``
    copies the stand-ins' values into the shards after the step was applied to them.
    """

    def __init__(self, units: Dict[str, Unit], group_of: Dict[int, dict], names: Dict[int, str]):
        self._whole: Dict[int, Tensor] = {}
        self._pairs: List[tuple] = []  # (sharded parameter, its stand-in)
        self._real: Dict[int, Tensor] = {}  # id(stand-in) → its sharded parameter
        self.units: Dict[str, Unit] = {}
        self.group_of = dict(group_of)
        todo = [unit for unit in units.values() if any(pdist.is_sharded(p) for p in unit.params)]
        # every sharded parameter of those units, its gradient and every DTensor of their records,
        # gathered whole together (pdist.full_tensors: one all-gather per mesh and dtype)
        params, seen = [], set()
        for unit in todo:
            for p in (*unit.params, *(q for m in unit.members for q in (m.weight, m.bias))):
                if p is not None and pdist.is_sharded(p) and id(p) not in seen:
                    pdist.check_placements(names.get(id(p), "?"), p)
                    seen.add(id(p))
                    params.append(p)
        leaves = params + [p.grad for p in params if p.grad is not None]
        for unit in todo:
            _dtensors_in(unit.state, leaves)
        cache = {id(t): w for t, w in zip(leaves, pdist.full_tensors(leaves))}
        sharded = {id(unit) for unit in todo}
        for key, unit in units.items():
            self.units[key] = self._stand_in_unit(unit, cache) if id(unit) in sharded else unit

    def _stand_in(self, p, cache: Dict[int, Tensor]) -> Tensor:
        if p is None or not pdist.is_sharded(p):
            return p
        key = id(p)
        if key not in self._whole:
            whole = nn.Parameter(cache[key].detach(), requires_grad=p.requires_grad)
            if p.grad is not None:
                whole.grad = cache[id(p.grad)].detach()
            self._whole[key] = whole
            self._pairs.append((p, whole))
            self._real[id(whole)] = p
            self.group_of[id(whole)] = self.group_of[key]
        return self._whole[key]

    def _stand_in_unit(self, unit: Unit, cache: Dict[int, Tensor]) -> Unit:
        members = [dataclasses.replace(m, weight=self._stand_in(m.weight, cache), bias=self._stand_in(m.bias, cache))
                   for m in unit.members]
        new = dataclasses.replace(unit, params=[self._stand_in(p, cache) for p in unit.params], members=members)
        new.scratch = unit.scratch  # the same buffers: reused between steps as in one process
        new.state = whole_record(unit.state, cache)
        return new

    def real(self, p: Tensor) -> Tensor:
        """The sharded parameter of the stand-in ``p`` (``p`` itself when it is no stand-in)."""
        return self._real.get(id(p), p)

    def grads_present(self, params: List[Tensor]) -> List[Tensor]:
        """``params`` with every sharded parameter replaced by its stand-in."""
        return [self._whole.get(id(p), p) for p in params]

    @staticmethod
    def keep(real: Unit, state, statistics: bool = True):
        """The record to keep between steps for ``real`` (the unit, not its stand-in) after the step
        proposed ``state`` (whole tensors): its parameter-shaped fields sharded like the unit's
        primary parameter, its per-parameter lists (``grad_avg``) like each parameter, and (with
        ``statistics``) its matrices split by their own rows (:func:`shard_record`)."""
        return shard_record(state, real.primary, real.params, statistics=statistics)

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy every stand-in's rows into its parameter's local shard."""
        for p, whole in self._pairs:
            pdist.write_local_(p, whole.detach())
