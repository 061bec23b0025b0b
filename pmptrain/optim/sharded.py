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
FSDP2's averages, as DDP's. Cost per step: one all-gather of every parameter and every gradient;
memory: the whole parameters, gradients and optimizer state of every unit on every rank (the
optimizer state is replicated, not sharded).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List

import torch
from torch import Tensor, nn

from .. import distributed as pdist
from .rule import Unit

__all__ = ["ShardedStep", "has_sharded_params", "whole_record"]


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
            self.group_of[id(whole)] = self.group_of[key]
        return self._whole[key]

    def _stand_in_unit(self, unit: Unit, names: Dict[int, str]) -> Unit:
        members = [dataclasses.replace(m, weight=self._stand_in(m.weight, names), bias=self._stand_in(m.bias, names))
                   for m in unit.members]
        new = dataclasses.replace(unit, params=[self._stand_in(p, names) for p in unit.params], members=members)
        new.scratch = unit.scratch  # the same buffers: reused between steps as in one process
        new.state = whole_record(unit.state)
        return new

    def grads_present(self, params: List[Tensor]) -> List[Tensor]:
        """``params`` with every sharded parameter replaced by its stand-in."""
        return [self._whole.get(id(p), p) for p in params]

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy every stand-in's rows into its parameter's local shard."""
        for p, whole in self._pairs:
            pdist.write_local_(p, whole.detach())
