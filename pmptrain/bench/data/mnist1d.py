"""MNIST-1D, generated locally by the ``mnist1d`` package and cached in :func:`cache_dir`."""

from __future__ import annotations

import random
from typing import Dict, Tuple

import numpy as np

from ..._io import atomic_write
from .sources import cache_dir


def mnist1d_arrays(num_samples: int, seed: int) -> Tuple[Dict[str, np.ndarray], str]:
    path = cache_dir() / "mnist1d" / f"mnist1d_n{num_samples}_seed{seed}.npz"
    keys = ("x", "y", "x_test", "y_test")
    if path.is_file():
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in keys}
            return arrays, str(path)
        except Exception:
            pass  # unreadable cache: regenerate and overwrite
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    # make_dataset reseeds the global `random` and numpy generators: keep the caller's streams.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    arrays = {k: np.asarray(d[k]) for k in keys}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            np.savez(f, **arrays)
    except OSError:
        pass  # a read-only cache only costs the ~1 s regeneration
    return arrays, f"mnist1d.make_dataset(num_samples={num_samples}, seed={seed})"
