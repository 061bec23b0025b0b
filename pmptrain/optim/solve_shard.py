r"""Solve sharding: with several ranks each closed-form (or iterative) unit is solved by one owner rank.

Under DDP, an unwrapped ``process_group`` or FSDP2 every rank holds the same statistics after the
rules' collectives (all-reduced second moments, all-gathered rows), so every rank would compute the
same solve. With solve sharding (``shard_solves=True``, the default with several ranks) each module
unit is given an **owner**; the rules still run their statistics' collectives on every rank, then
ask :meth:`~pmptrain.optim.rule.StepContext.solves` — a rank that does not own the unit returns
:meth:`~pmptrain.optim.rule.StepContext.deferred` instead of solving —, and the shell exchanges the
owners' results (:func:`exchange`) before the finiteness check, so every rank checks, applies and
commits identical updates and state records (bit for bit: they are the owner's tensors).

**Assignment** (:func:`assign_owners`, deterministic: it reads only the units' shapes, their order
and the union row counts every rank already holds after the agreement all-gather): each unit's solve
cost is estimated by :func:`solve_cost` (``m³ + n³ + mn(m+n)`` for an ``m×n`` weight solved in its
primal eigenbases, a side with ``N < dim`` rows in Gram form costing ``N²·dim + N³`` instead; per
group for grouped convolutions; the parameter count for channel and iterative units), then units are
taken in decreasing cost (ties: model order) and each goes to the rank with the least assigned cost
so far (ties: the lowest rank) — Graham's LPT rule, within 4/3 of the best balance.

**Exchange**: one ``all_gather_object`` of each rank's small descriptions (which parameters its
owned units update, with ``alpha``/``decay``; the state records with their tensors replaced by
placeholders; any exception its solves raised), then one ``broadcast`` per (owner rank, dtype) of a
flat buffer of the owner's update and state tensors. An exception on an owner reaches every rank:
``LinAlgError`` skips the step on every rank, anything else is raised on every rank.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .rule import Proposal, Unit, Update

__all__ = ["Deferred", "solve_cost", "assign_owners", "exchange", "SolveFailure"]


class Deferred:
    """What a non-owner rank proposes for a unit it does not solve: the owner's result replaces it."""

    __slots__ = ("unit",)

    def __init__(self, unit: str):
        self.unit = unit


class SolveFailure(RuntimeError):
    """An exception raised by a unit's rule on some rank, re-raised on every rank after the exchange."""


def _side(dim: int, rows: Optional[int]) -> float:
    if rows is not None and 0 < rows < dim:  # route "auto" takes the rows×rows Gram form
        return float(rows) ** 2 * dim + float(rows) ** 3
    return float(dim) ** 3


def solve_cost(unit: Unit, sizes: Optional[Dict[str, Tuple[int, int]]] = None) -> float:
    """Estimated flops of ``unit``'s solve, from shapes only (0 for parameter rules, which never
    defer). ``sizes``: ``{member: (samples, rows)}`` on the union batch (the rows N of each member
    choose the Gram form of a side with ``N < dim``)."""
    if not unit.rule.module_rule or not unit.members:
        return 0.0
    numel = float(sum(p.numel() for p in unit.params))
    kinds = getattr(unit.rule, "adapter_kinds", ())
    mb = unit.members[0]
    if getattr(unit.rule, "affine", False) and mb.weight is not None:
        m, n = mb.weight.shape[0], mb.weight[0].numel() if mb.weight.dim() > 1 else 1
        rows = None
        if sizes:
            rows = sum(sizes.get(x.name, (0, 0))[1] for x in unit.members) or None
        return _side(m, rows) + _side(n, rows) + float(m) * n * (m + n)
    if "grouped" in kinds and mb.weight is not None:
        g = int(getattr(mb.module, "groups", 1))
        m, n = mb.weight.shape[0] // g, mb.weight[0].numel()
        return g * (float(m) ** 3 + float(n) ** 3 + float(m) * n * (m + n))
    return numel


def assign_owners(units: Sequence[Unit], world: int, sizes=None) -> Dict[str, int]:
    """``{unit name: owner rank}`` by the greedy longest-processing-time rule (see the module
    docstring); deterministic given the units' order, shapes and ``sizes``."""
    costs = [(solve_cost(u, sizes), i, u.name) for i, u in enumerate(units)]
    load = [0.0] * world
    owners: Dict[str, int] = {}
    for cost, _, name in sorted(costs, key=lambda c: (-c[0], c[1])):
        r = min(range(world), key=lambda k: (load[k], k))
        owners[name] = r
        load[r] += cost
    return owners


# ------------------------------------------------------------------------------ exchange
@dataclass(frozen=True)
class _T:
    """A tensor placeholder in a description: index into the owner's buffer of ``dtype``."""

    dtype: torch.dtype
    offset: int
    shape: Tuple[int, ...]


