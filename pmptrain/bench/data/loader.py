"""Seeded, rank-sharded batches over in-memory tensors."""

from __future__ import annotations

from typing import Iterator, List, Tuple

import torch

__all__ = ["BatchLoader", "make_loader"]

# --------------------------------------------------------------------------------------------
# batches


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed mixing ``seed`` and ``epoch`` (SplitMix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 64)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return (z ^ (z >> 31)) >> 1


class BatchLoader:
    """Iterable over ``(x_batch, y_batch)`` shards of seeded global batches.

    The global order is ``randperm(N)`` from a generator seeded by ``(seed, epoch)`` (natural
    order if not shuffled), cut into global batches of ``batch_size``. With ``world_size > 1``
    each global batch is split into ``world_size`` contiguous shards (``torch.tensor_split``;
    sizes differ by at most one) and rank ``r`` yields shard ``r``, so the ranks' shards are
    disjoint and their union is exactly the single-process batch. Use
    :meth:`global_batch_size` to weight per-rank losses (sum / global size) so that averaged
    gradients equal the single-process ones. Independent of torch's global RNG.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = True,
                 seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False):
        if len(x) != len(y):
            raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        if batch_size < world_size:
            raise ValueError(f"batch_size={batch_size} must be >= world_size={world_size} "
                             "(batch_size is the global batch, split across ranks)")
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, epoch
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (as ``DistributedSampler.set_epoch``)."""
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self) -> torch.Tensor:
        """The global index order of this epoch."""
        n = len(self.x)
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        return torch.randperm(n, generator=g)

    def global_batches(self) -> List[torch.Tensor]:
        """Index tensors of this epoch's global batches (identical on every rank)."""
        batches = list(torch.split(self.order(), self.batch_size))
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def global_batch_size(self, i: int) -> int:
        """Size of global batch ``i`` (sum of all ranks' shard sizes)."""
        return len(self.global_batches()[i])

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for idx in self.global_batches():
            if self.world_size > 1:
                idx = torch.tensor_split(idx, self.world_size)[self.rank]
            yield self.x[idx], self.y[idx]


def make_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = True,
                seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                drop_last: bool = False) -> BatchLoader:
    """Seeded batch iterator over in-memory tensors, optionally sharded across ranks.

    Args:
        x, y: inputs and labels (same first dimension).
        batch_size: the *global* batch size; default none (required).
        shuffle: permute each epoch (default True); deterministic per ``(seed, epoch)``.
        seed, epoch: select the permutation (defaults 0, 0); change ``epoch`` each epoch, or call
            ``set_epoch``.
        rank, world_size: this process's shard (defaults 0, 1); see :class:`BatchLoader`.
        drop_last: drop a final incomplete global batch (default False).
    """
    return BatchLoader(x, y, batch_size, shuffle, seed, epoch, rank, world_size, drop_last)
