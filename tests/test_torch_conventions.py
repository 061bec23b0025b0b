"""torch.optim conventions beyond the training-loop contract: per-parameter state in ``opt.state``
(what Lightning, ``torch.distributed.checkpoint`` and FSDP walk), dtype/device casting on
``load_state_dict``, defaults for group keys an older state_dict lacks, torch's Adam on complex
parameters, a second ``step()`` on one backward, lazy modules, a positional ``lr``, and parameters
that are not the model's."""

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pmptrain
from helpers import assert_same, tensors_in
from test_contract import REGISTRY, by_name, data, train

IDS = [c.name for c in REGISTRY]


@pytest.fixture(params=REGISTRY, ids=IDS)
def cfg(request):
    return request.param



# ------------------------------------------------------------------------- opt.state, state_dict


def test_state_is_visible_per_parameter_in_opt_state_and_state_dict(cfg):
    model = cfg.make_model()
    opt = cfg.build(model)
    train(model, opt, 2)
    index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    sd = opt.state_dict()
    assert sd["state"], "state_dict()['state'] is empty"
    for unit in opt.units.values():
        p = unit.primary
        assert p in opt.state and tensors_in(opt.state[p]), unit.name  # the unit's record, on its primary parameter
        entry = sd["state"][index[id(p)]]
        assert tensors_in(entry) and int(entry["step"]) >= 1 if "step" in entry else tensors_in(entry), unit.name
        for t in tensors_in(entry):  # state_dict() is a snapshot: it does not alias the live state
            assert all(t is not s for s in tensors_in(opt.state[p]))
    # a bias of a module unit carries the unit's step only: the module's record is on its weight
    primaries = {id(u.primary) for u in opt.units.values()}
    trained = [p for g in opt.param_groups for p in g["params"]]
    assert all(id(p) in primaries or set(opt.state[p]) == {"step"} for p in trained)


def _poison_and_move(opt):
    """What Lightning's ``_optimizer_to_device`` does (``v[key] = move(val)`` for every key but
    ``step``), with a "move" that makes new tensors; the old ones are overwritten with NaN, so a
    step that still used them would be skipped or wrong."""
    old = []
    for st in opt.state.values():
        for key, val in list(st.items()):
            if key == "step":
                continue
            moved = _copy_tree(val)
            old.extend(tensors_in(val))
            st[key] = moved
    for t in old:
        if t.is_floating_point():
            t.fill_(float("nan"))
    return old


def _copy_tree(v):
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, dict):
        return {k: _copy_tree(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_copy_tree(x) for x in v)
    return v


def test_state_moved_like_lightning_is_the_state_the_next_step_uses(cfg):
    ref, run = cfg.make_model(), cfg.make_model()
    ref_opt, opt = cfg.build(ref), cfg.build(run)
    train(ref, ref_opt, 3)
    train(run, opt, 3)
    moved = _poison_and_move(opt)
    assert moved or not any(tensors_in({k: v for k, v in st.items() if k != "step"}) for st in opt.state.values())
    train(ref, ref_opt, 2, start=3)
    train(run, opt, 2, start=3)
    assert opt.skipped_steps == 0
    for p, q in zip(ref.parameters(), run.parameters()):
        assert torch.equal(p, q)
    assert_same(ref_opt.state_dict(), opt.state_dict())


def test_lightning_optimizer_to_device_runs_on_opt_state():
    to_device = pytest.importorskip("lightning_fabric.utilities.optimizer")._optimizer_to_device
    cfg = by_name["emsa-running"]
    model = cfg.make_model()
    opt = cfg.build(model)
    train(model, opt, 2)
    to_device(opt, torch.device("cpu"))
    train(model, opt, 1, start=2)
    assert opt.skipped_steps == 0


def test_torch_save_weights_only_round_trip_of_the_new_format():
    cfg = by_name["emsa-running"]
    model = cfg.make_model()
    opt = cfg.build(model)
    train(model, opt, 2)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert sd["pmptrain"]["format"] == 3 and sd["state"]
    opt.load_state_dict(sd)
    assert_same(opt.state_dict(), sd)


@pytest.mark.parametrize("name", ["emsa", "emsa-running", "emsa-sgd-fallback", "discrete-msa-binary",
                                  "binaryconnect", "twn-scaled", "bop"])
@pytest.mark.parametrize("api", ["plain", "get_set"])
def test_distributed_checkpoint_round_trip_is_bit_exact(tmp_path, name, api):
    """``torch.distributed.checkpoint`` in one process: ``dcp.save`` / ``dcp.load`` of
    ``{"optim": opt.state_dict()}`` (the template from a fresh optimizer), or
    ``get_optimizer_state_dict`` / ``set_optimizer_state_dict``; then training goes on in lockstep."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    cfg = by_name[name]
    ref, run = cfg.make_model(), cfg.make_model()
    ref_opt, opt = cfg.build(ref), cfg.build(run)
    train(ref, ref_opt, 3)
    train(run, opt, 3)
    fresh = cfg.make_model(seed=7)
    fresh.load_state_dict(run.state_dict())
    fresh_opt = cfg.build(fresh)
    if name == "emsa-running":  # kept statistics exist after a step: the template must have them
        train(fresh, fresh_opt, 1, start=50)
        fresh.load_state_dict(run.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is not initialized": one process
        if api == "plain":
            dcp.save({"optim": opt.state_dict()}, checkpoint_id=str(tmp_path))
            state = {"optim": fresh_opt.state_dict()}
            dcp.load(state, checkpoint_id=str(tmp_path))
            fresh_opt.load_state_dict(state["optim"])
        else:
            dcp.save({"optim": get_optimizer_state_dict(run, opt)}, checkpoint_id=str(tmp_path))
            state = {"optim": get_optimizer_state_dict(fresh, fresh_opt)}
            dcp.load(state, checkpoint_id=str(tmp_path))
            set_optimizer_state_dict(fresh, fresh_opt, state["optim"])
    sd, sd_fresh = opt.state_dict(), fresh_opt.state_dict()
    if api == "get_set":  # DCP's API keeps state and param_groups only: the diagnostic counter is not kept
        sd_fresh["pmptrain"]["skipped_steps"] = sd["pmptrain"]["skipped_steps"]
    assert_same(sd, sd_fresh)
    train(ref, ref_opt, 2, start=3)
    train(fresh, fresh_opt, 2, start=3)
    for p, q in zip(ref.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


def test_distributed_checkpoint_template_without_kept_statistics_fails_loudly(tmp_path):
    """E-MSA's kept statistics exist after the first step: a template from a fresh optimizer lacks
    them, and DCP says so (it loads only the template's keys) instead of resuming without them."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.api import CheckpointException

    cfg = by_name["emsa-running"]
    run = cfg.make_model()
    opt = cfg.build(run)
    train(run, opt, 2)
    fresh_opt = cfg.build(cfg.make_model())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"optim": opt.state_dict()}, checkpoint_id=str(tmp_path))
        with pytest.raises(CheckpointException, match="Missing key in checkpoint state_dict: optim.state.0.running"):
            dcp.load({"optim": fresh_opt.state_dict()}, checkpoint_id=str(tmp_path))


