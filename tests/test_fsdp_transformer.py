"""EMSA's transformer setting (``rho_scale="costate"``, ``grad_decay``, ``stat_decay``) on several
gloo ranks, DDP-style (pmptrain averages the gradients) and under FSDP2, against one process on the
union batch: the GPT bench model in float64, every parameter within 1e-10 after ``STEPS`` steps.

The GPT's position embedding ``wpe`` is called on ``arange(T)`` without a batch dimension: its
output is shared by every sample, so every rank records the same T positions with a part of their
gradient, and the union's costate of position t is the mean over the ranks of theirs (not a
second copy of it): the costate rms that scales ρ must square the union's costate, not average the
ranks' squares (pmptrain.capture, "shared calls").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pmptrain
from dist_utils import run_distributed
from helpers import gpt_emsa, tiny_gpt, token_batches

pytestmark = pytest.mark.distributed

STEPS = 3
BATCH, T, VOCAB = 8, 8, 32
TOL = 1e-10


def _model():
    return tiny_gpt(VOCAB, T)


def _batches():
    return token_batches(STEPS, BATCH, T, VOCAB)


_opt = gpt_emsa


def _train(model, opt, rank=0, world=1):
    for b in _batches():
        rows = b[rank * BATCH // world:(rank + 1) * BATCH // world]
        x, y = rows[:, :-1], rows[:, 1:]
        opt.zero_grad()
        loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        loss.backward()
        opt.step()


def _params(model):
    from pmptrain import distributed as pdist

    return {n: (p.full_tensor() if pdist.is_sharded(p) else p).detach().clone() for n, p in model.named_parameters()}


def _ranks(rank, world, kinds, fsdp):
    out = {}
    for kind in kinds:
        model = _model()
        if fsdp:
            from pmptrain.bench.lm import shard_blocks

            shard_blocks(model)
        opt = _opt(model, kind)
        _train(model, opt, rank, world)
        out[kind] = _params(model)
    return out


def _one(kind):
    model = _model()
    _train(model, _opt(model, kind))
    return _params(model)


KINDS = ("costate", "transformer", "averaged", "averaged-unsharded")


@pytest.fixture(scope="module")
def reference():
    return {k: _one(k) for k in KINDS}


@pytest.mark.parametrize("world,fsdp", [(2, False), (4, False), (2, True), (4, True)])
def test_transformer_setting_exact_on_several_ranks(reference, world, fsdp):
    """DDP-style (pmptrain averages the gradients) and FSDP2, 2 and 4 ranks: ``rho_scale="costate"``
    alone, the whole transformer setting, and running averages with the averaged gradient with the
    solves shared out across the ranks (the default) and without."""
    kinds = KINDS if (world, fsdp) == (2, False) else ("transformer", "averaged")
    results = run_distributed(_ranks, world, args=(kinds, fsdp), timeout=240.0)
    for kind in kinds:
        ref = reference[kind]
        moved = max(float((ref[n] - p).abs().max()) for n, p in _one_start().items())
        assert moved > 1e-3, kind  # the steps moved the weights
        for r, res in enumerate(results):
            for n, p in res[kind].items():
                err = float((p - ref[n]).abs().max())
                assert err <= TOL, (kind, world, fsdp, r, n, err)


def _one_start():
    return _params(_model())


@pytest.mark.parametrize("costates", ["rows", "dense", "sqnorm"])
def test_calls_without_a_batch_dimension_are_kept_apart_until_unified(costates):
    """One process: the output-gradient rows of an embedding called on ``arange(T)`` (1-D) and of a
    Linear called on a 1-D input are kept in ``shared_g`` and, once unified, give the statistics
    of the rows themselves; a batched call (2-D indices) is folded at once."""
    from pmptrain.capture import CaptureSpec, ModuleCapture
    from pmptrain.modules import adapter_for

    dt = torch.float64
    torch.manual_seed(0)
    emb, lin = torch.nn.Embedding(6, 3).double(), torch.nn.Linear(3, 4).double()
    cap = ModuleCapture()
    cap.add("emb", emb, adapter_for(emb), CaptureSpec("counts", "sqnorm", in_dim=6, out_dim=3, dtype=dt), emb.weight)
    cap.add("lin", lin, adapter_for(lin), CaptureSpec("dense", costates, in_dim=3, out_dim=4, dtype=dt), lin.weight)
    outs = []

    def keep(t):
        t.retain_grad()
        outs.append(t)
        return t

    e = keep(emb(torch.arange(5)))
    y = keep(lin(torch.tanh(e).sum(0)))  # a 1-D input: no batch dimension
    (y.pow(2).sum() + e.pow(3).sum()).backward()
    st_e, st_l = cap.pop("emb"), cap.pop("lin")
    assert len(st_e.shared_g) == 1 and len(st_l.shared_g) == 1 and st_e.g_sq is None and st_l.g_sq is None
    st_e.unify_shared_()
    st_l.unify_shared_()
    ge, gl = outs[0].grad, outs[1].grad.reshape(1, -1)
    assert not st_e.shared_g and float(st_e.g_sq) == pytest.approx(float(ge.pow(2).sum()), rel=1e-14)
    assert float(st_l.g_sq) == pytest.approx(float(gl.pow(2).sum()), rel=1e-14)
    if costates == "dense":
        torch.testing.assert_close(st_l.gg, gl.T @ gl, rtol=1e-14, atol=0)
    elif costates == "rows":
        torch.testing.assert_close(st_l.costate_rows(dt), gl, rtol=0, atol=0)
    # a batched call of the embedding: folded at once, nothing kept apart
    emb(torch.arange(10).reshape(2, 5) % 6).sum().backward()
    st = cap.pop("emb")
    assert not st.shared_g and st.g_sq is not None
    # a call with a batch dimension of 1: kept apart with its indices; alone in its window, it is
    # folded as recorded
    out = keep(emb(torch.arange(5).reshape(1, 5)))
    out.pow(2).sum().backward()
    st = cap.pop("emb")
    assert len(st.shared_g) == 1 and torch.equal(st.shared_x[0], torch.arange(5).reshape(1, 5)) and st.g_sq is None
    st.unify_shared_()
    assert float(st.g_sq) == pytest.approx(float(out.grad.pow(2).sum()), rel=1e-14)
    cap.remove()


# ------------------------------------------------------------------ positions of shape [1, T]
BATCH1_CONFIGS = {"transformer": dict(setting="transformer", max_step=None),
                  "costate": dict(lr=1.0, rho=5.0, rho_scale="costate", max_step=None)}
BATCH1_WAYS = ("ddp", "fsdp", "accumulate", "micro1")


def _batch1_data():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 11, (8, 5), generator=g), torch.randint(0, 11, (8, 5), generator=g)


def _batch1_train(kw, way="one", rank=0, world=1):
    """Hugging Face GPT-2's positions (``wpe(position_ids)``, ``position_ids`` of shape [1, T]) in the
    position model of tests/test_optim.py, 2 steps; each rank on its rows of the batch: wrapped in
    DDP, sharded by FSDP2, unwrapped with 2 micro-batches of loss/2, or unwrapped with micro-batches
    of one sample (whose token-table calls are [1, T] too, on different tokens)."""
    from test_optim import _PositionModel

    torch.manual_seed(0)
    model = _PositionModel("batch1").double()
    net = model
    if way == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(model)
    elif way == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    opt = pmptrain.EMSA(net if way == "ddp" else model, **kw)
    idx, t = _batch1_data()
    part = 8 // world
    idx, t = idx[rank * part:(rank + 1) * part], t[rank * part:(rank + 1) * part]
    micro = {"accumulate": part // 2, "micro1": 1}.get(way, part)
    n = part // micro
    for _ in range(2):
        opt.zero_grad()
        for i in range(n):
            sl = slice(micro * i, micro * (i + 1))
            (F.cross_entropy(net(idx[sl]).flatten(0, 1), t[sl].flatten()) / n).backward()
        opt.step()
        assert not opt.last_step["skipped"], opt.last_step
    return _params(model)


def _batch1_ranks(rank, world):
    return {(c, w): _batch1_train(kw, w, rank, world) for c, kw in BATCH1_CONFIGS.items() for w in BATCH1_WAYS}


def test_positions_of_shape_1_T_are_shared_across_ranks():
    """The position table's [1, T] calls, on the same indices on every rank, are shared (every rank
    agrees for an embedding, one all-gather of 7 integers), so the costate-scaled steps equal one
    process's on the union batch; the token table's [1, T] calls of one-sample micro-batches, on
    different tokens, stay samples. 2 gloo ranks, float64, within 1e-10 (without the agreement,
    7e-4)."""
    from test_optim import _PositionModel

    results = run_distributed(_batch1_ranks, 2, timeout=240.0)
    torch.manual_seed(0)
    pos0 = _PositionModel("batch1").double().pos.weight.detach()
    for c, kw in BATCH1_CONFIGS.items():
        ref = _batch1_train(kw)
        assert float((ref["pos.weight"] - pos0).abs().max()) > 1e-3  # the position table moved
        for w in BATCH1_WAYS:
            for r, res in enumerate(results):
                for n, p in res[c, w].items():
                    err = float((p - ref[n]).abs().max())
                    assert err <= TOL, (c, w, r, n, err)
