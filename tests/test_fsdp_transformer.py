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
    emb(torch.arange(5).reshape(1, 5)).sum().backward()
    st = cap.pop("emb")
    assert not st.shared_g and st.g_sq is not None
    cap.remove()
