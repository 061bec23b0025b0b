"""Solve sharding (issue 20, item 2): each module unit is solved by one owner rank, the results are
exchanged, and every rank applies the same update.

On 2 and 4 gloo ranks (one spawn per world size, module fixture), each rank taking its part of a
fixed global batch: after ``K_STEPS`` steps, with solve sharding on, the parameters are bit-identical
on every rank, bit-identical to the unsharded path (``shard_solves=False``: every rank solves every
unit; the owner computes exactly what every rank would), and within 1e-10 (float64; only the
summation order differs) of one process on the union batch — for EMSA on the primal and Gram routes,
``stat_every=2``, ``stat_decay>0``, under DDP, with an unwrapped ``process_group`` and under FSDP2, on
a model with Linear, LayerNorm (channel) and grouped-convolution units. Every rank must also have
solved only its own units (the solve counts add up to one per unit and step, and more than one
rank solved). A NaN in one rank's batch skips the step on every rank with nothing changed and the
same ``last_step``; a checkpoint written on rank 0 and loaded everywhere resumes bit-exactly (unwrapped model);
a solve that fails on its owner only skips the step on every rank (``LinAlgError``) or raises on every
rank (anything else: the owner's exception, ``SolveFailure`` elsewhere) — no rank hangs.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Dict

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import pmptrain
from pmptrain.optim.rule import StepContext
from pmptrain.optim.solve_shard import assign_owners, solve_cost
from dist_utils import run_distributed

pytestmark = pytest.mark.distributed

K_STEPS = 3
BATCH = 8


class Net(nn.Module):
    """Conv2d → grouped Conv2d → Linear → LayerNorm → Linear: matrix, grouped and channel units."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, groups=2)
        self.fc1 = nn.Linear(16, 12)
        self.ln = nn.LayerNorm(12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(torch.tanh(self.ln(self.fc1(h.flatten(1)))))


CONFIGS = {
    "exact": dict(rho=1.0),
    "primal": dict(rho=1.0, route="primal"),
    "gram": dict(rho=1.0, route="gram"),
    "stat-every": dict(rho=1.0, stat_every=2),
    "stat-decay": dict(rho=1.0, stat_decay=0.5),
    # EMSA(cnn)'s default: statistics every 10th step, reduced per image, the steps between bounded
    "conv": dict(setting="conv"),
}
WRAPS = ("ddp", "group", "fsdp")


def _data(steps: int = K_STEPS):
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(BATCH, 2, 6, 6, generator=g, dtype=torch.float64) for _ in range(4)]
    ys = [torch.randint(0, 3, (BATCH,), generator=g) for _ in range(4)]
    return xs[:steps], ys[:steps]


def _model() -> Net:
    torch.manual_seed(0)
    return Net().double()


def _wrap(model: nn.Module, wrap: str, world: int):
    if world == 1:
        return model
    if wrap == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if wrap == "fsdp":
        from torch.distributed.fsdp import fully_shard
        fully_shard(model.fc1)
        fully_shard(model)
    return model


def _params(model) -> list:
    out = []
    for p in model.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.append(full.detach().clone())
    return out


class _Counter:
    """Counts the units this process solved (``StepContext.solves`` returning True)."""

    def __init__(self):
        self.n = 0
        self._orig = StepContext.solves
        counter = self

        def solves(ctx, unit):
            mine = counter._orig(ctx, unit)
            counter.n += int(mine)
            return mine
        StepContext.solves = solves

    def close(self):
        StepContext.solves = self._orig


def train(config: str, wrap: str, rank: int, world: int, shard: bool = True, steps: int = K_STEPS,
          nan_at: int = -1):
    model = _model()
    opt_model = _wrap(model, wrap, world)
    opt = pmptrain.EMSA(opt_model, shard_solves=shard, **CONFIGS[config])
    xs, ys = _data(steps)
    part = BATCH // world
    infos, counter = [], _Counter()
    before_nan = after_nan = None
    try:
        for k, (x, y) in enumerate(zip(xs, ys)):
            x, y = x[rank * part:(rank + 1) * part].clone(), y[rank * part:(rank + 1) * part]
            if k == nan_at:
                before_nan = _params(model)
                if rank == world - 1:
                    x[0, 0, 0, 0] = float("nan")
            opt.zero_grad()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                F.cross_entropy(opt_model(x), y).backward()
            opt.step()
            infos.append(dict(opt.last_step))
            if k == nan_at:
                after_nan = _params(model)
    finally:
        counter.close()
    return {"params": _params(model), "infos": infos, "solved": counter.n, "before_nan": before_nan, "after_nan": after_nan,
            "skipped": opt.skipped_steps}


