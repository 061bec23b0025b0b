"""Tests of pmptrain.baselines: one-step updates against hand computations, fallback, non-finite
skip, param groups, errors and bit-exact state_dict resume."""

import copy

import pytest
import torch
from torch import nn

from pmptrain.baselines import TWN, BinaryConnect, Bop
from pmptrain.discrete import on_grid, ternary_grid
from pmptrain.quant import discrete_parameters, discretize_


def test_binaryconnect_one_step_by_hand():
    w = torch.tensor([0.3, -0.2, 0.0, 0.9, -1.5], requires_grad=True)
    opt = BinaryConnect([w], lr=0.25, clip=1.0)
    assert w.tolist() == [1, -1, 1, 1, -1]  # sign(latent) written at construction, sign(0) = +1
    assert opt.state[w]["latent"].tolist() == pytest.approx([0.3, -0.2, 0.0, 0.9, -1.0])  # clipped
    w.grad = torch.tensor([2.0, -1.0, 0.5, -4.0, 0.0])
    opt.step()
    # first Adam step: latent -= lr * g / (|g| + eps)  (= lr * sign(g) for g != 0)
    lat = opt.state[w]["latent"]
    assert lat.tolist() == pytest.approx([0.05, 0.05, -0.25, 1.0, -1.0], abs=1e-6)  # 1.15 clipped to 1
    assert w.tolist() == [1, 1, -1, 1, -1]
    assert opt.last_flip_ratio == pytest.approx(2 / 5)
    # second step by hand with betas (0.9, 0.999)
    g2 = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    w.grad = g2.clone()
    opt.step()
    g1 = torch.tensor([2.0, -1.0, 0.5, -4.0, 0.0], dtype=torch.float64)
    m = 0.9 * 0.1 * g1 + 0.1 * g2.double()
    v = 0.999 * 0.001 * g1**2 + 0.001 * g2.double() ** 2
    step = 0.25 * (m / (1 - 0.9**2)) / ((v / (1 - 0.999**2)).sqrt() + 1e-8)
    expected = (torch.tensor([0.05, 0.05, -0.25, 1.0, -1.0], dtype=torch.float64) - step).clamp(-1, 1)
    assert lat.double().tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert w.tolist() == torch.where(expected >= 0, 1.0, -1.0).tolist()


def test_twn_one_step_by_hand():
    w = torch.tensor([1.0, -0.2, 0.5, -0.9, 0.1, 0.0], requires_grad=True)
    opt = TWN([w], lr=0.1)
    # mean|w| = 2.7/6 = 0.45, delta = 0.315; kept: 1.0, 0.5, -0.9 -> alpha = 0.8
    assert w.tolist() == pytest.approx([0.8, 0.0, 0.8, -0.8, 0.0, 0.0])
    w.grad = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0, 1.0])
    opt.step()
    # latents move by -0.1*sign(g): [0.9, -0.3, 0.6, -0.8, 0.2, -0.1]; mean|.| = 2.9/6
    lat = torch.tensor([0.9, -0.3, 0.6, -0.8, 0.2, -0.1])
    assert opt.state[w]["latent"].tolist() == pytest.approx(lat.tolist(), abs=1e-6)
    delta = 0.7 * 2.9 / 6  # 0.3383: kept 0.9, 0.6, -0.8 -> alpha = 2.3/3
    alpha = 2.3 / 3
    assert ((lat.abs() > delta) == (w != 0)).all()  # exactly the latents above Δ are kept
    assert w.tolist() == pytest.approx([alpha, 0, alpha, -alpha, 0, 0], abs=1e-6)
    t, a = TWN.ternarize(torch.tensor([0.0, 0.0]))
    assert t.tolist() == [0, 0] and float(a) == 0.0


def test_twn_with_scale_buffer_keeps_codes_on_grid():
    torch.manual_seed(0)
    model = discretize_(nn.Sequential(nn.Linear(8, 4, bias=False)), levels="ternary", keep=None, scale="tensor")
    (d,) = discrete_parameters(model)
    opt = TWN(model, lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 8)).pow(2).mean().backward()
        opt.step()
        assert on_grid(d.param, ternary_grid())
        t, alpha = TWN.ternarize(opt.state[d.param]["latent"])
        assert torch.equal(d.param, t) and torch.allclose(d.scale, alpha)
        assert torch.allclose(model[0].weight, alpha * t)


def test_bop_one_step_by_hand():
    w = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0], requires_grad=True)
    opt = Bop([w], gamma=0.5, threshold=0.1)
    w.grad = torch.tensor([1.0, -1.0, -1.0, 0.1, 0.3])
    opt.step()
    # m = 0.5 g = [0.5, -0.5, -0.5, 0.05, 0.15]; flip iff |m| > 0.1 and sign(m) == sign(w)
    assert opt.state[w]["exp_avg"].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.05, 0.15])
    assert w.tolist() == [-1.0, 1.0, 1.0, -1.0, -1.0]
    w.grad = torch.zeros(5)
    opt.step()
    # m halves: [0.25, -0.25, -0.25, 0.025, 0.075]; w now [-1, 1, 1, -1, -1]: no sign agreement > tau
    assert w.tolist() == [-1.0, 1.0, 1.0, -1.0, -1.0]
    assert opt.last_flip_ratio == 0.0


