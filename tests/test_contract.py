"""The torch.optim contract, for every pmptrain optimizer configuration.

One registry (:data:`REGISTRY`, torch's ``optim_db`` idea: a builder, the model it needs, its error
inputs and capabilities) drives torch's generic optimizer behaviours — state_dict lockstep resume,
deepcopy, pickling, step and state_dict hooks, param groups, tensor lr, error inputs, every LR
scheduler — and the training-loop rules: lr = 0 freezes everything, a step without gradients is a
no-op, non-finite gradients skip the step with nothing changed, the GradScaler recipe with
clipping, hook lifetime, and bare parameters refused.
"""

import copy
import gc
import io
import pickle
from dataclasses import dataclass, field
from typing import Callable, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import lr_scheduler as sched
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.optim.swa_utils import SWALR

import pmptrain
from helpers import assert_same


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                         nn.Linear(12, 3))


def _discrete(levels, scale=None):
    def make(seed=0):
        return pmptrain.discretize_(_mlp(seed), levels, keep=("first",), scale=scale)

    return make


@dataclass
class Config:
    name: str
    build: Callable  # (model, params=None, **overrides) -> optimizer
    make_model: Callable = _mlp
    errors: List[Tuple[dict, type, str]] = field(default_factory=list)
    captures: bool = True  # hooks the model
    lowers_loss: bool = True


_EMSA_ERRORS = [
    ({"lr": -1.0}, ValueError, "lr"), ({"lr": float("nan")}, ValueError, "lr"), ({"rho": -0.1}, ValueError, "rho"),
    ({"route": "fast"}, ValueError, "route"), ({"costate": "none"}, ValueError, "costate"),
    ({"stat_decay": 1.0}, ValueError, "stat_decay"), ({"eig_refresh": 0}, ValueError, "eig_refresh"),
    ({"amortise": "soap"}, ValueError, "amortise"), ({"stat_reduce": "yes"}, TypeError, "stat_reduce"),
    ({"eig_floor": -1.0}, ValueError, "eig_floor"), ({"fallback": "rmsprop"}, ValueError, "fallback"),
    ({"fallback_lr": -1.0}, ValueError, "fallback_lr"), ({"fallback_lr": float("inf")}, ValueError, "fallback_lr"),
    ({"betas": (0.9, 1.0)}, ValueError, r"betas\[1\]"), ({"betas": 0.9}, TypeError, "betas"),
    ({"eps": 0.0}, ValueError, "eps"), ({"eps": "x"}, TypeError, "eps"), ({"momentum": 1.0}, ValueError, "momentum"),
    ({"weight_decay": -1.0}, ValueError, "weight_decay"), ({"solver": "magic"}, ValueError, "solver"),
    ({"inner_steps": 0}, ValueError, "inner_steps"), ({"inner_lr": 0.0}, ValueError, "inner_lr"),
    ({"inner_optimizer": "newton"}, ValueError, "inner_optimizer"), ({"eig_float64": 1}, TypeError, "eig_float64"),
    ({"costate": "isotropic", "stat_decay": 0.5}, ValueError, "stat_decay"), ({"strict": "yes"}, TypeError, "strict"),
    ({"stat_every": 0}, ValueError, "stat_every"), ({"stat_every": 1.5}, TypeError, "stat_every"),
    ({"costate": "isotropic", "stat_every": 2}, ValueError, "stat_every"),
]
_DMSA_ERRORS = [
    ({"rho": -1.0}, ValueError, "rho"), ({"decay": 1.5}, ValueError, "decay"), ({"lam": -1.0}, ValueError, "lam"),
    ({"decay_gamma": 0.0}, ValueError, "decay_gamma"), ({"decay_floor": 1.0}, ValueError, "decay_floor"),
    ({"rho_scope": "row"}, ValueError, "rho_scope"), ({"lam_mode": "x"}, ValueError, "lam_mode"),
    ({"acc_init": 0.0}, ValueError, "acc_init"), ({"acc_init": 1e-3}, ValueError, "acc_init"),
    ({"continuous": "adam"}, ValueError, "continuous"), ({"emsa_rho": -1.0}, ValueError, "emsa_rho"),
    ({"fallback_lr": float("inf")}, ValueError, "fallback_lr"), ({"rho": float("inf")}, ValueError, "rho"),
]
_LATENT_ERRORS = [({"lr": -1.0}, ValueError, "lr"), ({"betas": (1.0, 0.9)}, ValueError, r"betas\[0\]"),
                  ({"eps": -1.0}, ValueError, "eps"), ({"latent_scale": 0.0}, ValueError, "latent_scale"),
                  ({"fallback_lr": -1.0}, ValueError, "fallback_lr")]


