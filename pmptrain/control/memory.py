"""What a training step keeps in memory: the bytes autograd saves for the backward pass.

:func:`saved_tensor_bytes` runs ``fn`` under ``torch.autograd.graph.saved_tensors_hooks`` and
counts every distinct storage saved for backward (a tensor saved twice, or a view of one already
saved, counts once; parameters are excluded — they live in memory anyway). Deterministic and
device-agnostic: the same number on CPU and GPU, unlike a sampled RSS. On CUDA the bench also reads
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import nn

__all__ = ["saved_tensor_bytes"]


def _storage_key(t: torch.Tensor):
    try:
        s = t.untyped_storage()
        return (s.data_ptr(), t.device.type), s.nbytes()
    except (RuntimeError, NotImplementedError):  # e.g. a tensor subclass without storage
        return (id(t), t.device.type), t.numel() * t.element_size()


def saved_tensor_bytes(fn: Callable[[], torch.Tensor], model: nn.Module = None) -> Tuple[torch.Tensor, int]:
    """``(out, bytes)``: the output of ``fn()`` and the bytes of the distinct storages autograd
    saved for its backward pass, excluding the storages of ``model``'s parameters and buffers."""
    exclude = set()
    if model is not None:
        for t in list(model.parameters()) + list(model.buffers()):
            exclude.add(_storage_key(t.detach())[0])
    seen = {}

    def pack(t):
        key, nbytes = _storage_key(t)
        if key not in exclude:
            seen[key] = nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, int(sum(seen.values()))
