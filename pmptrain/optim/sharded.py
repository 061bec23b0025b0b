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
``stat_decay``/``stat_every``) are replicated: every rank holds the whole of them, as every rank
holds the summed statistics they are computed from.

Cost per step: one all-gather of every sharded parameter, of its gradient and of each of its
sharded state tensors (the stand-ins), no collective to re-shard (each rank keeps its rows of the
result); memory during the step: the whole parameters, gradients and state of every sharded unit
(the stand-ins of all units exist together until the step is applied).
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


def _whole(v):
    """``v`` with every DTensor inside (a record's fields, lists, dicts) replaced by its whole tensor:
    state records built from sharded parameters at construction hold DTensors."""
    if pdist.is_sharded(v):
        return v.full_tensor()
    if isinstance(v, dict):
        return {k: _whole(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_whole(x) for x in v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return whole_record(v)
    return v


def whole_record(rec):
    """A state record with every DTensor inside replaced by its whole tensor (a collective)."""
    if rec is None or not dataclasses.is_dataclass(rec):
        return _whole(rec)
    changes = {f.name: _whole(getattr(rec, f.name)) for f in dataclasses.fields(rec)}
    if all(changes[k] is getattr(rec, k) for k in changes):
        return rec
    return dataclasses.replace(rec, **changes)


def _shard_like(whole: Tensor, param) -> Tensor:
    """This rank's rows of ``whole`` (a tensor of ``param``'s global shape) as a ``DTensor`` with
    ``param``'s mesh and placements (no collective: the rows are sliced locally)."""
    from torch.distributed.tensor import DTensor

    offset, length = pdist.local_rows(param)
    local = whole[offset:offset + length] if whole.dim() else whole
    return DTensor.from_local(local.detach().clone(), param.device_mesh, param.placements, run_check=False,
                              shape=whole.shape, stride=torch.empty(whole.shape, device="meta").stride())


def _shardable(v, param) -> bool:
    return (isinstance(v, Tensor) and param is not None and pdist.is_sharded(param) and not pdist.is_sharded(v)
            and tuple(v.shape) == tuple(param.shape) and v.dim() > 0)


def shard_record(rec, param, params=None):
    """``rec`` with each field its type lists in ``_param_shaped`` that holds a plain tensor of
    ``param``'s (global) shape replaced by this rank's rows of it, a ``DTensor`` sharded like
    ``param`` (a ``DTensor`` of FSDP2); a listed field holding a list (``grad_avg``: one tensor per
    parameter of the unit, in ``params`` order, the unit's ``params``) has each entry sharded like
    its own parameter. Other fields (a module's covariances and eigenbases, counters) stay whole;
    ``rec`` itself when no parameter is sharded or nothing changes."""
    params = list(params) if params is not None else [param]
    if rec is None or not dataclasses.is_dataclass(rec) or not any(pdist.is_sharded(p) for p in params + [param]):
        return rec
    changes = {}
    for name in getattr(type(rec), "_param_shaped", ()):
        v = getattr(rec, name)
        if isinstance(v, list):
            new = [_shard_like(t, p) if _shardable(t, p) else t
                   for t, p in zip(v, params + [None] * (len(v) - len(params)))]
            if any(a is not b for a, b in zip(new, v)):
                changes[name] = new
        elif _shardable(v, param):
            changes[name] = _shard_like(v, param)
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
        for key, unit in units.items():
            if any(pdist.is_sharded(p) for p in unit.params):
                unit = self._stand_in_unit(unit, names)
            self.units[key] = unit

    def _stand_in(self, p, names: Dict[int, str]) -> Tensor:
        if p is None or not pdist.is_sharded(p):
            return p
        key = id(p)
        if key not in self._whole:
            pdist.check_placements(names.get(key, "?"), p)
            with torch.no_grad():
                whole = nn.Parameter(p.full_tensor().detach().clone(), requires_grad=p.requires_grad)
            if p.grad is not None:
                whole.grad = pdist.full_tensor(p.grad).detach()
            self._whole[key] = whole
            self._pairs.append((p, whole))
            self._real[id(whole)] = p
            self.group_of[id(whole)] = self.group_of[key]
        return self._whole[key]

    def _stand_in_unit(self, unit: Unit, names: Dict[int, str]) -> Unit:
        members = [dataclasses.replace(m, weight=self._stand_in(m.weight, names), bias=self._stand_in(m.bias, names))
                   for m in unit.members]
        new = dataclasses.replace(unit, params=[self._stand_in(p, names) for p in unit.params], members=members)
        new.scratch = unit.scratch  # the same buffers: reused between steps as in one process
        new.state = whole_record(unit.state)
        return new

    def real(self, p: Tensor) -> Tensor:
        """The sharded parameter of the stand-in ``p`` (``p`` itself when it is no stand-in)."""
        return self._real.get(id(p), p)

    def grads_present(self, params: List[Tensor]) -> List[Tensor]:
        """``params`` with every sharded parameter replaced by its stand-in."""
        return [self._whole.get(id(p), p) for p in params]

    @staticmethod
    def keep(real: Unit, state):
        """The record to keep between steps for ``real`` (the unit, not its stand-in) after the step
        proposed ``state`` (whole tensors): its parameter-shaped fields sharded like the unit's
        primary parameter, its per-parameter lists (``grad_avg``) like each parameter
        (:func:`shard_record`)."""
        return shard_record(state, real.primary, real.params)

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy every stand-in's rows into its parameter's local shard."""
        for p, whole in self._pairs:
            pdist.write_local_(p, whole.detach())
