"""``torch.distributed.checkpoint`` (DCP) loading for pmptrain optimizers.

DCP loads *in place* into a template: the state dict of a fresh model and optimizer
(``get_model_state_dict`` / ``get_optimizer_state_dict``). A fresh pmptrain optimizer already holds
its per-parameter state (moments, accumulators, latent weights: zeros, DTensors under FSDP2), but a
module unit's statistics kept between steps (E-MSA's running covariances and eigenbases with
``stat_decay`` / ``stat_every``) are created at the first step, so the fresh template holds
``None`` where the checkpoint holds tensors, which ``dcp.load`` refuses ("Missing key in checkpoint
state_dict"). :func:`load` loads everything else in place as ``dcp.load`` does (sharded tensors
resharded from N ranks to M), and those entries whole from the checkpoint on every rank (however
many ranks saved them, as row shards or whole); ``set_optimizer_state_dict`` (the optimizer's
``load_state_dict``) then keeps each rank's rows of them under FSDP2. Usage::

    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    pmptrain.dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

__all__ = ["load"]


def _none_leaves(v: Any, path: Tuple = ()) -> List[Tuple]:
    """The paths (keys and list indices) of every ``None`` value inside dicts and lists."""
    if v is None:
        return [path]
    if isinstance(v, dict):
        return [q for k, x in v.items() for q in _none_leaves(x, path + (k,))]
    if isinstance(v, list):
        return [q for i, x in enumerate(v) for q in _none_leaves(x, path + (i,))]
    return []


def _get(v: Any, path: Tuple) -> Any:
    for k in path:
        v = v[k]
    return v


def load(state: Dict[str, Any], checkpoint_id, **kwargs) -> None:
    """``torch.distributed.checkpoint.load(state, checkpoint_id=checkpoint_id, **kwargs)``, except
    that a ``None`` in ``state`` where the checkpoint holds a value (a statistic a fresh optimizer
    creates at its first step) is replaced by the saved value, read whole on every rank. Every rank
    calls it (collectives under ``torch.distributed``); ``checkpoint_id`` is a directory written by
    ``dcp.save``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta = FileSystemReader(str(checkpoint_id)).read_metadata()
    saved = meta.planner_data or {}
    missing: Dict[Tuple, List[str]] = {}
    for path in _none_leaves(state):
        keys = [k for k, p in saved.items() if tuple(p[:len(path)]) == path
                and (len(p) > len(path) or not isinstance(meta.state_dict_metadata.get(k), BytesStorageMetadata))]
        if keys:  # (a None saved as None is DCP's to load)
            missing[path] = keys
    for path in missing:  # out of the template while DCP loads in place (restored below)
        parent = _get(state, path[:-1])
        if isinstance(parent, dict):
            del parent[path[-1]]
    try:
        dcp.load(state, checkpoint_id=checkpoint_id, **kwargs)
    finally:
        for path in missing:
            parent = _get(state, path[:-1])
            if isinstance(parent, dict):
                parent[path[-1]] = None
    if not missing:
        return
    whole = _load_state_dict_from_keys({k for keys in missing.values() for k in keys}, checkpoint_id=checkpoint_id)
    for path in missing:
        _get(state, path[:-1])[path[-1]] = _get(whole, path)