class _Packer:
    def __init__(self):
        self.tensors: Dict[torch.dtype, List[Tensor]] = {}
        self.sizes: Dict[torch.dtype, int] = {}

    def tensor(self, t: Tensor) -> _T:
        t = t.detach()
        off = self.sizes.get(t.dtype, 0)
        self.tensors.setdefault(t.dtype, []).append(t.reshape(-1))
        self.sizes[t.dtype] = off + t.numel()
        return _T(t.dtype, off, tuple(t.shape))

    def strip(self, v):
        if isinstance(v, Tensor):
            return self.tensor(v)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return ("__rec__", type(v), {f.name: self.strip(getattr(v, f.name)) for f in dataclasses.fields(v)})
        if isinstance(v, dict):
            return {k: self.strip(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(self.strip(x) for x in v)
        return v


def _dress(v, bufs: Dict[torch.dtype, Tensor]):
    if isinstance(v, _T):
        n = 1
        for s in v.shape:
            n *= s
        return bufs[v.dtype][v.offset:v.offset + n].view(v.shape)
    if isinstance(v, tuple) and len(v) == 3 and v[0] == "__rec__":
        return v[1](**{k: _dress(x, bufs) for k, x in v[2].items()})
    if isinstance(v, dict):
        return {k: _dress(x, bufs) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_dress(x, bufs) for x in v)
    return v


def _describe(unit: Unit, prop: Optional[Proposal], packer: _Packer):
    if prop is None:
        return None
    index = {id(p): i for i, p in enumerate(unit.params)}
    ups = []
    for u in prop.updates:
        if id(u.param) not in index:
            raise RuntimeError(f"unit {unit.name!r}: an update of a parameter outside the unit cannot be exchanged")
        ups.append((index[id(u.param)], packer.strip(u.delta), u.alpha, packer.strip(u.value), u.decay))
    return ups, packer.strip(prop.state), packer.strip(prop.info)


def exchange(results: Dict[str, Any], units: Dict[str, Unit], owners: Dict[str, int], me: int,
             process_group, device) -> Tuple[Dict[str, Optional[Proposal]], List[Tuple[int, str, BaseException, str]]]:
    """Exchange the owners' results of the deferred units.

    ``results``: ``{unit name: Proposal | None | Deferred | BaseException}`` of every unit that
    asked :meth:`~pmptrain.optim.rule.StepContext.solves` on this rank (the same names on every
    rank), plus the exceptions of any other unit. Returns ``({name: Proposal or None}`` of the asked
    units, identical on every rank, ``[(rank, unit, exception or None, message)]`` of every rank's
    exceptions)."""
    world = dist.get_world_size(process_group)
    packer = _Packer()
    mine: Dict[str, Any] = {}
    errors = []
    for name, res in results.items():
        if isinstance(res, BaseException):
            errors.append((name, type(res).__name__, isinstance(res, torch.linalg.LinAlgError), str(res)))
        elif not isinstance(res, Deferred) and owners.get(name) == me:
            try:
                mine[name] = _describe(units[name], res, packer)
            except RuntimeError as exc:  # reported like a failed solve: no rank may leave the exchange
                results[name] = exc
                errors.append((name, type(exc).__name__, False, str(exc)))
    meta = {"units": mine, "errors": errors, "sizes": dict(packer.sizes)}
    gathered: List[Any] = [None] * world
    dist.all_gather_object(gathered, meta, group=process_group)
    failures = []
    for r, m in enumerate(gathered):
        for name, kind, linalg, msg in m["errors"]:
            local = results.get(name) if r == me else None
            failures.append((r, name, local if isinstance(local, BaseException) else None,
                             "LinAlgError" if linalg else f"{kind}: {msg}"))
    if failures:
        return {}, failures
    out: Dict[str, Optional[Proposal]] = {}
    for r, m in enumerate(gathered):
        bufs: Dict[torch.dtype, Tensor] = {}
        for dt in sorted(m["sizes"], key=str):
            if r == me:
                buf = torch.cat([t.to(device) for t in packer.tensors[dt]])
            else:
                buf = torch.empty(m["sizes"][dt], dtype=dt, device=device)
            src = r if process_group is None else dist.get_global_rank(process_group, r)
            dist.broadcast(buf, src=src, group=process_group)
            bufs[dt] = buf
        for name, desc in m["units"].items():
            if r == me:
                out[name] = results[name]
                continue
            if desc is None:
                out[name] = None
                continue
            ups, state, info = desc
            unit = units[name]
            updates = [Update(unit.params[i], delta=_dress(d, bufs), alpha=a, value=_dress(v, bufs), decay=dec)
                       for i, d, a, v, dec in ups]
            out[name] = Proposal(updates, _dress(state, bufs), _dress(info, bufs))
    return out, failures