def _emsa(**kw):
    return lambda model, params=None, **o: pmptrain.EMSA(model, params, **{**kw, **o})


REGISTRY = [
    Config("emsa", _emsa(), errors=_EMSA_ERRORS),
    Config("emsa-primal-exact", _emsa(route="primal", costate="exact")),
    Config("emsa-gram-exact", _emsa(route="gram", costate="exact")),
    Config("emsa-isotropic", _emsa(costate="isotropic")),
    Config("emsa-running", _emsa(stat_decay=0.9, eig_refresh=2)),
    Config("emsa-amortised", _emsa(stat_every=2)),
    Config("emsa-amortised-bounded-reduce", _emsa(stat_every=2, amortise="bounded", stat_reduce=True)),
    Config("emsa-amortised-rescaled-averaged", _emsa(stat_every=3, amortise="rescaled", stat_decay=0.5, grad_decay=0.5)),
    Config("emsa-sgd-fallback", _emsa(fallback="sgd", fallback_lr=0.01)),
    Config("emsa-iterative", _emsa(solver="iterative", inner_steps=2)),
    Config("msa", lambda model, params=None, **o: pmptrain.MSA(model, params, **{"lr": 0.5, **o}), captures=False),
    Config("discrete-msa-binary", lambda m, p=None, **o: pmptrain.DiscreteMSA(m, p, **{"rho": 0.5, **o}),
           _discrete("binary"), _DMSA_ERRORS, captures=False, lowers_loss=False),
    Config("discrete-msa-ternary", lambda m, p=None, **o: pmptrain.DiscreteMSA(
        m, p, **{"rho": 0.95, "lam": 0.2, "lam_mode": "relative", **o}), _discrete("ternary"), captures=False,
        lowers_loss=False),
    Config("discrete-msa-2bit-emsa", lambda m, p=None, **o: pmptrain.DiscreteMSA(
        m, p, **{"continuous": "emsa", "rho_scope": "channel", **o}), _discrete(2), lowers_loss=False),
    Config("binaryconnect", lambda m, p=None, **o: pmptrain.BinaryConnect(m, p, **{"latent_scale": 0.05, **o}),
           _discrete("binary"), _LATENT_ERRORS + [({"clip": 0.0}, ValueError, "clip")], captures=False,
           lowers_loss=False),
    Config("twn-scaled", lambda m, p=None, **o: pmptrain.TWN(m, p, **{"latent_scale": 0.05, **o}),
           _discrete("ternary", scale="tensor"), _LATENT_ERRORS + [({"delta_factor": -1.0}, ValueError, "delta_factor")],
           captures=False, lowers_loss=False),
    Config("twn", lambda m, p=None, **o: pmptrain.TWN(m, p, **o), _discrete("ternary"), captures=False,
           lowers_loss=False),
    Config("bop", lambda m, p=None, **o: pmptrain.Bop(m, p, **{"lr": 1e-2, **o}), _discrete("binary"),
           [({"lr": 2.0}, ValueError, "lr"), ({"threshold": -1.0}, ValueError, "threshold")], captures=False,
           lowers_loss=False),
]
IDS = [c.name for c in REGISTRY]
by_name = {c.name: c for c in REGISTRY}