def _old_format(opt):
    """The state_dict of format 2 (pmptrain <= this change): every unit's record under
    ``["pmptrain"]["units"][name]["state"]``, ``["state"]`` empty."""
    from pmptrain.optim.rule import record_to_dict

    sd = opt.state_dict()
    units = {name: {"rule": u.rule.name, "params": list(u.param_names), "state": record_to_dict(u.state)}
             for name, u in opt.units.items()}
    return {"state": {}, "param_groups": sd["param_groups"],
            "pmptrain": {"format": 2, "optimizer": type(opt).__name__, "skipped_steps": 0, "units": units}}


def test_old_format_state_dicts_still_load_bit_exact(cfg):
    ref, run = cfg.make_model(), cfg.make_model()
    ref_opt, opt = cfg.build(ref), cfg.build(run)
    train(ref, ref_opt, 3)
    train(run, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": run.state_dict(), "opt": _old_format(opt)}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    fresh = cfg.make_model(seed=9)
    fresh.load_state_dict(ck["model"])
    fresh_opt = cfg.build(fresh)
    fresh_opt.load_state_dict(ck["opt"])
    train(ref, ref_opt, 2, start=3)
    train(fresh, fresh_opt, 2, start=3)
    for p, q in zip(ref.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    assert_same(ref_opt.state_dict(), fresh_opt.state_dict())


# ----------------------------------------------------------------------------- load_state_dict


def test_float64_state_loads_into_a_float32_optimizer_cast_like_torch(cfg):
    """torch casts floating state to the parameter's dtype and device on load (``step`` excepted)."""
    big = cfg.make_model().double()
    opt64 = cfg.build(big)
    x, y = data(0)
    for i in range(2):
        opt64.zero_grad()
        F.cross_entropy(big(x.double()), y).backward()
        opt64.step()
    sd = opt64.state_dict()
    if not any(t.dtype == torch.float64 for t in tensors_in(sd["state"])):
        pytest.skip("E-MSA without kept statistics: a step counter only")
    small = cfg.make_model()
    small.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in big.state_dict().items()})
    opt32 = cfg.build(small)
    opt32.load_state_dict(sd)
    for p, st in opt32.state.items():
        for key, v in st.items():
            for t in tensors_in(v):
                if key != "step" and t.is_floating_point():
                    assert t.dtype == torch.float32, (key, t.dtype)
    train(small, opt32, 2)
    assert opt32.skipped_steps == 0
    for p in small.parameters():
        assert p.dtype == torch.float32


def test_group_keys_missing_from_an_older_state_dict_take_the_defaults():
    """A state_dict saved before ``stat_every`` existed: the key takes its default on load (torch
    fills keys a newer version added), instead of ``KeyError: 'stat_every'`` at ``step()``."""
    cfg = by_name["emsa"]
    model = cfg.make_model()
    opt = cfg.build(model)
    train(model, opt, 2)
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["stat_every"]
    opt2 = cfg.build(model)
    opt2.load_state_dict(sd)
    assert all(g["stat_every"] == 1 for g in opt2.param_groups)
    train(model, opt2, 1, start=2)
    assert opt2.skipped_steps == 0 and not opt2.last_step["skipped"]