def test_defaults_and_errors():
    w = torch.ones(3, requires_grad=True)
    opt = Bop([w])
    assert opt.defaults["gamma"] == 1e-4 and opt.defaults["threshold"] == 1e-8
    assert BinaryConnect([w]).defaults["lr"] == 1e-3
    for cls, kw, word in [(BinaryConnect, dict(lr=-1.0), "lr"), (BinaryConnect, dict(clip=0.0), "clip"),
                          (BinaryConnect, dict(betas=(1.0, 0.9)), "betas"), (TWN, dict(delta_factor=-1), "delta_factor"),
                          (Bop, dict(gamma=0.0), "gamma"), (Bop, dict(threshold=-1.0), "threshold"),
                          (Bop, dict(gamma=float("nan")), "gamma")]:
        with pytest.raises(ValueError, match=word):
            cls([torch.ones(2, requires_grad=True)], **kw)
    with pytest.raises(ValueError, match="no discrete weights"):
        Bop(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="needs binary"):
        Bop(discretize_(nn.Sequential(nn.Linear(2, 2)), levels="ternary", keep=None))
    with pytest.raises(ValueError, match="params"):
        Bop([1.0])


def small_model(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 10, bias=False), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 10, bias=False),
                      nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3))
    return discretize_(m, keep=("last",))


def data(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


FACTORIES = {
    "binaryconnect": lambda m: BinaryConnect(m, lr=0.01, latent_scale=0.05),
    "twn": lambda m: TWN(m, lr=0.01),
    "bop": lambda m: Bop(m, gamma=0.1, threshold=1e-3),
}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_model_fallback_trains_other_params(name):
    model = small_model()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = FACTORIES[name](model)
    dids = {id(d.param) for d in discrete_parameters(model)}
    assert opt.fallback is not None
    fb = {id(p) for g in opt.fallback.param_groups for p in g["params"]}
    assert fb.isdisjoint(dids) and len(fb) == 6  # 2 BN x (weight, bias) + last Linear (weight, bias)
    train(model, opt, data(0, 3))
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert {"1.weight", "1.bias", "6.weight", "6.bias"} <= changed
    if name != "twn":
        for d in discrete_parameters(model):
            assert d.param.abs().eq(1).all()


@pytest.mark.parametrize("name", list(FACTORIES))
def test_state_dict_resume_bit_exact(name):
    batches = data(1, 8)
    model_a = small_model(3)
    opt_a = FACTORIES[name](model_a)
    train(model_a, opt_a, batches)

    model_b = small_model(3)
    opt_b = FACTORIES[name](model_b)
    train(model_b, opt_b, batches[:4])
    saved_model = copy.deepcopy(model_b.state_dict())
    saved_opt = copy.deepcopy(opt_b.state_dict())

    model_c = small_model(99)  # different init: everything comes from the checkpoint
    model_c.load_state_dict(saved_model)
    opt_c = FACTORIES[name](model_c)
    opt_c.load_state_dict(saved_opt)
    train(model_c, opt_c, batches[4:])
    for (k, va), (_, vc) in zip(model_a.state_dict().items(), model_c.state_dict().items()):
        assert torch.equal(va, vc), k


@pytest.mark.parametrize("name", list(FACTORIES))
def test_nonfinite_gradient_skips_step(name):
    model = small_model()
    opt = FACTORIES[name](model)
    train(model, opt, data(2, 1))
    state = {k: v.detach().clone() for k, v in model.named_parameters()}  # BN buffers move in forward
    opt_state = copy.deepcopy(opt.state_dict())
    x, y = data(3, 1)[0]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    model[1].weight.grad[0] = float("nan")  # a fallback (BN) gradient
    opt.step()
    assert opt.skipped_steps == 1
    for k, v in model.named_parameters():
        assert torch.equal(v, state[k]), k
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    discrete_parameters(model)[0].param.grad[0, 0] = float("inf")
    opt.step()
    assert opt.skipped_steps == 2 and opt.state_dict()["skipped_steps"] == 2
    now = opt.state_dict()
    for i, st in opt_state["state"].items():
        for key, val in st.items():
            assert torch.equal(torch.as_tensor(now["state"][i][key]), torch.as_tensor(val)), key
    for k, v in model.named_parameters():
        assert torch.equal(v, state[k]), k


def test_param_groups_and_discrete_tensor_input():
    a = torch.ones(4, requires_grad=True)
    b = torch.full((4,), -1.0, requires_grad=True)
    opt = Bop([{"params": [a], "gamma": 1.0, "threshold": 0.5}, {"params": b}], gamma=1e-4)
    assert opt.fallback is None and opt.param_groups[1]["gamma"] == 1e-4
    a.grad = torch.full((4,), 0.6)
    b.grad = torch.full((4,), -0.6)
    opt.step()
    # group 1: m = 0.6 > 0.5 agrees with +1 -> flip; group 2: m = -6e-5, |m| > 1e-8 agrees with -1 -> flip
    assert a.tolist() == [-1.0] * 4 and b.tolist() == [1.0] * 4
    model = small_model()
    opt2 = BinaryConnect(discrete_parameters(model), lr=0.1)
    assert opt2.fallback is None and len(opt2.param_groups[0]["params"]) == 2
    sched = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    train(model, opt2, data(4, 1))
    sched.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.05)