def data(seed, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def train(model, opt, steps, start=0, scheduler=None):
    losses = []
    for i in range(start, start + steps):
        x, y = data(i)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def weights(model):
    """The model's state without BatchNorm's running statistics (any train-mode forward moves them)."""
    return {k: v for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}


def assert_models_equal(a, b):
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n


@pytest.fixture(params=REGISTRY, ids=IDS)
def cfg(request):
    return request.param


# ------------------------------------------------------------------------------ basic behaviour


def test_trains(cfg):
    model = cfg.make_model()
    opt = cfg.build(model)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = data(0, 64)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert opt.skipped_steps == 0 and not opt.last_step["skipped"]
    moved = [not torch.equal(p, q) for p, q in zip(model.parameters(), before) if p.dim() == 2]
    assert all(moved) if cfg.lowers_loss else any(moved)
    if cfg.lowers_loss:
        assert losses[-1] < 0.9 * losses[0]
    assert repr(opt).startswith(type(opt).__name__)


def test_state_dict_lockstep_resume_is_bit_exact(cfg):
    ref = cfg.make_model()
    ref_opt = cfg.build(ref)
    train(ref, ref_opt, 6)
    run = cfg.make_model()
    opt = cfg.build(run)
    train(run, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": run.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)  # plain data: no code runs on load
    fresh = cfg.make_model(seed=123)
    fresh.load_state_dict(ck["model"])
    opt2 = cfg.build(fresh)
    opt2.load_state_dict(ck["opt"])
    train(fresh, opt2, 3, start=3)
    assert_models_equal(ref, fresh)
    assert_same(ref_opt.state_dict(), opt2.state_dict())


def test_load_state_dict_refuses_foreign_or_mismatched_state(cfg):
    model = cfg.make_model()
    opt = cfg.build(model)
    with pytest.raises(ValueError, match="pmptrain"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
    sd = opt.state_dict()
    sd["pmptrain"]["units"].pop(next(iter(sd["pmptrain"]["units"])))
    with pytest.raises(ValueError, match="missing"):
        opt.load_state_dict(sd)


def test_deepcopy_and_pickle_give_working_independent_copies(cfg):
    model = cfg.make_model()
    opt = cfg.build(model)
    scheduler = sched.StepLR(opt, 1, 0.9)  # wraps opt.step on the instance: must not leak into copies
    train(model, opt, 2, scheduler=scheduler)
    clones = [copy.deepcopy(opt)]
    try:
        pickle.dumps(model)
    except RuntimeError as e:  # torch cannot pickle parametrized modules (scaled discrete layers)
        with pytest.raises(RuntimeError, match="parametrized"):
            pickle.dumps(opt)
        assert "parametrized" in str(e)
    else:
        clones.append(pickle.loads(pickle.dumps(opt)))
    before = copy.deepcopy(weights(model))
    for clone in clones:
        assert_same(clone.state_dict(), opt.state_dict())
        assert clone.model is not model
        train(clone.model, clone, 2, start=2)  # the copy trains its own copy of the model
    assert_same(weights(model), before)  # training the copies did not touch the original
    train(model, opt, 2, start=2)
    assert_models_equal(model, clone.model)
    assert_same(clone.state_dict(), opt.state_dict())


def test_step_and_state_dict_hooks_fire_once_and_see_the_whole_state(cfg):
    model = cfg.make_model()
    opt = cfg.build(model)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    h1 = register_optimizer_step_pre_hook(lambda o, a, k: calls.append("gpre") if o is opt else None)
    try:
        train(model, opt, 2)
    finally:
        h1.remove()
    assert calls == ["gpre", "pre", "post"] * 2
    seen = {}
    opt.register_state_dict_pre_hook(lambda o: seen.update(pre=True))
    opt.register_state_dict_post_hook(lambda o, sd: seen.update(post=sorted(sd)))
    sd = opt.state_dict()
    assert seen == {"pre": True, "post": ["param_groups", "pmptrain", "state"]}

    def edit(o, sd):
        sd = dict(sd)
        sd["pmptrain"] = dict(sd["pmptrain"], skipped_steps=7)
        return sd

    opt.register_load_state_dict_pre_hook(edit)
    opt.register_load_state_dict_post_hook(lambda o: seen.update(load_post=o.skipped_steps))
    opt.load_state_dict(sd)
    assert opt.skipped_steps == 7 and seen["load_post"] == 7


def test_param_groups_and_add_param_group(cfg):
    a, b = cfg.make_model(), cfg.make_model()
    pa = list(a.parameters())
    pb = list(b.parameters())
    half = len(pa) // 2
    opt_a = cfg.build(a, [{"params": pa[:half]}, {"params": pa[half:]}])
    opt_b = cfg.build(b, [{"params": pb[:half]}])
    opt_b.add_param_group({"params": pb[half:]})
    train(a, opt_a, 3)
    train(b, opt_b, 3)
    assert_models_equal(a, b)
    assert [r["unit"] for r in opt_a.rule_table()] and \
        sorted(r["unit"] for r in opt_a.rule_table()) == sorted(r["unit"] for r in opt_b.rule_table())
    with pytest.raises(ValueError, match="lr"):
        opt_b.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "lr": -1.0})
    assert len(opt_b.param_groups) == 2


def test_tensor_lr_equals_float_lr(cfg):
    a, b = cfg.make_model(), cfg.make_model()
    lr = cfg.build(cfg.make_model()).defaults["lr"]  # not built on a: TWN writes α·t into it when built
    opt_a, opt_b = cfg.build(a, lr=lr), cfg.build(b, lr=torch.tensor(lr))
    train(a, opt_a, 3)
    train(b, opt_b, 3)
    assert_models_equal(a, b)


def test_error_inputs_name_the_argument(cfg):
    for kwargs, exc, word in cfg.errors:
        with pytest.raises(exc, match=word):
            cfg.build(cfg.make_model(), **kwargs)


def test_bare_parameters_are_refused_with_a_clear_error(cfg):
    with pytest.raises(TypeError, match="model itself"):
        cfg.build(cfg.make_model().parameters())


# -------------------------------------------------------------------------------- schedulers


def _schedulers(opt):
    return {
        "StepLR": lambda: sched.StepLR(opt, 2, 0.5),
        "MultiStepLR": lambda: sched.MultiStepLR(opt, [1, 3], 0.5),
        "ConstantLR": lambda: sched.ConstantLR(opt, 0.5, total_iters=2),
        "LinearLR": lambda: sched.LinearLR(opt, 0.2, 1.0, total_iters=3),
        "ExponentialLR": lambda: sched.ExponentialLR(opt, 0.8),
        "PolynomialLR": lambda: sched.PolynomialLR(opt, total_iters=4, power=2.0),
        "CosineAnnealingLR": lambda: sched.CosineAnnealingLR(opt, 4),
        "CosineAnnealingWarmRestarts": lambda: sched.CosineAnnealingWarmRestarts(opt, 2),
        "CyclicLR": lambda: sched.CyclicLR(opt, 0.1 * opt.param_groups[0]["lr"], opt.param_groups[0]["lr"], 2),
        "OneCycleLR": lambda: sched.OneCycleLR(opt, opt.param_groups[0]["lr"], total_steps=10),
        "LambdaLR": lambda: sched.LambdaLR(opt, lambda s: 1.0 / (1 + s)),
        "MultiplicativeLR": lambda: sched.MultiplicativeLR(opt, lambda s: 0.9),
        "SequentialLR": lambda: sched.SequentialLR(opt, [sched.LinearLR(opt, 0.5, total_iters=2),
                                                        sched.ExponentialLR(opt, 0.9)], [2]),
        "ChainedScheduler": lambda: sched.ChainedScheduler([sched.ConstantLR(opt, 0.5, total_iters=2),
                                                            sched.ExponentialLR(opt, 0.9)]),
        "ReduceLROnPlateau": lambda: sched.ReduceLROnPlateau(opt, patience=0, factor=0.5),
        "SWALR": lambda: SWALR(opt, swa_lr=0.5 * opt.param_groups[0]["lr"], anneal_epochs=2),
    }


SCHEDULERS = list(_schedulers(None))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_lr_scheduler_drives_every_optimizer(cfg, name):
    """Each scheduler runs and writes the same lr sequence as on torch.optim.SGD; the fallback
    (and discrete) steps follow lr/base_lr."""
    model = cfg.make_model()
    opt = cfg.build(model)
    lr0 = float(opt.param_groups[0]["lr"])
    ref_model = _mlp()
    ref = torch.optim.SGD(ref_model.parameters(), lr=lr0, momentum=0.9)
    s, s_ref = _schedulers(opt)[name](), _schedulers(ref)[name]()
    for i in range(4):
        train(model, opt, 1, start=i)
        ref.step()  # no gradients: a no-op that keeps the scheduler's call-order check quiet
        if name == "ReduceLROnPlateau":
            s.step(1.0)
            s_ref.step(1.0)
        else:
            s.step()
            s_ref.step()
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(float(ref.param_groups[0]["lr"]))
    assert opt.skipped_steps == 0


def test_lr_zero_freezes_the_whole_model(cfg):
    model = cfg.make_model()
    opt = cfg.build(model)
    train(model, opt, 2)
    for g in opt.param_groups:
        g["lr"] = 0.0
    before = copy.deepcopy(model.state_dict())
    train(model, opt, 3, start=2)
    for k, v in model.state_dict().items():
        if "running" not in k and "num_batches" not in k:  # BatchNorm buffers move in any forward
            assert torch.equal(v, before[k]), k


# -------------------------------------------------------------------------- the training loop


def test_step_without_gradients_is_a_no_op(cfg):
    model = cfg.make_model()
    opt = cfg.build(model)
    before, sd = copy.deepcopy(weights(model)), copy.deepcopy(opt.state_dict())
    opt.step()
    model(data(0)[0])  # a forward without backward
    opt.step()
    assert_same(weights(model), before)
    assert_same(opt.state_dict(), sd)


def test_non_finite_gradient_skips_the_step_and_changes_nothing(cfg):
    model = cfg.make_model()
    opt = cfg.build(model)
    train(model, opt, 2)
    before, sd = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    x, y = data(5)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    params[-1].grad.view(-1)[0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1 and opt.last_step["skipped"] and "gradient" in opt.last_step["skip_reason"]
    for k, v in model.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, before[k]), k
    expected = copy.deepcopy(sd)
    expected["pmptrain"]["skipped_steps"] = 1
    assert_same(opt.state_dict(), expected)
    train(model, opt, 1, start=6)  # and training goes on
    assert not opt.last_step["skipped"]


@pytest.mark.parametrize("unscale_first", [False, True])
def test_gradscaler_recipe_with_clipping_equals_the_unscaled_loop(cfg, unscale_first):
    """``scaler.scale(loss).backward(); scaler.unscale_(opt); clip_grad_norm_; scaler.step(opt);
    scaler.update()`` (torch's documented recipe) gives the update of the same loop without scaling
    (powers-of-two scales are exact; the captured costates are unscaled too)."""
    a, b = cfg.make_model(), cfg.make_model()
    oa, ob = cfg.build(a), cfg.build(b)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for i in range(3):
        x, y = data(i)
        oa.zero_grad()
        scaler.scale(F.cross_entropy(a(x), y)).backward()
        if unscale_first:
            scaler.unscale_(oa)
            torch.nn.utils.clip_grad_norm_(a.parameters(), 0.5)
        scaler.step(oa)
        scaler.update()
        ob.zero_grad()
        F.cross_entropy(b(x), y).backward()
        if unscale_first:
            torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
        ob.step()
    assert oa.skipped_steps == 0
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_gradscaler_inf_skips_and_backs_off(cfg):
    model = cfg.make_model()
    opt = cfg.build(model)
    train(model, opt, 1)
    before, sd = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    x, y = data(3)
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
    scaler.step(opt)  # GradScaler finds the inf and does not call opt.step()
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 15
    for k, v in model.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, before[k]), k
    assert_same(opt.state_dict(), sd)
    opt.zero_grad()  # the next iteration starts clean: no statistics of the skipped one remain
    assert not opt.capture.has_data()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    assert not opt.last_step["skipped"]


def test_hooks_live_as_long_as_the_optimizer(cfg):
    model = cfg.make_model()

    def n_hooks():
        return sum(len(m._forward_hooks) for m in model.modules())

    base = n_hooks()
    opt = cfg.build(model)
    assert (n_hooks() > base) == cfg.captures
    train(model, opt, 1)
    del opt
    gc.collect()
    assert n_hooks() == base  # garbage-collected optimizer: no hook records activations any more
    first = cfg.build(model)
    with_one = n_hooks()
    second = cfg.build(model)  # a second optimizer on the same model replaces the first
    assert n_hooks() == with_one
    train(model, second, 1)
    if cfg.captures:
        x, y = data(0)
        F.cross_entropy(model(x), y).backward()
        with pytest.raises(RuntimeError, match="another pmptrain optimizer"):
            first.step()
    del first, second
    gc.collect()
    assert n_hooks() == base


def test_detach_and_context_manager(cfg):
    model = cfg.make_model()
    base = sum(len(m._forward_hooks) for m in model.modules())
    with cfg.build(model) as opt:
        train(model, opt, 1)
    assert sum(len(m._forward_hooks) for m in model.modules()) == base
    with pytest.raises(RuntimeError, match="detached"):
        opt.step()
