"""pmptrain.robust: attacks stay in the threat model, every trainer's step against a hand computation
(float64), YOPO's first-layer costate against autograd, the closed-loop controller's MSA."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pmptrain
from pmptrain.robust import (PGDAT, TRADES, YOPO, ClosedLoopController, FastAT, FreeAT, TradesYOPO, accuracy,
                             fgsm, pgd, trades_kl)
from pmptrain.robust import library
from pmptrain.robust.attacks import project

D = torch.float64


def _cnn(seed=0, first_block=False):
    torch.manual_seed(seed)
    conv = nn.Conv2d(1, 4, 3, padding=1)
    first = nn.Sequential(conv, nn.Tanh()) if first_block else conv
    rest = [] if first_block else [nn.Tanh()]
    return nn.Sequential(first, *rest, nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 9, 5)).to(D)


def _data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 6, 6, generator=g, dtype=D), torch.randint(0, 5, (n,), generator=g)


def _sgd_step(model, loss, lr):
    """w − lr·∇w of ``loss`` (a function of the model), by autograd, on a copy."""
    ref = copy.deepcopy(model)
    grads = torch.autograd.grad(loss(ref), list(ref.parameters()))
    return [p.detach() - lr * g for p, g in zip(ref.parameters(), grads)]


def _input_grad(model, x, y):
    xr = x.clone().requires_grad_(True)
    return torch.autograd.grad(F.cross_entropy(model(xr), y), xr)[0]


def _assert_params(model, expected, tol=1e-12):
    for p, e in zip(model.parameters(), expected):
        assert torch.allclose(p.detach(), e, atol=tol, rtol=0), float((p - e).abs().max())


# ------------------------------------------------------------------------------------ attacks
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_the_ball_and_the_box(norm):
    model, (x, y) = _cnn().eval(), _data(32)
    x[:4] = 0.0  # on the box's faces
    x[4:8] = 1.0
    eps = 0.1 if norm == "linf" else 0.5
    for adv in (pgd(model, x, y, eps, steps=7, norm=norm, restarts=2, generator=torch.Generator().manual_seed(0)),
                fgsm(model, x, y, eps, norm=norm)):
        d = (adv - x).flatten(1)
        size = d.abs().max(1).values if norm == "linf" else d.norm(dim=1)
        assert float(size.max()) <= eps * (1 + 1e-12)
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
        assert float(size.max()) > 0.5 * eps  # it did move
    assert accuracy(model, pgd(model, x, y, eps, steps=10, norm=norm), y) <= accuracy(model, x, y)


def test_l2_projection_is_the_euclidean_projection():
    d = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]], dtype=D)
    out = project(d, 1.0, "l2")
    assert torch.allclose(out, torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]], dtype=D))


def test_attack_arguments_are_validated():
    model, (x, y) = _cnn().eval(), _data(4)
    with pytest.raises(ValueError, match="eps"):
        pgd(model, x, y, -1.0)
    with pytest.raises(ValueError, match="norm"):
        pgd(model, x, y, 0.1, norm="l1")
    with pytest.raises(ValueError, match="restarts"):
        pgd(model, x, y, 0.1, restarts=2, random_start=False)


@pytest.mark.skipif(not library.available(), reason="the 'robust' extra (adversarial-robustness-toolbox) is missing")
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_our_pgd_matches_the_library_within_noise(norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(400, 1, 6, 6, generator=g), torch.randint(0, 5, (400,), generator=g)
    y = model(x).argmax(1)  # start from correctly classified points: success rate = 1 − robust acc
    eps = 0.05 if norm == "linf" else 0.3
    ours = accuracy(model, pgd(model, x, y, eps, alpha=eps / 4, steps=10, norm=norm,
                               generator=torch.Generator().manual_seed(0)), y)
    theirs = accuracy(model, library.art_pgd(model, x, y, eps, eps / 4, 10, norm=norm, num_classes=5), y)
    assert 0.05 < 1 - ours < 0.95  # a non-trivial attack
    assert abs(ours - theirs) <= 0.05, (ours, theirs)  # binomial noise at n = 400 is ≈ 0.025


# ------------------------------------------------------------------------------------ YOPO
def test_yopo_m1_n1_is_one_fgsm_step_by_hand():
    model, (x, y) = _cnn(), _data()
    eps, lr = 0.1, 0.3
    expected = _sgd_step(model, lambda m: F.cross_entropy(m(x), y), lr)  # η₀ = 0: the clean gradient
    fgsm_by_hand = (x + eps * _input_grad(model, x, y).sign()).clamp(0, 1) - x
    with torch.no_grad():
        clean_loss = float(F.cross_entropy(model(x), y))
    tr = YOPO(model, torch.optim.SGD(model.parameters(), lr=lr), eps=eps, m=1, n=1, sigma=eps, init="zero")
    loss = tr.step(x, y)
    assert abs(loss - clean_loss) < 1e-12  # the loss of the pass at x + η₀ = x
    _assert_params(model, expected)
    assert torch.allclose(tr.last_delta, fgsm_by_hand, atol=1e-12)
    assert tr.passes == {"forward": 1, "backward": 1, "first_forward": 0, "first_backward": 1}


def test_yopo_costate_equals_autograd_and_stays_frozen_in_the_inner_steps():
    """First block conv+tanh (not affine): the n steps follow J_{f₀}(x+η)ᵀg with g frozen."""
    model, (x, y) = _cnn(first_block=True), _data()
    ref = copy.deepcopy(model)
    eps, sigma = 0.2, 0.05
    tr = YOPO(model, torch.optim.SGD(model.parameters(), lr=0.0), first="0", eps=eps, m=1, n=2, sigma=sigma,
              init="zero")
    tr.step(x, y)
    y0 = ref[0](x)
    g = torch.autograd.grad(F.cross_entropy(ref[1:](y0), y), y0)[0]
    assert torch.allclose(tr.last_costate, -g, atol=1e-14)  # p = −∂L/∂y₀
    eta = torch.zeros_like(x)
    for _ in range(2):
        e = eta.clone().requires_grad_(True)
        d = torch.autograd.grad(ref[0](x + e), e, grad_outputs=g)[0]
        eta = (x + (eta + sigma * d.sign()).clamp(-eps, eps)).clamp(0, 1) - x
    assert torch.allclose(tr.last_delta, eta, atol=1e-12)
    assert tr.passes["first_forward"] == 1  # step 1 from the full pass, step 2 through the block alone


def test_yopo_accumulates_m_passes_into_one_step():
    model, (x, y) = _cnn(), _data()
    eps, sigma, lr = 0.1, 0.03, 0.2
    ref = copy.deepcopy(model)
    tr = YOPO(model, torch.optim.SGD(model.parameters(), lr=lr), eps=eps, m=3, n=2, sigma=sigma, init="zero")
    tr.step(x, y)
    # by hand: η_j from the frozen costate of pass j; gradient = mean over the three passes
    eta, grads = torch.zeros_like(x), None
    for _ in range(3):
        xr = (x + eta).requires_grad_(True)
        loss = F.cross_entropy(ref(xr), y)
        gs = torch.autograd.grad(loss, [xr] + list(ref.parameters()))
        grads = [g / 3 for g in gs[1:]] if grads is None else [a + g / 3 for a, g in zip(grads, gs[1:])]
        direction = gs[0].sign()  # affine first layer: J_{f₀}ᵀg = ∇_x L at every inner step
        for _ in range(2):
            eta = (x + (eta + sigma * direction).clamp(-eps, eps)).clamp(0, 1) - x
    _assert_params(model, [p.detach() - lr * g for p, g in zip(ref.parameters(), grads)])
    assert torch.allclose(tr.last_delta, eta, atol=1e-12)
    assert tr.passes["first_forward"] == 0  # affine: the direction is the full pass's input gradient


def test_yopo_refuses_a_first_layer_that_does_not_see_the_input():
    model, (x, y) = _cnn(), _data(4)
    tr = YOPO(model, torch.optim.SGD(model.parameters(), lr=0.1), first="4", eps=0.1, m=1, n=1)
    with pytest.raises(RuntimeError, match="does not receive the model's input"):
        tr.step(x, y)
    with pytest.raises(ValueError, match="no module named"):
        YOPO(model, torch.optim.SGD(model.parameters(), lr=0.1), first="nope")


def test_yopo_with_emsa_trains_and_records_only_training_passes():
    model, (x, y) = _cnn(), _data(32)
    opt = pmptrain.EMSA(model)
    tr = YOPO(model, opt, eps=0.1, m=3, n=2)
    before = [p.detach().clone() for p in model.parameters()]
    losses = [tr.step(x, y) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert opt.skipped_steps == 0


def test_trades_yopo_gradient_is_the_averaged_trades_objective():
    model, (x, y) = _cnn(), _data()
    beta, lr = 2.0, 0.1
    ref = copy.deepcopy(model)
    tr = TradesYOPO(model, torch.optim.SGD(model.parameters(), lr=lr), eps=0.1, m=2, n=1, sigma=0.05,
                    beta=beta, init="zero")
    tr.step(x, y)
    # by hand, the same η sequence: η₀ = 0, η₁ from the KL costate of pass 1
    e0 = torch.zeros_like(x)
    xr = (x + e0).requires_grad_(True)
    kl0 = trades_kl(ref(x).detach(), ref(xr))
    d = torch.autograd.grad(kl0, xr)[0]
    e1 = (x + (0.05 * d.sign()).clamp(-0.1, 0.1)).clamp(0, 1) - x
    obj = lambda m: F.cross_entropy(m(x), y) + beta / 2 * (trades_kl(m(x), m(x + e0)) + trades_kl(m(x), m(x + e1)))  # noqa: E731
    _assert_params(model, _sgd_step(ref, obj, lr))


# ------------------------------------------------------------------------------------ baselines
def test_pgd_at_one_step_by_hand():
    model, (x, y) = _cnn(), _data()
    eps, alpha, lr = 0.1, 0.04, 0.2
    d = (x + (alpha * _input_grad(model, x, y).sign()).clamp(-eps, eps)).clamp(0, 1) - x
    expected = _sgd_step(model, lambda m: F.cross_entropy(m(x + d), y), lr)
    tr = PGDAT(model, torch.optim.SGD(model.parameters(), lr=lr), eps=eps, steps=1, alpha=alpha, random_start=False)
    tr.step(x, y)
    _assert_params(model, expected)


def test_fast_at_one_step_by_hand():
    model, (x, y) = _cnn(), _data()
    eps, lr = 0.1, 0.2
    d0 = (torch.rand(x.shape, generator=torch.Generator().manual_seed(5), dtype=D) * 2 - 1) * eps
    d0 = (x + d0).clamp(0, 1) - x
    xr = (x + d0).requires_grad_(True)
    g = torch.autograd.grad(F.cross_entropy(model(xr), y), xr)[0]
    d = (x + (d0 + 1.25 * eps * g.sign()).clamp(-eps, eps)).clamp(0, 1) - x
    expected = _sgd_step(model, lambda m: F.cross_entropy(m(x + d), y), lr)
    tr = FastAT(model, torch.optim.SGD(model.parameters(), lr=lr), eps=eps, generator=torch.Generator().manual_seed(5))
    tr.step(x, y)
    _assert_params(model, expected)
    assert tr.passes["forward"] == 2


def test_free_at_replays_by_hand():
    model, (x, y) = _cnn(), _data()
    eps, lr = 0.1, 0.2
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    delta = torch.zeros_like(x)
    for _ in range(2):  # each replay: one pass gives the weight step and the δ step
        dr = delta.clone().requires_grad_(True)
        opt.zero_grad()
        F.cross_entropy(ref(x + dr), y).backward()
        opt.step()
        delta = (x + (delta + eps * dr.grad.sign()).clamp(-eps, eps)).clamp(0, 1) - x
    tr = FreeAT(model, torch.optim.SGD(model.parameters(), lr=lr), eps=eps, replays=2)
    tr.step(x, y)
    _assert_params(model, [p.detach() for p in ref.parameters()])
    assert torch.allclose(tr.delta, delta, atol=1e-12)


def test_trades_one_step_by_hand():
    model, (x, y) = _cnn(), _data()
    eps, alpha, beta, lr = 0.1, 0.03, 6.0, 0.2
    gen_seed = 3
    d0 = 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(gen_seed), dtype=D)
    d0 = (x + d0).clamp(0, 1) - x
    target = model(x).detach()
    xr = (x + d0).requires_grad_(True)
    g = torch.autograd.grad(trades_kl(target, model(xr)), xr)[0]
    d = (x + (d0 + alpha * g.sign()).clamp(-eps, eps)).clamp(0, 1) - x
    expected = _sgd_step(model, lambda m: F.cross_entropy(m(x), y) + beta * trades_kl(m(x), m(x + d)), lr)
    tr = TRADES(model, torch.optim.SGD(model.parameters(), lr=lr), eps=eps, steps=1, alpha=alpha, beta=beta,
                generator=torch.Generator().manual_seed(gen_seed))
    tr.step(x, y)
    _assert_params(model, expected)


def test_a_nan_loss_skips_the_step():
    model, (x, y) = _cnn(), _data()
    before = [p.detach().clone() for p in model.parameters()]
    tr = PGDAT(model, torch.optim.SGD(model.parameters(), lr=0.1), eps=0.1, steps=1)
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    tr.step(x, y)
    assert tr.skipped_steps == 1
    _assert_params(model, before, tol=0)


# ------------------------------------------------------------------------------------ closed loop
def _lowrank_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(12, 3, generator=g, dtype=D))[0]
    z = torch.randn(300, 3, generator=g, dtype=D)
    x = 0.5 + z @ basis.T * 0.2
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)).to(D)
    return model, x, basis


def test_closed_loop_leaves_on_manifold_inputs_unchanged():
    model, x, _ = _lowrank_problem()
    ctl = ClosedLoopController(model, energy=0.999).fit(x[:200])
    assert ctl.manifolds[0].basis.shape[1] == 3
    u = ctl.solve(x[200:])
    assert float(u[0].abs().max()) < 1e-10
    assert torch.allclose(ctl(x[200:]), model(x[200:]), atol=1e-10)


def test_closed_loop_msa_reduces_its_objective_and_pulls_back_towards_the_manifold():
    model, x, basis = _lowrank_problem(1)
    ctl = ClosedLoopController(model, layers=["1"], energy=0.99, outer=3, inner=10).fit(x[:200])
    g = torch.Generator().manual_seed(2)
    off = torch.randn(100, 12, generator=g, dtype=D)
    off = off - off @ basis @ basis.T  # perturbation orthogonal to the data subspace
    xp = x[200:] + 0.3 * off / off.norm(dim=1, keepdim=True)
    zero = [torch.zeros(100, 12, dtype=D), torch.zeros(100, 16, dtype=D)]
    u = ctl.solve(xp)
    j0, j1 = ctl.objective(xp, zero), ctl.objective(xp, u)
    assert bool((j1 <= j0 + 1e-12).all()) and float(j1.mean()) < 0.5 * float(j0.mean())
    dist = lambda s: float(ctl.manifolds[0].residual(s).norm(dim=1).mean())  # noqa: E731
    assert dist(xp + u[0]) < 0.5 * dist(xp)
    with pytest.raises(TypeError, match="nn.Sequential"):
        ClosedLoopController(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="fit"):
        ClosedLoopController(model).solve(xp)
