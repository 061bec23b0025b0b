"""The bench's view of ``torch.distributed``: rank and world size, starting gloo under
``torchrun``, broadcasting rank 0's objects."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Tuple

import torch

__all__ = ["dist_info", "init_distributed", "broadcast_object", "run_ranked"]


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


def run_ranked(prefix: str, out: Path, run: Callable[[Path], None]) -> int:
    """Run ``run(out)`` on every rank of ``torchrun`` (or alone) and return the command's exit
    status: 0; 2 for bad input (``ValueError``, ``FileNotFoundError``, the data layer's
    ``DataError``); 1 for any other ``RuntimeError``. Rank 0 prints the error as
    ``"{prefix}: error: …"``. Every rank runs with rank 0's ``out``, after every rank has checked it
    (a barrier: rank 0 creates it inside ``run``); the process group started here is destroyed."""
    from .data import DataError

    rank, world = init_distributed()
    try:
        out = Path(broadcast_object(str(out)))
        if world > 1:
            torch.distributed.barrier()
        run(out)
    except (ValueError, FileNotFoundError, DataError) as e:
        if rank == 0:
            print(f"{prefix}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if rank == 0:
            print(f"{prefix}: error: {e}", file=sys.stderr)
        return 1
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    return 0