def _resume(rank: int, world: int, path: str):
    """2 steps, a checkpoint written by rank 0, a fresh optimizer on every rank loading it, 2 more
    steps; and the uninterrupted 4 steps. The model is unwrapped (``process_group``): a fresh DDP
    wrapper all-reduces its first step's gradients in other buckets than the running one, which on
    4 gloo ranks changes the summation order (not bit-exact, ~1e-16)."""
    xs, ys = _data(4)
    part = BATCH // world

    def run(model, opt, ks):
        for k in ks:
            x, y = xs[k][rank * part:(rank + 1) * part], ys[k][rank * part:(rank + 1) * part]
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    model = _model()
    opt = pmptrain.EMSA(model, rho=1.0, stat_decay=0.5)
    run(model, opt, range(4))
    straight = _params(model)

    model = _model()
    opt = pmptrain.EMSA(model, rho=1.0, stat_decay=0.5)
    run(model, opt, range(2))
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    dist.barrier()
    ck = torch.load(path, weights_only=True)
    model2 = Net().double()
    model2.load_state_dict(ck["model"])
    opt2 = pmptrain.EMSA(model2, rho=1.0, stat_decay=0.5)
    opt2.load_state_dict(ck["opt"])
    run(model2, opt2, range(2, 4))
    return straight, _params(model2)


def _failing_solve(rank: int, world: int, exc_type):
    """fc1's solve (its 12×16 Sylvester system) raises ``exc_type`` on its owner rank only."""
    from pmptrain.optim import affine

    orig = affine.solve_sylvester

    def solve(s, *args, **kwargs):
        if tuple(s.shape) == (12, 16):
            raise exc_type("injected failure of fc1's solve")
        return orig(s, *args, **kwargs)
    affine.solve_sylvester = solve
    model = _model()
    opt = pmptrain.EMSA(model, rho=1.0)
    x, y = _data(1)
    part = BATCH // world
    before = _params(model)
    F.cross_entropy(model(x[0][rank * part:(rank + 1) * part]), y[0][rank * part:(rank + 1) * part]).backward()
    try:
        opt.step()
        raised = None
    except Exception as e:  # noqa: BLE001 - the test compares what each rank raised
        raised = (type(e).__name__, str(e))
    finally:
        affine.solve_sylvester = orig
    return {"raised": raised, "info": dict(opt.last_step), "unchanged": _same(before, _params(model)),
            "owner": rank == __import__("pmptrain.optim.solve_shard", fromlist=["x"]).assign_owners(
                list(opt.units.values()), world)["fc1"]}


def _all_cases(rank: int, world: int, path: str) -> Dict:
    out = {}
    for config in CONFIGS:
        for wrap in WRAPS:
            if wrap == "fsdp" and config not in ("exact", "stat-decay", "conv"):
                continue
            for shard in (True, False):
                if shard or world == 2 or config == "exact":  # 4 ranks: the unsharded path once (time)
                    out[(config, wrap, shard)] = train(config, wrap, rank, world, shard)
    out["nan"] = train("exact", "ddp", rank, world, True, steps=3, nan_at=1)
    out["resume"] = _resume(rank, world, path)
    out["linalg"] = _failing_solve(rank, world, torch.linalg.LinAlgError)
    out["error"] = _failing_solve(rank, world, ValueError)
    return out


@pytest.fixture(scope="module", params=[2, 4])
def runs(request):
    world = request.param
    with tempfile.TemporaryDirectory() as tmp:
        return world, run_distributed(_all_cases, world_size=world, args=(os.path.join(tmp, "ck.pt"),),
                                      timeout=400.0)


def _reference(config: str):
    """One process on the union batch."""
    return train(config, "none", 0, 1, True)["params"]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_sharded_solves_equal_one_process_and_unsharded(runs, config):
    world, results = runs
    ref = _reference(config)
    for wrap in WRAPS:
        if wrap == "fsdp" and config not in ("exact", "stat-decay", "conv"):
            continue
        sharded = [r[(config, wrap, True)] for r in results]
        plain = [r.get((config, wrap, False)) for r in results]
        for r in range(1, world):  # bit-identical on every rank, diagnostics included
            assert _same(sharded[r]["params"], sharded[0]["params"]), (wrap, r)
            assert sharded[r]["infos"] == sharded[0]["infos"], (wrap, r)
        if plain[0] is not None:  # bit for bit what every rank solving computes
            assert _same(sharded[0]["params"], plain[0]["params"]), wrap
            assert sharded[0]["infos"] == plain[0]["infos"], wrap
            assert all(p["solved"] == 5 * K_STEPS for p in plain), [p["solved"] for p in plain]
        for got, want in zip(sharded[0]["params"], ref):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        assert not any(i["skipped"] for i in sharded[0]["infos"])
        # each unit solved once per step in all, by more than one rank; unsharded: by every rank
        solved = [s["solved"] for s in sharded]
        assert sum(solved) == 5 * K_STEPS, solved
        assert sum(1 for n in solved if n > 0) >= 2, solved


