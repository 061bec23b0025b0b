"""What the ranks must agree on before a distributed step's collectives, and the batch weights.

Before any collective whose shapes depend on what a rank's forward and backward passes did, the
shell all-gathers one small integer vector per rank (:func:`local_signature`): which parameters have
a gradient, and per captured module the samples, rows and recorded calls since the last
``zero_grad()``. From that table — identical on every rank — :func:`check_agreement` raises the same
``RuntimeError`` on every rank when the ranks ran different modules (instead of a hang, a gloo abort
or a silent drift), the union sizes replace per-module all-reductions, and :func:`grad_weights`
weights each rank's gradient by its share of the samples (a rank's loss is the mean over its own
batch, so the union batch's gradient is ``Σ_r (B_r/B)·∇J_r``).
"""

from __future__ import annotations

import zlib
from fractions import Fraction
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["structure_signature", "check_structure", "local_signature", "check_agreement", "union_sizes",
           "unit_samples", "grad_weights", "check_uniform_for_wrapper"]

_SHOW = 6  # names listed per mismatch


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOW])
    return shown + (f" and {len(names) - _SHOW} more" if len(names) > _SHOW else "")


def _ranks(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def _keys(u) -> List[str]:
    """The capture keys of a module unit: its members' names, or what its rule records under
    (``capture_keys``: the four projections of an ``nn.MultiheadAttention``)."""
    keys = getattr(u.rule, "capture_keys", None)
    return keys(u) if keys is not None else [mb.name for mb in u.members]


def _members(units) -> List[str]:
    return [k for u in units if u.rule.module_rule for k in _keys(u)]


def structure_signature(units) -> List[int]:
    """``[units, parameters, members, crc32 of their names, rules and shapes]``."""
    text = ";".join(f"{u.name}:{u.rule.name}:" + ",".join(f"{n}{tuple(p.shape)}" for n, p in zip(u.param_names, u.params))
                    + ":" + ",".join(mb.name for mb in u.members) for u in units)
    return [len(units), sum(len(u.params) for u in units), len(_members(units)), zlib.crc32(text.encode())]


def check_structure(table: List[List[int]]) -> None:
    """Raise unless every rank's optimizer has the same units (same model, same param groups)."""
    if all(row == table[0] for row in table):
        return
    desc = "; ".join(f"rank {r}: {row[0]} units, {row[1]} parameters" for r, row in enumerate(table))
    raise RuntimeError(
        "the ranks' optimizers train different parameters (their names, shapes or rules differ: "
        f"different models, param groups or excluded modules on different ranks; {desc}); every rank "
        "must build the same model and optimizer. Nothing was updated.")


def local_signature(units, capture) -> List[int]:
    """This rank's vector: one 0/1 per parameter (has a gradient), then ``samples, rows, calls`` per
    captured member (zeros for a member without hooks)."""
    out = [int(p.grad is not None) for u in units for p in u.params]
    keys = capture.keys()
    for name in _members(units):
        if name in keys:
            st = capture.peek(name)
            out += [st.samples, st.rows, len(st.calls)]
        else:
            out += [0, 0, 0]
    return out


def check_agreement(table: List[List[int]], units) -> None:
    """Raise one ``RuntimeError`` (the same on every rank, since ``table`` is) when the ranks left
    gradients on different parameters, recorded different modules, or called a module a different
    number of times (the iterative solver gathers every call)."""
    pnames = [n for u in units for n in u.param_names]
    mnames = _members(units)
    world = len(table)
    problems = []
    by_pattern: Dict[Tuple[int, ...], List[str]] = {}
    for j, name in enumerate(pnames):
        col = tuple(row[j] for row in table)
        if len(set(col)) > 1:
            by_pattern.setdefault(col, []).append(name)
    for col, names in by_pattern.items():
        yes = [r for r in range(world) if col[r]]
        no = [r for r in range(world) if not col[r]]
        problems.append(f"parameters {_names(names)} have a gradient on {_ranks(yes)} and none on {_ranks(no)}")
    base = len(pnames)
    recorded: Dict[Tuple[int, ...], List[str]] = {}
    calls = []
    for i, name in enumerate(mnames):
        samples = tuple(row[base + 3 * i] for row in table)
        ncalls = tuple(row[base + 3 * i + 2] for row in table)
        seen = tuple(int(s > 0) for s in samples)
        if len(set(seen)) > 1:
            recorded.setdefault(seen, []).append(name)
        elif len(set(ncalls)) > 1:
            calls.append(f"module {name!r} was called " + ", ".join(f"{c} times on rank {r}" for r, c in enumerate(ncalls)))
    for seen, names in recorded.items():
        yes = [r for r in range(world) if seen[r]]
        no = [r for r in range(world) if not seen[r]]
        problems.append(f"modules {_names(names)} ran forward and backward on {_ranks(yes)} and not on {_ranks(no)}")
    problems += calls
    if problems:
        raise RuntimeError(
            "the ranks did not run the same modules before step(), so the step's collectives would not "
            "match; nothing was updated on any rank:\n  * " + "\n  * ".join(problems) + "\nEvery rank must "
            "call the same modules (the same number of times) and leave gradients on the same parameters "
            "in each step: a branch of the forward pass must be taken by every rank or by none (decide it "
            "from a value shared by the ranks, not from the rank's own data).")


def union_sizes(table: List[List[int]], units) -> Dict[str, Tuple[int, int]]:
    """``{member: (samples, rows)}`` summed over the ranks."""
    base = sum(len(u.params) for u in units)
    return {name: (sum(row[base + 3 * i] for row in table), sum(row[base + 3 * i + 1] for row in table))
            for i, name in enumerate(_members(units))}


def unit_samples(table: List[List[int]], units) -> Dict[str, List[int]]:
    """``{unit: [samples on rank r]}`` (summed over the unit's members) of the module units that
    recorded samples; units without any are left out."""
    base = sum(len(u.params) for u in units)
    index = {name: i for i, name in enumerate(_members(units))}
    out = {}
    for u in units:
        if not u.rule.module_rule:
            continue
        per_rank = [sum(row[base + 3 * index[k]] for k in _keys(u)) for row in table]
        if sum(per_rank) > 0:
            out[u.name] = per_rank
    return out


def _shares(samples: Sequence[int]) -> Tuple[Fraction, ...]:
    total = sum(samples)
    return tuple(Fraction(s, total) for s in samples)


def _describe(samples: Dict[str, List[int]]) -> str:
    items = list(samples.items())
    text = "; ".join(f"module {name!r}: " + ", ".join(f"{s} samples on rank {r}" for r, s in enumerate(v))
                     for name, v in items[:_SHOW])
    return text + (f"; and {len(items) - _SHOW} more" if len(items) > _SHOW else "")


def grad_weights(samples: Dict[str, List[int]], units_with_grads: Sequence[str], world: int
                 ) -> Optional[Dict[str, Tuple[Fraction, ...]]]:
    """Each unit's rank weights ``B_r/B`` for the gradient average, or None when every rank has the
    same share of every unit's samples (then the plain mean is exact).

    A unit weights by its own samples; a unit without recorded samples (a fallback parameter, a rule
    that captures nothing) by the shares the recorded units agree on. If they disagree, such a
    gradient has no defined weight and a ``RuntimeError`` says so. Without any recorded samples the
    mean is used: nothing tells the optimizer the batch sizes."""
    uniform = tuple(Fraction(1, world) for _ in range(world))
    shares = {name: _shares(v) for name, v in samples.items()}
    if all(s == uniform for s in shares.values()):
        return None
    distinct = set(shares.values())
    default = next(iter(distinct)) if len(distinct) == 1 else None
    out = {}
    orphans = []
    for name in units_with_grads:
        if name in shares:
            out[name] = shares[name]
        elif default is not None:
            out[name] = default
        else:
            orphans.append(name)
    if orphans:
        raise RuntimeError(
            f"cannot weight the gradients of {_names(orphans)} by the ranks' batch sizes: they have no "
            "recorded samples of their own, and the recorded modules disagree on the ranks' shares "
            f"({_describe(samples)}). Use equal per-rank batches, or the same per-rank proportions in "
            "every module. Nothing was updated.")
    return out


def check_uniform_for_wrapper(samples: Dict[str, List[int]]) -> None:
    """Under DistributedDataParallel (which averages ``.grad`` uniformly over the ranks) refuse
    unequal per-rank batch sizes: the uniform mean is not the union batch's gradient, and the
    individual ranks' gradients are gone once DDP has reduced them."""
    unequal = {name: v for name, v in samples.items() if len(set(v)) > 1}
    if unequal:
        raise RuntimeError(
            "the ranks' batch sizes differ "
            f"({_describe(unequal)}), but DistributedDataParallel averages .grad uniformly over the ranks, "
            "which is not the gradient of the union batch (each rank's loss is the mean over its own "
            "batch). Use equal per-rank batches (torch's DistributedSampler gives every rank the same "
            "number of samples), or pass the unwrapped model with process_group=... and no DDP wrapper: "
            "the optimizer then averages the gradients itself, weighted by the batch sizes. Nothing was "
            "updated.")