# -------------------------------------------------------------------------------- complex Adam


def test_adam_fallback_on_a_complex_parameter_equals_torch_adam():
    class Phasor(nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.z = nn.Parameter(torch.randn(7, dtype=torch.complex128, generator=g))

        def forward(self, t):
            return (self.z - t).abs().pow(2).sum() + (self.z * t).real.sum()

    target = torch.randn(7, dtype=torch.complex128, generator=torch.Generator().manual_seed(1))
    a, b = Phasor(), Phasor()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Phasor has no closed form: its parameter takes the fallback
        opt = pmptrain.EMSA(a, fallback_lr=0.05)
    ref = torch.optim.Adam(b.parameters(), lr=0.05, foreach=False)
    for _ in range(5):
        for m, o in ((a, opt), (b, ref)):
            o.zero_grad()
            m(target).backward()
            o.step()
    torch.testing.assert_close(a.z, b.z, rtol=1e-13, atol=1e-13)
    assert opt.last_step["fallback"] == 1 and not opt.last_step["skipped"]


# ------------------------------------------------------------------------ a second step()


def test_second_step_on_one_backward_is_a_clear_error_for_captured_rules():
    cfg = by_name["emsa"]
    model = cfg.make_model()
    opt = cfg.build(model)
    x, y = data(0)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"step\(\) called again without a new backward pass since the last step"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    opt.zero_grad()  # and the loop goes on
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert not opt.last_step["skipped"]


def test_second_step_on_one_backward_steps_again_like_torch_without_statistics():
    """MSA (nothing captured) is SGD: a second ``step()`` steps again with the same ``.grad``."""
    a = by_name["emsa"].make_model()
    b = by_name["emsa"].make_model()
    opt = pmptrain.MSA(a, lr=0.1)
    ref = torch.optim.SGD(b.parameters(), lr=0.1)
    x, y = data(0)
    for m, o in ((a, opt), (b, ref)):
        F.cross_entropy(m(x), y).backward()
        o.step()
        o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------ lazy modules


def test_lazy_modules_train_like_the_eager_model_of_the_same_shape():
    torch.manual_seed(0)
    lazy = nn.Sequential(nn.LazyLinear(8), nn.LazyBatchNorm1d(), nn.Tanh(), nn.LazyLinear(3)).double()
    eager = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt_l = pmptrain.EMSA(lazy, lr=0.5)
    opt_e = pmptrain.EMSA(eager, lr=0.5)
    assert not opt_l.units and opt_l.state_dict()["pmptrain"]["units"] == {}  # nothing to train before the first call
    for i in range(4):
        x, y = data(i)
        x = x.double()
        out = lazy(x)
        if i == 0:  # the lazy model is initialised by its first forward: give the eager one its weights
            eager.load_state_dict(lazy.state_dict())
        for m, o, z in ((lazy, opt_l, out), (eager, opt_e, eager(x))):
            o.zero_grad()
            F.cross_entropy(z, y).backward()
            o.step()
        assert opt_l.last_step["controlled"] == opt_e.last_step["controlled"] == 3
        for p, q in zip(lazy.parameters(), eager.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    assert [(r["unit"], r["rule"]) for r in opt_l.rule_table()] == [(r["unit"], r["rule"]) for r in opt_e.rule_table()]


# --------------------------------------------------------------------------- constructor args


_CLASSES = [(pmptrain.EMSA, "emsa"), (pmptrain.MSA, "emsa"), (pmptrain.DiscreteMSA, "discrete-msa-binary"),
            (pmptrain.BinaryConnect, "binaryconnect"), (pmptrain.TWN, "twn"), (pmptrain.Bop, "bop")]


@pytest.mark.parametrize("cls,model_of", _CLASSES, ids=[c.__name__ for c, _ in _CLASSES])
def test_a_positional_float_is_the_learning_rate(cls, model_of):
    """``EMSA(model, 0.1)``, the torch habit ``Adam(params, 0.1)``: a number where ``params`` goes
    is the learning rate (``params`` is an iterable, so this is unambiguous)."""
    model = by_name[model_of].make_model()
    opt = cls(model, 0.03)
    assert [g["lr"] for g in opt.param_groups] == [0.03]
    assert len(opt.param_groups[0]["params"]) == len([p for p in model.parameters() if p.requires_grad])
    assert float(cls(model, torch.tensor(0.25)).param_groups[0]["lr"]) == 0.25
    with pytest.raises(TypeError, match="lr"):
        cls(model, 0.03, lr=0.05)


def test_a_parameter_that_is_not_the_models_is_refused_naming_it(cfg):
    model = cfg.make_model()
    stray = nn.Parameter(torch.zeros(4, 5))
    with pytest.raises(ValueError, match=r"not a parameter of the model.*\(4, 5\)"):
        cfg.build(model, list(model.parameters()) + [stray])
    opt = cfg.build(model)
    with pytest.raises(ValueError, match=r"not a parameter of the model"):
        opt.add_param_group({"params": [stray]})
    assert len(opt.param_groups) == 1
