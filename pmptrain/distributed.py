"""Rank-safe collective helpers: no-ops without an initialised ``torch.distributed`` group.

Algorithm code calls these unconditionally and never branches on rank.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["world_size", "rank", "all_reduce_sum_", "all_reduce_mean_", "all_gather_rows", "all_gather_parts",
           "is_sharded", "check_placements", "shard_count", "full_tensor", "full_tensors", "local_rows", "write_local_",
           "all_gather_ints", "is_rank_zero"]


def world_size(group=None) -> int:
    """Number of ranks in ``group`` (1 without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def rank(group=None) -> int:
    """This process's rank in ``group`` (0 without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def is_rank_zero(group=None) -> bool:
    return rank(group) == 0


def all_reduce_sum_(tensors: Sequence[Tensor], group=None) -> None:
    """Sum every tensor across ranks in place (flattened into one buffer per dtype)."""
    if world_size(group) == 1 or not tensors:
        return
    by_dtype = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for t in ts:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_mean_(tensors: Sequence[Tensor], group=None) -> None:
    """Average every tensor across ranks in place."""
    n = world_size(group)
    if n == 1:
        return
    all_reduce_sum_(tensors, group)
    for t in tensors:
        t.div_(n)


def all_gather_parts(t: Tensor, group=None) -> List[Tensor]:
    """Every rank's ``t`` (rows × …), as a list in rank order; ranks may hold different numbers of
    rows. ``[t]`` without torch.distributed."""
    n = world_size(group)
    if n == 1:
        return [t]
    count = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    counts = [torch.zeros_like(count) for _ in range(n)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c.item()) for c in counts]
    width = max(counts)
    padded = t.new_zeros((width,) + tuple(t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return [p[:c] for p, c in zip(parts, counts)]


def all_gather_rows(t: Tensor, group=None) -> Tensor:
    """Concatenate ``t`` (rows × …) of every rank along dim 0, in rank order."""
    parts = all_gather_parts(t, group)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def all_gather_ints(values: Sequence[int], group=None, device=None) -> List[List[int]]:
    """Every rank's list of integers (all ranks must pass lists of the same length), in rank order:
    one all-gather of an int64 tensor. ``[list(values)]`` without torch.distributed."""
    n = world_size(group)
    if n == 1:
        return [list(values)]
    t = torch.tensor(list(values), dtype=torch.int64, device=device)
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t, group=group)
    return [p.tolist() for p in parts]


# ------------------------------------------------------------------------------ sharded tensors
# FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps each parameter as a ``DTensor`` sharded along
# dimension 0 (``Shard(0)``; ``Replicate()`` in front of it for HSDP). These helpers give the
# optimizer the whole tensor and write a whole tensor back into this rank's shard.


def is_sharded(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (a parameter under FSDP2)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def check_placements(name: str, t) -> None:
    """Raise ``NotImplementedError`` naming ``name`` unless ``t``'s placements are FSDP's: ``Shard(0)``
    on a one-dimensional mesh, or ``(Replicate(), Shard(0))`` (HSDP). Tensor and sequence parallel
    layouts (``Shard(1)``, ``Partial``, several sharded mesh dimensions) are not supported."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(t.placements)
    ok = all(isinstance(p, Replicate) for p in placements[:-1]) and (
        isinstance(placements[-1], Replicate) or (isinstance(placements[-1], Shard) and placements[-1].dim == 0))
    if not ok:
        raise NotImplementedError(
            f"parameter {name!r} is a DTensor with placements {placements}: pmptrain optimizers support "
            "FSDP2's layouts only (Shard(0) on one mesh dimension, optionally Replicate() in front: HSDP); "
            "tensor/sequence parallel layouts (Shard(d>0), Partial, several sharded mesh dimensions) are not "
            "supported")


def shard_count(t) -> int:
    """The number of distinct shards of the ``DTensor`` ``t``: the product of the mesh sizes along
    its ``Shard`` placements (its other mesh dimensions hold replicas); 1 for a plain tensor."""
    if not is_sharded(t):
        return 1
    n = 1
    for dim, placement in enumerate(t.placements):
        if placement.is_shard():
            n *= t.device_mesh.size(dim)
    return n


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of a ``DTensor`` (one all-gather), a plain tensor as it is."""
    return t.full_tensor() if is_sharded(t) else t


def _chunk_rows(n: int, k: int, r: int) -> tuple:
    """``(offset, length)`` of chunk ``r`` of ``n`` rows split into ``k`` as ``torch.chunk`` (and
    ``DTensor``'s ``Shard``) splits them: chunks of ``ceil(n/k)`` rows, the last ones shorter or empty."""
    c = -(-n // k) if n else 0
    start = min(n, c * r)
    return start, max(0, min(n, start + c) - start)


@torch.no_grad()
def full_tensors(ts: Sequence) -> List[Tensor]:
    """The whole tensor of each of ``ts`` (``DTensor`` s; a plain tensor is returned as it is), with
    one all-gather per mesh and dtype instead of one per tensor.

    Tensors with FSDP2's layout (``Shard(0)`` on the mesh's last dimension, ``Replicate()`` on the
    others) of the same mesh, dtype and device are gathered together: each rank concatenates its
    local rows of all of them into one flat buffer (padded to the longest rank's), one
    ``all_gather_into_tensor`` over the shard dimension's group, and each whole tensor is
    reassembled from every rank's rows (the rows each rank holds follow ``torch.chunk``, as
    ``DTensor`` splits them). Fully replicated ones are a copy of their local tensor; any other layout goes
    through ``DTensor.full_tensor``. Every rank must call it with the same list (a collective)."""
    from torch.distributed.tensor import Shard

    out: List[Optional[Tensor]] = [None] * len(ts)
    batches: dict = {}
    for i, t in enumerate(ts):
        if not is_sharded(t):
            out[i] = t
            continue
        placements = tuple(t.placements)
        if all(p.is_replicate() for p in placements):
            out[i] = t.to_local().clone()
        elif (t.dim() > 0 and isinstance(placements[-1], Shard) and placements[-1].dim == 0
              and all(p.is_replicate() for p in placements[:-1])):
            batches.setdefault((id(t.device_mesh), t.dtype, t.device), []).append(i)
        else:
            out[i] = t.full_tensor()
    for idx in batches.values():
        mesh = ts[idx[0]].device_mesh
        k, me = mesh.size(-1), mesh.get_local_rank(-1)
        group = mesh.get_group(-1)
        rows = [[_chunk_rows(ts[i].shape[0], k, r)[1] for i in idx] for r in range(k)]
        inner = [math.prod(ts[i].shape[1:]) for i in idx]
        counts = [sum(n * m for n, m in zip(rs, inner)) for rs in rows]
        width = max(counts)
        t0 = ts[idx[0]]
        buf = torch.zeros(width, dtype=t0.dtype, device=t0.to_local().device)
        offset = 0
        for i, n, m in zip(idx, rows[me], inner):
            local = ts[i].to_local()
            if local.shape[0] != n:  # not torch.chunk's split: a layout this function does not know
                raise RuntimeError(f"full_tensors: a DTensor of shape {tuple(ts[i].shape)} holds {local.shape[0]} "
                                   f"rows on mesh rank {me} of {k}, expected {n}")
            buf[offset:offset + n * m].copy_(local.reshape(-1))
            offset += n * m
        gathered = torch.empty(k * width, dtype=buf.dtype, device=buf.device)
        dist.all_gather_into_tensor(gathered, buf, group=group)
        parts = [[] for _ in idx]
        for r in range(k):
            offset = r * width
            for j, (n, m) in enumerate(zip(rows[r], inner)):
                parts[j].append(gathered[offset:offset + n * m].view(n, *ts[idx[j]].shape[1:]))
                offset += n * m
        for j, i in enumerate(idx):
            out[i] = torch.cat(parts[j]) if k > 1 else parts[j][0].clone()
    return out


def local_rows(t) -> tuple:
    """``(offset, length)``: the rows of dimension 0 of the whole tensor that this rank's shard of the
    ``DTensor`` ``t`` holds (uneven shards included; length 0 on a rank that holds nothing)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if len(shape) == 0:
        return 0, 1
    return offset[0], shape[0]


def write_local_(t, whole: Tensor) -> None:
    """Copy this rank's rows of ``whole`` (the whole tensor) into the local shard of the ``DTensor``
    ``t``, in place (the shard's storage, which FSDP2 all-gathers from, is kept)."""
    local = t._local_tensor
    offset, length = local_rows(t)
    if local.dim() == 0:
        local.copy_(whole)
    elif length:
        local.copy_(whole[offset:offset + length])
