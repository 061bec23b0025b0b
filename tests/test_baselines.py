"""BinaryConnect, TWN and Bop: one-step updates against hand computations, the rule each parameter
gets, unscaling under AMP, param groups and errors. The generic contract (resume, schedulers,
non-finite skips, hooks, copies) is tested in tests/test_contract.py."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pmptrain import TWN, BinaryConnect, Bop
from pmptrain.discrete import on_grid, ternary_grid
from pmptrain.optim.elementwise import ternarize
from pmptrain.quant import discrete_parameters, discretize_


def one_weight(values, levels="binary"):
    """A model holding one discrete 1×k weight whose entries are then set to ``values`` (so the
    latent initialisation of the baselines sees arbitrary numbers, as in the papers)."""
    lin = nn.Linear(len(values), 1, bias=False)
    model = discretize_(nn.Sequential(lin), levels=levels, keep=None)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([values]))
    return model, lin.weight


def test_binaryconnect_one_step_by_hand():
    model, w = one_weight([0.3, -0.2, 0.0, 0.9, -1.5])
    opt = BinaryConnect(model, lr=0.25, clip=1.0, latent_scale=1.0)
    assert w.tolist() == [[1, -1, 1, 1, -1]]  # sign(latent) written at construction, sign(0) = +1
    assert opt.state_of(w).latent.tolist() == [pytest.approx([0.3, -0.2, 0.0, 0.9, -1.0])]  # clipped
    w.grad = torch.tensor([[2.0, -1.0, 0.5, -4.0, 0.0]])
    opt.step()
    # first Adam step: latent -= lr * g / (|g| + eps)  (= lr * sign(g) for g != 0)
    lat = opt.state_of(w).latent
    assert lat.tolist() == [pytest.approx([0.05, 0.05, -0.25, 1.0, -1.0], abs=1e-6)]  # 1.15 clipped to 1
    assert w.tolist() == [[1, 1, -1, 1, -1]]
    assert opt.last_step["discrete"]["total"]["flip_ratio"] == pytest.approx(2 / 5)
    # second step by hand with betas (0.9, 0.999)
    g2 = torch.ones(1, 5)
    w.grad = g2.clone()
    opt.step()
    g1 = torch.tensor([2.0, -1.0, 0.5, -4.0, 0.0], dtype=torch.float64)
    m = 0.9 * 0.1 * g1 + 0.1
    v = 0.999 * 0.001 * g1**2 + 0.001
    step = 0.25 * (m / (1 - 0.9**2)) / ((v / (1 - 0.999**2)).sqrt() + 1e-8)
    expected = (torch.tensor([0.05, 0.05, -0.25, 1.0, -1.0], dtype=torch.float64) - step).clamp(-1, 1)
    assert opt.state_of(w).latent[0].double().tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert w[0].tolist() == torch.where(expected >= 0, 1.0, -1.0).tolist()


def test_twn_one_step_by_hand():
    model, w = one_weight([1.0, -0.2, 0.5, -0.9, 0.1, 0.0], "ternary")
    opt = TWN(model, lr=0.1, latent_scale=1.0)
    # mean|w| = 2.7/6 = 0.45, delta = 0.315; kept: 1.0, 0.5, -0.9 -> alpha = 0.8
    assert w[0].tolist() == pytest.approx([0.8, 0.0, 0.8, -0.8, 0.0, 0.0])
    w.grad = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0, 1.0]])
    opt.step()
    # latents move by -0.1*sign(g): [0.9, -0.3, 0.6, -0.8, 0.2, -0.1]; mean|.| = 2.9/6
    lat = torch.tensor([0.9, -0.3, 0.6, -0.8, 0.2, -0.1])
    assert opt.state_of(w).latent[0].tolist() == pytest.approx(lat.tolist(), abs=1e-6)
    delta = 0.7 * 2.9 / 6  # 0.3383: kept 0.9, 0.6, -0.8 -> alpha = 2.3/3
    alpha = 2.3 / 3
    assert ((lat.abs() > delta) == (w[0] != 0)).all()  # exactly the latents above Δ are kept
    assert w[0].tolist() == pytest.approx([alpha, 0, alpha, -alpha, 0, 0], abs=1e-6)
    t, a = ternarize(torch.tensor([0.0, 0.0]))
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
        t, alpha = ternarize(opt.state_of(d.param).latent)
        assert torch.equal(d.param, t) and torch.allclose(d.scale, alpha)
        assert torch.allclose(model[0].weight, alpha * t)


def test_bop_one_step_by_hand_and_lr_is_gamma():
    model, w = one_weight([1.0, 1.0, -1.0, -1.0, 1.0])
    opt = Bop(model, lr=0.5, threshold=0.1)
    w.grad = torch.tensor([[1.0, -1.0, -1.0, 0.1, 0.3]])
    opt.step()
    # m = 0.5 g = [0.5, -0.5, -0.5, 0.05, 0.15]; flip iff m·w > 0.1
    assert opt.state_of(w).exp_avg[0].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.05, 0.15])
    assert w[0].tolist() == [-1.0, 1.0, 1.0, -1.0, -1.0]
    w.grad = torch.zeros(1, 5)
    opt.step()
    # m halves: [0.25, -0.25, -0.25, 0.025, 0.075]; w now [-1, 1, 1, -1, -1]: no m·w > tau
    assert w[0].tolist() == [-1.0, 1.0, 1.0, -1.0, -1.0]
    assert opt.last_step["discrete"]["total"]["flips"] == 0
    assert Bop(one_weight([1.0])[0]).defaults["lr"] == 1e-4


def small_model(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 10, bias=False), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 10, bias=False),
                      nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3))
    return discretize_(m, keep=("last",))


FACTORIES = {
    "binaryconnect": (lambda m, **k: BinaryConnect(m, lr=0.01, latent_scale=0.05, **k), "latent-sign"),
    "bop": (lambda m, **k: Bop(m, lr=0.1, threshold=1e-3, **k), "bop"),
}


@pytest.mark.parametrize("name", ["binaryconnect", "bop"])
def test_discrete_weights_get_the_rule_and_everything_else_the_fallback(name):
    model = small_model()
    build, rule = FACTORIES[name]
    opt = build(model)
    table = {r["unit"]: r["rule"] for r in opt.rule_table()}
    assert table == {"0.weight": rule, "3.weight": rule, "1.weight": "fallback", "1.bias": "fallback",
                     "4.weight": "fallback", "4.bias": "fallback", "6.weight": "fallback", "6.bias": "fallback"}
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(16, 6, generator=g)), torch.randint(0, 3, (16,), generator=g)).backward()
        opt.step()
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert {"1.weight", "1.bias", "6.weight", "6.bias"} <= changed
    for d in discrete_parameters(model):
        assert d.param.abs().eq(1).all()  # BatchNorm and the kept layer are not binarised


def test_fallback_sees_unscaled_gradients_under_gradscaler():
    """Under GradScaler the fallback Adam of every baseline gets ∇J, not S·∇J (Adam is almost
    scale-invariant, so SGD makes a missing unscale visible)."""
    for build, _ in FACTORIES.values():
        a, b = small_model(), small_model()
        oa, ob = build(a, fallback="sgd", fallback_lr=0.1, momentum=0.0), build(b, fallback="sgd", fallback_lr=0.1,
                                                                               momentum=0.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
        scaler.scale(F.cross_entropy(a(x), y)).backward()
        scaler.step(oa)
        F.cross_entropy(b(x), y).backward()
        ob.step()
        torch.testing.assert_close(a[6].weight, b[6].weight, rtol=1e-6, atol=1e-8)


def test_errors_name_the_argument():
    model = small_model()
    for cls, kw, word in [(BinaryConnect, dict(lr=-1.0), "lr"), (BinaryConnect, dict(clip=0.0), "clip"),
                          (BinaryConnect, dict(betas=(1.0, 0.9)), "betas"), (Bop, dict(lr=float("nan")), "lr"),
                          (Bop, dict(threshold=-1.0), "threshold")]:
        with pytest.raises(ValueError, match=word):
            cls(model, **kw)
    with pytest.raises(ValueError, match="delta_factor"):
        TWN(discretize_(nn.Sequential(nn.Linear(2, 2)), levels="ternary", keep=None), delta_factor=-1)
    with pytest.raises(ValueError, match="no discrete weights"):
        Bop(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="needs binary"):
        Bop(discretize_(nn.Sequential(nn.Linear(2, 2)), levels="ternary", keep=None))
    with pytest.raises(TypeError, match="model itself"):
        BinaryConnect(small_model().parameters())
    with pytest.raises(ValueError, match="discrete modules"):
        BinaryConnect(small_model(), exclude=["0"])


def test_param_groups_and_add_param_group():
    model = small_model()
    codes = [d.param for d in discrete_parameters(model)]
    rest = [p for p in model.parameters() if all(p is not c for c in codes)]
    opt = Bop(model, [{"params": codes[:1], "lr": 1.0, "threshold": 0.5}], lr=1e-4)
    opt.add_param_group({"params": codes[1:] + rest})  # previously a KeyError for the latent baselines
    assert opt.param_groups[1]["lr"] == 1e-4 and len(opt.rule_table()) == 8
    m2 = small_model()
    bc = BinaryConnect(m2, [{"params": [discrete_parameters(m2)[0].param]}])
    bc.add_param_group({"params": [m2[6].weight]})
    assert [(r["unit"], r["rule"]) for r in bc.rule_table()] == [("0.weight", "latent-sign"), ("6.weight", "fallback")]
