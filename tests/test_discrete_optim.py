"""Tests of pmptrain.DiscreteMSA against the pure rule of pmptrain.discrete (its generic optimizer
contract: tests/test_contract.py)."""

import copy
import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import pmptrain
from pmptrain.discrete import (
    binary_grid,
    discrete_argmax,
    discrete_msa_delta,
    ema_accumulate_,
    on_grid,
    penalty_scale,
    relative_lambda,
    ternary_grid,
)
from pmptrain.optim import EMSA, DiscreteMSA, GroupScheduler
from pmptrain.quant import discrete_parameters

LEVELS = ["binary", "ternary", 2, 4]


def mlp(dtype=torch.float32, bn=False, seed=0, bias=True):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 12, bias=bias)]
    if bn:
        layers.append(nn.BatchNorm1d(12))
    layers += [nn.ReLU(), nn.Linear(12, 10, bias=bias)]
    if bn:
        layers.append(nn.BatchNorm1d(10))
    layers += [nn.ReLU(), nn.Linear(10, 3, bias=bias)]
    return nn.Sequential(*layers).to(dtype)


def data(n=16, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def train_step(model, opt, x, y):
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


def codes(model):
    return [d.param.detach().clone() for d in discrete_parameters(model)]


# ---------------------------------------------------------------- the rule, by hand


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("scale", [None, "channel"])
def test_update_equals_pure_rule_by_hand_and_stays_on_grid(levels, dtype, scale):
    model = mlp(dtype)
    pmptrain.discretize_(model, levels, keep=(), scale=scale)
    rho, a, lam = 0.3, 0.9, (0.002 if levels != "binary" else 0.0)
    opt = DiscreteMSA(model, rho=rho, decay=a, lam=lam, acc_init=1e-7)  # default 1e-12
    dts = discrete_parameters(model)
    accs = [torch.where(d.param >= 0, 1.0, -1.0).to(dtype) * 1e-7 for d in dts]
    for step in range(4):
        x, y = data(seed=step, dtype=dtype)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = [d.param.detach().clone() for d in dts]
        grads = [d.param.grad.clone() for d in dts]
        opt.step()
        flips = 0
        for d, w, g, acc in zip(dts, before, grads, accs):
            ema_accumulate_(acc, -g, a)
            rho_k, _ = penalty_scale(acc, w, d.grid, rho, lam)
            expect = discrete_argmax(w, acc, d.grid, rho_k, lam)
            assert torch.equal(d.param.detach(), expect), (levels, step, d.name)
            assert torch.equal(opt.state_of(d.param).accumulator, acc)
            assert on_grid(d.param.detach(), d.grid)
            layer = opt.last_step["discrete"]["layers"][d.name]
            assert layer["flips"] == int((expect != w).sum()) and layer["rho_k"] == float(rho_k)
            assert layer["density"] == float((expect != 0).sum()) / w.numel()
            assert layer["acc_abs_max"] == float(acc.abs().max())
            assert math.isclose(layer["acc_abs_mean"], float(acc.abs().double().mean()), rel_tol=1e-9)
            flips += layer["flips"]
        assert opt.last_step["discrete"]["total"]["flips"] == flips


def test_fused_rule_equals_reference_with_ties_and_signed_zeros():
    gen = torch.Generator().manual_seed(0)
    for grid in (binary_grid(), ternary_grid()):
        for lam in (0.0, 0.125, 0.25):
            for rho in (0.0, 0.25, 0.5, 1.0, 2.0):
                for kind in range(3):
                    w = grid.tensor(torch.float64)[torch.randint(0, len(grid), (400,), generator=gen)]
                    if kind == 0:  # dyadic: many exact ties
                        m = torch.randint(-16, 17, (400,), generator=gen).double() / 16
                    elif kind == 1:
                        m = torch.randn(400, generator=gen, dtype=torch.float64)
                    else:
                        m = torch.randint(-2, 3, (400,), generator=gen).double() / 8
                        m[:7] = -0.0
                    rk, _ = penalty_scale(m, w, grid, rho, lam)
                    delta, rk2, mx = discrete_msa_delta(w, m, grid, rho, lam)
                    assert float(rk) == float(rk2) and not torch.signbit(rk2)
                    assert torch.equal(w + delta, discrete_argmax(w, m, grid, rk, lam))
                    assert float(mx) == float(m.abs().max())
    with pytest.raises(ValueError, match="grid"):
        discrete_msa_delta(torch.ones(3), torch.ones(3), pmptrain.uniform_grid(2), 0.5)


@pytest.mark.parametrize("levels", ["binary", "ternary", 2])
@pytest.mark.parametrize("scope,lam_mode", [("channel", "absolute"), ("tensor", "relative"), ("channel", "relative")])
def test_scope_and_relative_lambda_equal_the_pure_rule(levels, scope, lam_mode):
    model = mlp(torch.float64)
    pmptrain.discretize_(model, levels, keep=())
    rho, a, lam = 0.7, 0.9, (0.2 if lam_mode == "relative" else 0.002)
    opt = DiscreteMSA(model, rho=rho, decay=a, lam=lam, rho_scope=scope, lam_mode=lam_mode, acc_init=1e-7)
    dts = discrete_parameters(model)
    accs = [torch.where(d.param >= 0, 1.0, -1.0).double() * 1e-7 for d in dts]
    for step in range(5):
        x, y = data(seed=step, dtype=torch.float64)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = [d.param.detach().clone() for d in dts]
        grads = [d.param.grad.clone() for d in dts]
        opt.step()
        for d, w, g, acc in zip(dts, before, grads, accs):
            ema_accumulate_(acc, -g, a)
            lk = relative_lambda(acc, lam, scope) if lam_mode == "relative" else lam
            rho_k, _ = penalty_scale(acc, w, d.grid, rho, lk, scope=scope)
            expect = discrete_argmax(w, acc, d.grid, rho_k, lk)
            assert torch.equal(d.param.detach(), expect), (levels, step, d.name)
            assert torch.equal(opt.state_of(d.param).accumulator, acc)
            layer = opt.last_step["discrete"]["layers"][d.name]
            assert layer["flips"] == int((expect != w).sum()) and layer["rho_k"] == float(rho_k.max())


def test_diagnostics_of_a_past_step_stay_valid():
    model = mlp()
    pmptrain.discretize_(model, "ternary", keep=())
    opt = DiscreteMSA(model, rho=0.5, lam=0.2, lam_mode="relative")
    x, y = data()
    train_step(model, opt, x, y)
    diag = opt.last_step["discrete"]
    d0 = discrete_parameters(model)[0]
    acc_mean = float(opt.state_of(d0.param).accumulator.abs().double().mean())
    before = codes(model)
    for _ in range(3):  # the accumulator's buffer of step 1 is reused by step 3
        train_step(model, opt, x, y)
    # read late: still the first step's numbers (converted before their buffers were reused)
    assert diag["layers"][d0.name]["acc_abs_mean"] == pytest.approx(acc_mean, rel=1e-12)
    assert diag["layers"][d0.name]["numel"] == d0.param.numel()
    assert 0 < diag["total"]["density"] < 1 and diag["total"]["flips"] > 0
    assert any(not torch.equal(b, c) for b, c in zip(before, codes(model)))


def test_a_skipped_step_between_steps_changes_nothing_with_reused_buffers():
    """The accumulator's second buffer: skipped steps (NaN gradient) in the middle of a run leave
    the state and the codes as a run without it has them, step for step."""
    runs = []
    for skip in (False, True):
        model = mlp()
        pmptrain.discretize_(model, "binary", keep=())
        opt = DiscreteMSA(model, rho=0.3)
        x, y = data()
        for t in range(5):
            for _ in range(2 if skip and t == 2 else 0):  # two skipped steps in a row
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                discrete_parameters(model)[0].param.grad[0, 0] = float("nan")
                opt.step()
                assert opt.last_step["skipped"]
            train_step(model, opt, x, y)
        runs.append((codes(model), [opt.state_of(d.param).accumulator.clone() for d in discrete_parameters(model)]))
    (c0, a0), (c1, a1) = runs
    assert all(torch.equal(p, q) for p, q in zip(c0, c1)) and all(torch.equal(p, q) for p, q in zip(a0, a1))


# ---------------------------------------------------------------- rho, empty set


def _one_step_binary(rho):
    model = mlp()
    pmptrain.discretize_(model, "binary", keep=())
    opt = DiscreteMSA(model, rho=rho, decay=0.0)  # a = 0: M is this step's -grad
    x, y = data()
    before = codes(model)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = [d.param.grad.clone() for d in discrete_parameters(model)]
    opt.step()
    return before, grads, codes(model)


def test_rho_ge_one_freezes_binary_and_rho_zero_flips_every_wrong_sign():
    for rho in (1.0, 3.0):
        before, _, after = _one_step_binary(rho)
        assert all(torch.equal(b, c) for b, c in zip(before, after))
    before, grads, after = _one_step_binary(0.0)
    for w, g, new in zip(before, grads, after):
        wrong = (-g) * w < 0
        assert wrong.any() and torch.equal(new, torch.where(wrong, -w, w))


@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_empty_wrong_set_leaves_tensors_unchanged(levels):
    model = mlp()
    pmptrain.discretize_(model, levels, keep=())
    lam = 1e-3 if levels == "ternary" else 0.0
    opt = DiscreteMSA(model, rho=0.5, lam=lam)
    for d in discrete_parameters(model):  # every code maximises M q - λ|q|: the wrong set is empty
        w = d.param.detach()
        opt.state_of(d.param).accumulator = torch.where(w == 0, 0.5 * lam, 2 * lam + 0.1 * w.abs()) * torch.where(w >= 0, 1.0, -1.0)
    before = codes(model)
    opt.zero_grad()
    (0.0 * model(data()[0]).sum()).backward()  # zero gradient: M = a·M, still all right
    opt.step()
    assert all(torch.equal(b, c) for b, c in zip(before, codes(model)))
    layers = opt.last_step["discrete"]["layers"]
    assert all(v["rho_k"] == 0.0 and v["flips"] == 0 for v in layers.values()) and len(layers) == 3


# ---------------------------------------------------------------- schedules and groups


def test_ema_decay_schedule_end_epoch_and_group_scheduler():
    model = mlp()
    pmptrain.discretize_(model, "binary", keep=())
    opt = DiscreteMSA(model, rho=0.5, decay=0.999, decay_gamma=0.95, decay_floor=2e-4)
    seen = []
    for _ in range(40):
        opt.end_epoch()
        seen.append(1.0 - opt.param_groups[0]["decay"])
    expect = [max(1e-3 * 0.95 ** e, 2e-4) for e in range(1, 41)]
    assert all(math.isclose(s, e, rel_tol=1e-9) for s, e in zip(seen, expect))
    assert seen[-1] == pytest.approx(2e-4) and seen[-1] == seen[-2]
    sched = GroupScheduler(opt, "rho", lambda e, r0: r0 * 0.5 ** e)
    sched.step()
    sched.step()
    assert opt.param_groups[0]["rho"] == 0.5 * 0.25
    sd = sched.state_dict()
    s2 = GroupScheduler(opt, "rho", lambda e, r0: r0 * 0.5 ** e)
    s2.load_state_dict(sd)
    s2.step()
    assert s2.epoch == 3 and opt.param_groups[0]["rho"] == 0.5 * 0.125
    with pytest.raises(ValueError, match="key"):
        GroupScheduler(opt, "nope", lambda e, b: b)


def test_param_groups_with_different_rho():
    model = mlp()
    pmptrain.discretize_(model, "binary", keep=())
    l0, l2 = model[0], model[2]
    rest = [p for n, p in model.named_parameters() if not n.startswith(("0.", "2."))]
    opt = DiscreteMSA(model, [
        {"params": list(l0.parameters()), "rho": 0.0, "decay": 0.0},
        {"params": list(l2.parameters()), "rho": 1.0},
        {"params": rest},
    ], rho=0.5)
    assert [g["rho"] for g in opt.param_groups] == [0.0, 1.0, 0.5]
    w0, w2 = l0.weight.detach().clone(), l2.weight.detach().clone()
    opt.zero_grad()
    F.cross_entropy(model(data()[0]), data()[1]).backward()
    g0 = l0.weight.grad.clone()
    opt.step()
    assert torch.equal(l0.weight, torch.where(-g0 * w0 < 0, -w0, w0))  # ρ = 0: all wrong flip
    assert torch.equal(l2.weight, w2)  # ρ = 1 freezes


# ---------------------------------------------------------------- the rest of the model


def test_kept_layers_and_batchnorm_take_the_fallback_step():
    model = mlp(bn=True)
    pmptrain.discretize_(model, "ternary", keep=("first", "last"), scale="tensor", train_scale=True)
    opt = DiscreteMSA(model, fallback_lr=1e-3)
    alpha = model[3].parametrizations.weight[0].alpha
    olds = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    F.cross_entropy(model(data()[0]), data()[1]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    named = dict(model.named_parameters())
    for n in ["0.weight", "0.bias", "1.weight", "1.bias", "3.bias", "3.parametrizations.weight.0.alpha", "4.weight",
              "6.weight", "6.bias"]:
        g = grads[n]
        expect = olds[n] - 1e-3 * g / (g.abs() + 1e-8)  # Adam's first step
        torch.testing.assert_close(named[n].detach(), expect, rtol=0, atol=1e-7)
    assert alpha.requires_grad and on_grid(model[3].parametrizations.weight.original, ternary_grid())
    assert set(opt.last_step["discrete"]["layers"]) == {"3"}


def test_kept_layers_take_the_emsa_step_with_continuous_emsa():
    model = mlp(bn=True)
    pmptrain.discretize_(model, "binary", keep=("first", "last"))
    twin = copy.deepcopy(model)
    opt = DiscreteMSA(model, continuous="emsa", emsa_lr=0.5, emsa_rho=1.0)
    ref = EMSA(twin, lr=0.5, rho=1.0)
    for m, o in ((model, opt), (twin, ref)):
        x, y = data()
        train_step(m, o, x, y)
    for i in (0, 6):  # the kept first and last Linear
        torch.testing.assert_close(model[i].weight, twin[i].weight, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(model[i].bias, twin[i].bias, rtol=1e-6, atol=1e-7)
    assert not torch.equal(model[0].weight, mlp(bn=True)[0].weight)


# ---------------------------------------------------------------- guard and resume


def test_non_finite_gradient_skips_and_leaves_everything_bit_identical():
    model = mlp(bn=True)
    pmptrain.discretize_(model, "ternary", keep=())
    opt = DiscreteMSA(model, lam=1e-7)
    x, y = data()
    for _ in range(2):
        train_step(model, opt, x, y)
    # parameters only: the forward pass itself moves the BatchNorm running statistics
    msd = {k: v.detach().clone() for k, v in model.named_parameters()}
    osd = copy.deepcopy(opt.state_dict())
    for bad in (float("nan"), float("inf")):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        model[3].weight.grad[0, 0] = bad
        opt.step()
        assert opt.last_step["skipped"] and opt.last_step["discrete"]["layers"] == {}
        for k, v in model.named_parameters():
            assert torch.equal(v, msd[k]), k
        now = opt.state_dict()["state"]
        assert now.keys() == osd["state"].keys()
        for i, entry in osd["state"].items():
            for k, v in entry.items():
                assert (now[i][k] is None) if v is None else \
                    torch.equal(torch.as_tensor(now[i][k]), torch.as_tensor(v)), (i, k)
    assert opt.skipped_steps == 2

    def nan_loss():  # finite gradients, non-finite loss returned by the closure: skipped too
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss * float("nan")

    opt.step(nan_loss)
    assert opt.skipped_steps == 3 and all(torch.equal(v, msd[k]) for k, v in model.named_parameters())
    train_step(model, opt, x, y)
    assert not opt.last_step["skipped"]


@pytest.mark.parametrize("levels,extra", [
    ("binary", {}), ("ternary", {}), (2, {}),
    ("binary", {"rho_scope": "channel"}), ("ternary", {"rho_scope": "channel", "lam_mode": "relative", "lam": 0.2}),
])
def test_state_dict_resume_is_bit_exact(levels, extra):
    def build():
        m = mlp(bn=True, seed=3)
        pmptrain.discretize_(m, levels, keep=("first",), scale="channel", train_scale=True)
        kw = dict(rho=0.4, decay=0.99, lam=1e-4, decay_gamma=0.9)
        kw.update(extra)
        return m, DiscreteMSA(m, **kw)

    batches = [data(seed=s) for s in range(8)]
    ref_model, ref_opt = build()
    for i, (x, y) in enumerate(batches):
        train_step(ref_model, ref_opt, x, y)
        if i == 3:
            ref_opt.end_epoch()
    model, opt = build()
    for x, y in batches[:4]:
        train_step(model, opt, x, y)
    opt.end_epoch()
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    model2, opt2 = build()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    for x, y in batches[4:]:
        train_step(model2, opt2, x, y)
    for (k, v), v2 in zip(ref_model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(v, v2), k
    for p, p2 in zip(ref_model.parameters(), model2.parameters()):
        a, b = ref_opt.state_of(p), opt2.state_of(p2)
        for k in vars(a):
            va, vb = getattr(a, k), getattr(b, k)
            assert torch.equal(torch.as_tensor(va), torch.as_tensor(vb)) if va is not None else vb is None, k
    assert opt2.param_groups[0]["decay"] == ref_opt.param_groups[0]["decay"]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("kw,name", [
    ({"rho": -1.0}, "rho"), ({"rho": float("nan")}, "rho"), ({"decay": 1.5}, "decay"),
    ({"lam": -0.1}, "lam"), ({"decay_gamma": 0.0}, "decay_gamma"), ({"decay_floor": 1.0}, "decay_floor"),
    ({"continuous": "lbfgs"}, "continuous"), ({"acc_init": 0.0}, "acc_init"), ({"acc_init": 1e-3}, "acc_init"),
    ({"fallback": "rmsprop"}, "fallback"), ({"emsa_rho": -1.0}, "emsa_rho"),
    ({"rho_scope": "row"}, "rho_scope"), ({"lam_mode": "rel"}, "lam_mode"),
])
def test_invalid_arguments_raise_value_error_naming_them(kw, name):
    model = mlp()
    pmptrain.discretize_(model, "binary", keep=())
    with pytest.raises(ValueError, match=name):
        DiscreteMSA(model, **kw)


def test_invalid_group_value_and_model_without_discrete_weights():
    model = mlp()
    pmptrain.discretize_(model, "binary", keep=())
    with pytest.raises(ValueError, match="decay"):
        DiscreteMSA(model, [{"params": list(model.parameters()), "decay": -0.5}])
    with pytest.raises(ValueError, match="discretize_"):
        DiscreteMSA(mlp())


# ---------------------------------------------------------------- distributed


def _dist_worker(rank, world, wrap):
    import torch.distributed as dist

    torch.manual_seed(0)
    model = mlp(torch.float64, bias=True)
    pmptrain.discretize_(model, "ternary", keep=("last",))
    net = nn.parallel.DistributedDataParallel(model) if wrap else model
    opt = DiscreteMSA(net, rho=0.3, decay=0.9, lam=1e-3)
    for s in range(4):
        x, y = data(n=16, seed=10 + s, dtype=torch.float64)
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        F.cross_entropy(net(xs), ys).backward()
        opt.step()
    gathered = [None] * world
    dist.all_gather_object(gathered, [p.detach().clone() for p in model.parameters()])
    return [p.detach().clone() for p in model.parameters()], gathered


@pytest.mark.parametrize("wrap", [False, True])
def test_ranks_hold_identical_weights_equal_to_single_process(wrap):
    from dist_utils import run_distributed

    results = run_distributed(_dist_worker, world_size=2, args=(wrap,))
    torch.manual_seed(0)
    model = mlp(torch.float64, bias=True)
    pmptrain.discretize_(model, "ternary", keep=("last",))
    opt = DiscreteMSA(model, rho=0.3, decay=0.9, lam=1e-3)
    for s in range(4):
        x, y = data(n=16, seed=10 + s, dtype=torch.float64)
        train_step(model, opt, x, y)
    single = list(model.parameters())
    r0, r1 = results[0][0], results[1][0]
    for a, b, c in zip(r0, r1, single):
        assert torch.equal(a, b)  # every rank holds the same weights (codes and fallback params)
        torch.testing.assert_close(a, c.detach(), rtol=1e-10, atol=1e-12)
    for d_idx in (0, 2):  # the discrete codes equal the single process exactly
        assert torch.equal(r0[d_idx], single[d_idx].detach())