def test_nan_on_one_rank_skips_the_step_everywhere(runs):
    world, results = runs
    nan = [r["nan"] for r in results]
    for r in range(world):
        assert nan[r]["infos"][1]["skipped"], nan[r]["infos"][1]
        assert nan[r]["infos"][1] == nan[0]["infos"][1]
        assert nan[r]["infos"][1]["skip_reason"].startswith(("non-finite loss", "non-finite gradient"))
        assert nan[r]["skipped"] == 1
        assert not nan[r]["infos"][2]["skipped"]
        assert _same(nan[r]["params"], nan[0]["params"])
        assert _same(nan[r]["after_nan"], nan[r]["before_nan"]), r  # the skipped step changed nothing
        assert not _same(nan[r]["params"], nan[r]["after_nan"]), r  # the next step moved again
    one = train("exact", "none", 0, 1, True, steps=1)["params"]  # the step before: one process's
    for a, b in zip(nan[0]["before_nan"], one):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_a_failing_solve_on_its_owner_reaches_every_rank(runs):
    world, results = runs
    linalg = [r["linalg"] for r in results]
    assert sum(x["owner"] for x in linalg) == 1
    for x in linalg:  # LinAlgError on the owner: the step is skipped on every rank, alike
        assert x["raised"] is None and x["unchanged"]
        assert x["info"]["skipped"] and x["info"] == linalg[0]["info"]
        assert x["info"]["skip_reason"] == "non-finite statistics or update in unit 'fc1'"
    for x in (r["error"] for r in results):  # any other exception: raised on every rank
        assert x["unchanged"]
        if x["owner"]:
            assert x["raised"] == ("ValueError", "injected failure of fc1's solve")
        else:
            assert x["raised"][0] == "SolveFailure" and "'fc1'" in x["raised"][1], x["raised"]
            assert "injected failure" in x["raised"][1]


def test_resume_from_rank0_checkpoint_is_bit_exact(runs):
    world, results = runs
    for r in range(world):
        straight, resumed = results[r]["resume"]
        assert _same(straight, resumed), r
        assert _same(resumed, results[0]["resume"][1]), r


def test_assignment_is_a_deterministic_greedy_balance():
    opt = pmptrain.EMSA(_model(), rho=1.0)
    units = list(opt.units.values())
    costs = {u.name: solve_cost(u) for u in units}
    assert all(c > 0 for c in costs.values()), costs
    for world in (2, 3, 4):
        owners = assign_owners(units, world)
        assert owners == assign_owners(units, world)  # a pure function of shapes and order
        assert set(owners) == set(costs) and set(owners.values()) <= set(range(world))
        load = [sum(costs[n] for n, r in owners.items() if r == k) for k in range(world)]
        # LPT: the largest load exceeds the mean by at most the largest single cost
        assert max(load) <= sum(load) / world + max(costs.values()) + 1e-9
    # a 100×100 Linear costs more than a 10×10 one; Gram rows below the dimension make it cheaper
    big, small = nn.Linear(100, 100), nn.Linear(10, 10)
    o = pmptrain.EMSA(nn.Sequential(big, small), rho=1.0)
    u = list(o.units.values())
    assert solve_cost(u[0]) > solve_cost(u[1])
    assert solve_cost(u[0], {"0": (4, 4)}) < solve_cost(u[0])
    assert assign_owners(u, 2) == {"0": 0, "1": 1}


def test_shard_solves_must_be_a_bool():
    with pytest.raises(TypeError, match="shard_solves"):
        pmptrain.EMSA(_model(), shard_solves="yes")


def test_state_records_travel_through_the_exchange_layout():
    """The descriptions the owners send (tensors replaced by placeholders into flat per-dtype
    buffers) rebuild every field of a nested state record exactly (AffineState with RunningStats,
    eigenbases with a diagonal side, floats, None)."""
    from pmptrain.optim.affine import AffineState, RunningStats
    from pmptrain.optim.solve_shard import _dress, _Packer

    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    state = AffineState(3, [RunningStats(r(4, 4), r(4), r(2, 2), None, 1.5, 0.25), None],
                        (r(2), r(2, 2)), (r(4).float(), None))
    packer = _Packer()
    desc = packer.strip(state)
    bufs = {dt: torch.cat(ts) for dt, ts in packer.tensors.items()}
    assert set(bufs) == {torch.float64, torch.float32}
    back = _dress(desc, bufs)
    assert type(back) is AffineState and back.step == 3 and back.running[1] is None
    run0, orig = back.running[0], state.running[0]
    assert type(run0) is RunningStats and run0.rows_per_sample == 1.5 and run0.p_trace == 0.25
    for a, b in ((run0.cxx, orig.cxx), (run0.x_mean, orig.x_mean), (run0.cpp, orig.cpp),
                 (back.eig_left[0], state.eig_left[0]), (back.eig_left[1], state.eig_left[1]),
                 (back.eig_right[0], state.eig_right[0])):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert run0.counts is None and back.eig_right[1] is None
