"""Optimizer state under FSDP2 stays sharded, and survives ``torch.distributed.checkpoint`` resharding.

Per-parameter state of a sharded parameter (the fallback's Adam moments, the discrete rules'
accumulators, BinaryConnect's latent weights and their moments, a LayerNorm's per-channel running
statistics) is a ``DTensor`` with the parameter's mesh and placements, each rank holding the rows of
its own shard; module statistics (E-MSA's running covariances and their eigenbases) are
``DTensor`` s split by their own rows, each rank holding 1/world of them.

Checkpoints go through torch's own tools: ``get_model_state_dict``/``get_optimizer_state_dict`` and
``dcp.save`` after 2 steps on N ranks, a fresh model and optimizer, ``dcp.load`` into their
``get_*_state_dict`` templates (:func:`pmptrain.dcp.load`: the running statistics a fresh optimizer
creates at its first step are read whole) and ``set_*_state_dict`` on M ranks, then 2 more steps: the weights
equal, bit for bit, those of the uninterrupted run on M ranks (2→4, 4→2, 2→1).

Three spawns (2, 4, 2 ranks) and the one-process runs in the test process; the model and data are
those of tests/test_fsdp.py.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Dict, List

import pytest
import torch

import pmptrain
from dist_utils import run_distributed
from helpers import tensors_in
from test_fsdp import K_STEPS, _model, _shard, _train

pytestmark = pytest.mark.distributed

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):  # pragma: no cover - torch < 2.6
    pytest.skip("torch.distributed.fsdp.fully_shard is not available", allow_module_level=True)

OPTIMIZERS = {
    "emsa-fallback": lambda m: pmptrain.EMSA(m, exclude=("ln", "fc2")),  # Adam moments of ln, fc2
    "emsa-running": lambda m: pmptrain.EMSA(m, rho=1.0, stat_decay=0.5),  # running C_x, C_p; LN a, b, e
    # the same, with the running statistics kept whole on every rank
    "emsa-running-whole": lambda m: pmptrain.EMSA(m, rho=1.0, stat_decay=0.5, shard_statistics=False),
    "discrete-msa": lambda m: pmptrain.DiscreteMSA(m),  # fc2's accumulator
    "binaryconnect": lambda m: pmptrain.BinaryConnect(m),  # fc2's latent weight and its moments
    "emsa-grad-decay": lambda m: pmptrain.EMSA(m, rho=1.0, grad_decay=0.9),  # every unit's grad_avg
    # rho_scale="costate", grad_decay and stat_decay: grad_avg and the running statistics
    "emsa-transformer": lambda m: pmptrain.EMSA(m, setting="transformer"),
}
GRAD_AVG = ("emsa-grad-decay", "emsa-transformer")
DISCRETE = ("discrete-msa", "binaryconnect")
SAVE_AT = 2


def _build(opt_name: str, world: int):
    model = _model()
    if opt_name in DISCRETE:
        pmptrain.discretize_(model, levels="binary")
    if world > 1:
        _shard(model, "all")
    return model, OPTIMIZERS[opt_name](model)


def _weights(model) -> List[torch.Tensor]:
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()]


def _layout(model, opt) -> Dict[str, Dict[str, str]]:
    """For every parameter with state: each state tensor's kind — ``"shard"`` (a DTensor with the
    parameter's placements whose local rows are the parameter's), ``"whole"`` (a plain tensor of
    the whole size), or what is wrong with it."""
    from pmptrain import distributed as pdist

    out = {}
    for name, p in model.named_parameters():
        kinds = {}
        for key, v in opt.state.get(p, {}).items():
            if key == "step" or not isinstance(v, torch.Tensor):
                continue
            if pdist.is_sharded(v):
                ok = (tuple(v.placements) == tuple(p.placements) and v.shape == p.shape
                      and v.to_local().shape == p.to_local().shape)
                kinds[key] = "shard" if ok else f"bad shard {v.placements} {tuple(v.to_local().shape)}"
            else:
                kinds[key] = "whole"
        # the running averages of the unit's gradients (one per parameter of the unit, in its order)
        avg = opt.state.get(p, {}).get("grad_avg")
        if isinstance(avg, list):
            unit = next(u for u in opt.units.values() if u.primary is p)
            kinds["grad_avg"] = [
                ("shard" if pdist.is_sharded(t) and tuple(t.placements) == tuple(q.placements) and t.shape == q.shape
                 and t.to_local().shape == q.to_local().shape else "whole" if not pdist.is_sharded(t) else "bad")
                if pdist.is_sharded(q) else ("whole" if not pdist.is_sharded(t) else "bad")
                for t, q in zip(avg, unit.params)]
        # module statistics of a unit's record (nested lists of RunningStats as dicts) and their
        # eigendecompositions: "rows" when every matrix is a DTensor with the parameter's placements
        # holding this rank's rows of its own dimension 0 (as FSDP2 splits that many rows) and every
        # vector is whole
        for key in ("running", "eig_left", "eig_right"):
            v = opt.state.get(p, {}).get(key)
            if isinstance(v, list):
                kinds[key] = _stat_layout(tensors_in(v), p)
        if kinds:
            out[name] = kinds
    return out


def _stat_layout(ts: List[torch.Tensor], p) -> str:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from pmptrain import distributed as pdist

    for t in ts:
        if t.dim() < 2:
            if pdist.is_sharded(t):
                return f"sharded vector {tuple(t.shape)}"
            continue
        if not pdist.is_sharded(t):
            return f"whole matrix {tuple(t.shape)}"
        rows = compute_local_shape_and_global_offset(t.shape, p.device_mesh, p.placements)[0][0]
        if tuple(t.placements) != tuple(p.placements) or t.to_local().shape[0] != rows:
            return f"bad shard {t.placements} {tuple(t.to_local().shape)} of {tuple(t.shape)}"
    return "rows"


def _whole(v):
    """``v`` (a state entry) with every DTensor gathered whole (a collective), every tensor copied."""
    if isinstance(v, torch.Tensor):
        return (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
    if isinstance(v, dict):
        return {k: _whole(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_whole(x) for x in v]
    return v


def _snapshot(model, opt) -> dict:
    """The weights and every state entry, whole, by parameter name."""
    return {"weights": _weights(model), "state": {n: _whole(opt.state.get(p, {})) for n, p in model.named_parameters()}}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _checkpoint_id(root: str, opt_name: str, world: int) -> str:
    return f"{root}/{opt_name}-from{world}"


def _save(model, opt, ckpt: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=ckpt)


def _load(model, opt, ckpt: str) -> None:
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    import pmptrain.dcp

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    pmptrain.dcp.load(state, checkpoint_id=ckpt)  # dcp.load, and the running statistics whole
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])


def _session(rank: int, world: int, root: str, load_from=()) -> Dict[str, dict]:
    """Per optimizer: the uninterrupted run's weights, state layout and bytes; a checkpoint after
    ``SAVE_AT`` steps and the whole weights and state then (``"saved"``); and for every world size
    ``n`` in ``load_from``, the run resumed from the checkpoint that ``n`` ranks saved: the whole
    weights and state just after loading (``"loaded", n``) and its final weights (``"resumed", n``)."""
    from pmptrain.optim.sharded import state_bytes

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for o in OPTIMIZERS:
            r = {}
            model, opt = _build(o, world)
            _train(model, opt, rank, world, range(SAVE_AT))
            if world not in load_from:
                _save(model, opt, _checkpoint_id(root, o, world))
                r["saved"] = _snapshot(model, opt)
            _train(model, opt, rank, world, range(SAVE_AT, K_STEPS))
            r["weights"], r["layout"], r["bytes"] = _weights(model), _layout(model, opt), state_bytes(opt)
            opt.detach()
            for n in load_from:
                model, opt = _build(o, world)
                _load(model, opt, _checkpoint_id(root, o, n))
                r["loaded", n] = _snapshot(model, opt)
                _train(model, opt, rank, world, range(SAVE_AT, K_STEPS))
                r["resumed", n] = _weights(model)
                opt.detach()
            out[o] = r
    return out


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    """``{world: [rank results]}``: 2 ranks (saving), 4 ranks (saving, resuming from 2), 2 ranks
    again (resuming from 4), one process (resuming from 2)."""
    root = str(tmp_path_factory.mktemp("dcp"))
    out = {2: run_distributed(_session, 2, args=(root,), timeout=300.0)}
    out[4] = run_distributed(_session, 4, args=(root, (2,)), timeout=300.0)
    resumed = run_distributed(_session, 2, args=(root, (4, 2)), timeout=300.0)
    for r_old, r_new in zip(out[2], resumed):
        for o in OPTIMIZERS:
            r_old[o].update({k: v for k, v in r_new[o].items() if isinstance(k, tuple)})
    out[1] = [_session(0, 1, root, (2,))]
    return out


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("world", [2, 4])
def test_per_parameter_state_is_sharded_like_the_parameter(sessions, opt_name, world):
    expected = {
        "emsa-fallback": {n: {"exp_avg": "shard", "exp_avg_sq": "shard"}
                          for n in ("ln.weight", "ln.bias", "fc2.weight", "fc2.bias")},
        "discrete-msa": {"fc2.weight": {"accumulator": "shard"}},
        "binaryconnect": {"fc2.weight": {"latent": "shard", "exp_avg": "shard", "exp_avg_sq": "shard"}},
    }
    for rank, r in enumerate(sessions[world]):
        layout = r[opt_name]["layout"]
        if opt_name in GRAD_AVG:  # every closed-form unit (fc1, ln, fc2, fc3): weight and bias, sharded
            for n in ("fc1.weight", "ln.weight", "fc2.weight", "fc3.weight"):
                assert layout[n]["grad_avg"] == ["shard", "shard"], (rank, n, layout)
            if opt_name == "emsa-transformer":
                assert layout["fc2.weight"]["running"] == "rows", layout
        elif opt_name == "emsa-running":
            # per channel: sharded like the parameter; the Linear units' running covariances and
            # their eigenbases: each rank holds its rows of them
            assert layout["ln.weight"] == {"a": "shard", "b": "shard", "e": "shard"}, layout
            for n in ("fc1.weight", "fc2.weight", "fc3.weight"):
                assert layout[n] == {"running": "rows", "eig_left": "rows", "eig_right": "rows"}, (n, layout)
        elif opt_name == "emsa-running-whole":
            assert layout["ln.weight"] == {"a": "shard", "b": "shard", "e": "shard"}, layout
            for n in ("fc1.weight", "fc2.weight", "fc3.weight"):
                assert set(layout[n]) == {"running", "eig_left", "eig_right"}, (n, layout)
                assert all(v.startswith("whole matrix") for v in layout[n].values()), (n, layout)
        else:
            for n, kinds in expected[opt_name].items():
                assert {k: layout[n][k] for k in kinds} == kinds, (rank, n, layout)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_state_bytes_per_rank_fall_with_the_world_size(sessions, opt_name):
    """The sharded state's bytes add up over the ranks to the one-process state's (which is all
    whole); the whole part is the same on every rank; each rank's share falls with the world."""
    one = sessions[1][0][opt_name]["bytes"]
    assert one["sharded"] == 0 and one["whole"] > 0
    per_rank_max = {}
    for world in (2, 4):
        bs = [r[opt_name]["bytes"] for r in sessions[world]]
        assert len({b["whole"] for b in bs}) == 1, bs
        assert sum(b["sharded"] for b in bs) + bs[0]["whole"] == one["whole"], (world, bs, one)
        assert all(b["sharded"] > 0 for b in bs[:2]), bs  # (on 4 ranks the last may hold no row)
        per_rank_max[world] = max(b["sharded"] for b in bs)
    sharded_total = sum(b["sharded"] for b in (r[opt_name]["bytes"] for r in sessions[2]))
    assert per_rank_max[4] < per_rank_max[2] < sharded_total, per_rank_max


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("saved_on, loaded_on", [(2, 4), (4, 2), (2, 1), (2, 2)])
def test_distributed_checkpoint_resharded_resume_is_bit_exact(sessions, opt_name, saved_on, loaded_on):
    """Saved on N ranks after 2 steps and loaded on M: every weight and state entry, whole, equals
    bit for bit what the saving run held; after 2 more steps the weights are within 1e-10 of the
    uninterrupted run on M ranks (float64: the ranks' reduction order differs between N and M) and
    bit for bit the same when N = M."""
    saved = sessions[saved_on][0][opt_name]["saved"]
    init = [p.detach() for p in _model().parameters()]
    for rank, r in enumerate(sessions[loaded_on]):
        loaded = r[opt_name]["loaded", saved_on]
        assert _equal(loaded["weights"], saved["weights"])
        assert _equal(loaded["state"], saved["state"]), (rank, loaded["state"], saved["state"])
        got, want = r[opt_name]["resumed", saved_on], r[opt_name]["weights"]
        for a, b in zip(got, want):
            if saved_on == loaded_on:
                assert torch.equal(a, b), (rank, (a - b).abs().max())
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-10), (rank, (a - b).abs().max())
        assert any(not torch.equal(b, p0) for b, p0 in zip(want, init))  # it trained
    assert any(v.dim() > 0 for d in saved["state"].values() for v in tensors_in(d))


