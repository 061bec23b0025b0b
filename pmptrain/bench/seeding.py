"""Seeding and the global RNG states (torch, ``random``, numpy) as plain data a checkpoint may hold."""

from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch

__all__ = ["seed_all", "rng_state", "set_rng_state"]


def rng_state() -> Dict[str, Any]:
    """The global RNG states as plain data (tensors, ints, floats, strings: what a checkpoint may
    hold, docs/cli.md)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss},
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}


def set_rng_state(st: Dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    py, npy = st["python"], st["numpy"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
