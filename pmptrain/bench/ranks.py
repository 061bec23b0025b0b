"""The bench's view of ``torch.distributed``: rank and world size, starting gloo under
``torchrun``, broadcasting rank 0's objects."""

from __future__ import annotations

import os
from typing import Any, Tuple

import torch

__all__ = ["dist_info", "init_distributed", "broadcast_object"]


def dist_info() -> Tuple[int, int]:
    """``(rank, world_size)``: from an initialised process group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed() -> Tuple[int, int]:
    """Start a gloo process group if launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the
    environment) and none is running; return ``(rank, world_size)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return dist_info()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself in a single process)."""
    rank, world = dist_info()
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