def test_layout_helpers_are_consistent_with_a_record_type():
    """Every name a record lists in ``_param_shaped`` is one of its fields."""
    from pmptrain.optim.blocks import ChannelState
    from pmptrain.optim.elementwise import BopState, DiscreteState, FallbackState, LatentState

    from pmptrain.optim.additive import AdditiveState
    from pmptrain.optim.affine import AffineState
    from pmptrain.optim.attention import MHAState
    from pmptrain.optim.blocks import GroupedState

    for cls in (FallbackState, DiscreteState, LatentState, BopState, ChannelState, AffineState, MHAState,
                GroupedState, AdditiveState):
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(cls._param_shaped) <= names, cls


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_statistics_give_the_replicated_run_bit_for_bit(sessions, world):
    """Row shards of the running statistics, gathered for each step, are the same numbers as the
    statistics every rank keeps whole: the weights are identical bit for bit; and the sharded
    statistics take less memory on every rank."""
    for rank, r in enumerate(sessions[world]):
        for a, b in zip(r["emsa-running"]["weights"], r["emsa-running-whole"]["weights"]):
            assert torch.equal(a, b), (rank, (a - b).abs().max())
        sharded, whole = r["emsa-running"]["bytes"], r["emsa-running-whole"]["bytes"]
        assert sharded["sharded"] + sharded["whole"] < whole["sharded"] + whole["whole"], (sharded, whole)


def test_shard_statistics_must_be_a_bool():
    with pytest.raises(TypeError, match="shard_statistics"):
        pmptrain.EMSA(_model(), shard_statistics="yes")
