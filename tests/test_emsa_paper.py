"""The reference E-MSA's options (controlled blocks, state/costate penalty weights, δ = 0, L2 in H,
perturbed inner start) and the EMSA.paper preset, each against the mathematics it implements."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import pmptrain
from pmptrain.bench.models import TanhResidualBlock
from pmptrain.bench.registry import get_spec
from pmptrain.hamiltonian import augmented_hamiltonian
from pmptrain.optim.iterative import perturb_seed

D = torch.float64


def _toy(depth=2, width=3, b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(*[TanhResidualBlock(width, 0.25) for _ in range(depth)]).to(D)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=D))
    x = torch.randn(b, width, generator=g, dtype=D)
    y = torch.randn(b, 1, generator=g, dtype=D)
    return model, x, y


def _loss(model, x, y):
    return F.mse_loss(model(x).sum(1, keepdim=True), y)


def _states_costates(model, x, y):
    """Block inputs x_t and p̂_{t+1} = −B·∂J/∂(block t output), by autograd on the whole model."""
    xs, outs = [], []
    h = x
    for blk in model:
        xs.append(h.detach())
        h = blk(h.detach().requires_grad_(False)) if False else blk(h)
        h.retain_grad()
        outs.append(h)
    J = F.mse_loss(h.sum(1, keepdim=True), y)
    J.backward()
    b = x.shape[0]
    return xs, [-b * o.grad.detach() for o in outs]


def _block_h_reference(K, c, Kk, ck, x, p, rho_x, rho_p, delta, lam, step=0.25):
    """The augmented Hamiltonian of ``f(x) = x + step·tanh(x Kᵀ + c)``, written out by hand: the
    costate term uses the explicit Jacobian ``∇_x(p·f) = p + step·((1 − tanh²)⊙p) K``."""
    def f(K_, c_):
        return x + step * torch.tanh(x @ K_.T + c_)

    def gx(K_, c_):
        t = torch.tanh(x @ K_.T + c_)
        return p + step * ((1 - t * t) * p) @ K_

    b = x.shape[0]
    h = (p * f(K, c)).sum() / b
    h = h - 0.5 * rho_x * ((f(K, c) - f(Kk, ck)) ** 2).sum() / b
    h = h - 0.5 * rho_p * ((gx(K, c) - gx(Kk, ck)) ** 2).sum() / b
    h = h - 0.5 * delta * (((K - Kk) ** 2).sum() + ((c - ck) ** 2).sum())
    return h - 0.5 * lam * ((K ** 2).sum() + (c ** 2).sum())


def test_block_augmented_hamiltonian_matches_the_hand_built_one():
    model, x, y = _toy()
    xs, ps = _states_costates(model, x, y)
    blk = model[1]
    th_k = {k: v.detach() for k, v in blk.named_parameters()}
    g = torch.Generator().manual_seed(3)
    th = {k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=D) for k, v in th_k.items()}

    def fn(theta, inp, extra):
        return functional_call(blk, theta, (inp,))

    xr = xs[1].clone().requires_grad_(True)
    y_k = fn(th_k, xr, None)
    gx_k = torch.autograd.grad((ps[1] * y_k).sum(), xr)[0]
    calls = [(xs[1], ps[1], None, y_k.detach(), gx_k)]
    b = x.shape[0]
    for rho_x, rho_p, delta, lam in ((1.0 * b, 1.0 / b, 0.0, 1e-3), (0.7, 2.0, 0.5, 0.0), (0.0, 3.0, 0.0, 0.1)):
        got = augmented_hamiltonian(fn, th, th_k, calls, b, rho_x, delta, rho_costate=rho_p, l2=lam)
        ref = _block_h_reference(th["linear.weight"], th["linear.bias"], th_k["linear.weight"],
                                 th_k["linear.bias"], xs[1], ps[1], rho_x, rho_p, delta, lam)
        assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12), (rho_x, rho_p, delta, lam)


def test_paper_step_of_a_block_is_lbfgs_on_the_hand_built_hamiltonian():
    """One EMSA.paper step on whole blocks (sum units, δ = 0, L2 in H, perturbed start) gives the θ
    of 10 L-BFGS iterations on the hand-built H̃ of each block from the same perturbed start."""
    model, x, y = _toy()
    b = x.shape[0]
    xs, ps = _states_costates(model, x, y)
    theta_k = [{k: v.detach().clone() for k, v in blk.named_parameters()} for blk in model]
    model.zero_grad()
    a, seed, rho, lam = 0.01, 5, 1.0, 1e-3
    opt = pmptrain.EMSA.paper(model, blocks=(TanhResidualBlock,), perturb_init=a, perturb_seed=seed)
    assert [r["unit"] for r in opt.rule_table()] == ["0", "1"]
    opt.zero_grad()
    _loss(model, x, y).backward()
    opt.step()
    for t, blk in enumerate(model):
        gen = torch.Generator().manual_seed(perturb_seed(seed, str(t), 0))
        start = [v + a * (2 * torch.rand(v.shape, generator=gen, dtype=D) - 1) for v in theta_k[t].values()]
        K = start[0].clone().requires_grad_(True)
        c = start[1].clone().requires_grad_(True)
        inner = torch.optim.LBFGS([K, c], lr=1.0, max_iter=10, line_search_fn="strong_wolfe")

        def closure():
            inner.zero_grad()
            loss = -_block_h_reference(K, c, theta_k[t]["linear.weight"], theta_k[t]["linear.bias"], xs[t], ps[t],
                                       rho * b, rho / b, 0.0, lam)
            loss.backward()
            return loss

        inner.step(closure)
        assert torch.allclose(blk.linear.weight, K.detach(), atol=1e-9), t
        assert torch.allclose(blk.linear.bias, c.detach(), atol=1e-9), t
        assert not torch.allclose(blk.linear.weight, theta_k[t]["linear.weight"])


def _quadratic_maximiser(W, X, P, G, rho_x, rho_p, delta, lam):
    """argmax of ⟨−G, Δ⟩ − ρ_x/(2B)Σ‖Δx‖² − ρ_p/(2B)Σ‖Δᵀp‖² − δ/2‖Δ‖² − λ/2‖W + Δ‖² by one dense
    solve: (ρ_p C_p ⊗ I + I ⊗ ρ_x C_x + (δ + λ) I) vec Δ = vec(−G − λW) (row-major vec)."""
    b = X.shape[0]
    m, n = W.shape
    cx, cp = X.T @ X / b, P.T @ P / b
    a = rho_p * torch.kron(cp, torch.eye(n, dtype=D)) + rho_x * torch.kron(torch.eye(m, dtype=D), cx)
    a = a + (delta + lam) * torch.eye(m * n, dtype=D)
    return torch.linalg.solve(a, (-G - lam * W).reshape(-1)).reshape(m, n)


@pytest.mark.parametrize("solver", ["closed", "iterative"])
@pytest.mark.parametrize("case", ["weights", "sum", "delta0"])
def test_state_and_costate_weights_follow_the_math(solver, case):
    """ρ_x and ρ_p enter the closed form and the iterative solver as the two weights of the
    quadratic H̃ of a Linear layer (sum units: ρB and ρ/B; δ = 0 and λ for the iterative one)."""
    torch.manual_seed(1)
    b, n, m = 12, 4, 3
    lin = nn.Linear(n, m, bias=False).to(D)
    X = torch.randn(b, n, dtype=D)
    T = torch.randn(b, m, dtype=D)
    Wk = lin.weight.detach().clone()
    out = lin(X)
    out.retain_grad()
    loss = 0.5 * ((torch.tanh(out) - T) ** 2).sum(1).mean()
    loss.backward()
    P = -b * out.grad
    G = lin.weight.grad.clone()
    lin.zero_grad()
    lr, lam = 0.5, 0.0
    kw = dict(lr=lr, solver=solver, max_step=None)  # the exact maximiser, no trust region
    if solver == "iterative":
        kw.update(inner_steps=200, inner_optimizer="lbfgs")
    if case == "weights":
        kw.update(rho=9.0, rho_state=0.7, rho_costate=2.5)
        rho_x, rho_p, delta = 0.7, 2.5, 1 / lr
    elif case == "sum":
        kw.update(rho=0.3, penalty_units="sum")
        rho_x, rho_p, delta = 0.3 * b, 0.3 / b, 1 / lr
    else:
        if solver == "closed":
            with pytest.raises(ValueError, match="proximal=False with solver='closed'"):
                pmptrain.EMSA(lin, proximal=False, **kw)
            return
        lam = 0.05
        kw.update(rho=0.4, rho_costate=1.3, proximal=False, l2=lam)
        rho_x, rho_p, delta = 0.4, 1.3, 0.0
    opt = pmptrain.EMSA(lin, **kw)
    out = lin(X)
    (0.5 * ((torch.tanh(out) - T) ** 2).sum(1).mean()).backward()
    opt.step()
    ref = _quadratic_maximiser(Wk, X, P, G, rho_x, rho_p, delta, lam)
    tol = 1e-10 if solver == "closed" else 3e-5  # L-BFGS stops at torch's tolerance_change 1e-9
    err = float((lin.weight.detach() - Wk - ref).abs().max())
    assert err < tol, err
    # and not the single-ρ maximiser (ρ_x = ρ_p): the two weights matter
    other = _quadratic_maximiser(Wk, X, P, G, rho_x, rho_x, delta, lam)
    assert (other - ref).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["layernorm", "grouped", "linear"])
def test_costate_weight_in_channel_and_grouped_rules(kind):
    """The closed forms honour ρ_x ≠ ρ_p. Scaling the loss by k scales ∇J by k and C_p by k², so the
    maximiser of H̃ with (ρ_x, ρ_p, lr) on k·J is the one with (ρ_x/k, k·ρ_p, k·lr) on J — an identity
    that holds only if the state and costate penalties carry their own weights."""
    def step(scale=1.0, lr=0.5, **kw):
        torch.manual_seed(0)
        if kind == "layernorm":
            m, inp = nn.LayerNorm(4).to(D), torch.randn(5, 4, dtype=D)
            with torch.no_grad():
                m.weight.add_(0.3 * torch.randn(4, dtype=D))
        elif kind == "grouped":
            m, inp = nn.Conv1d(4, 4, 3, groups=2).to(D), torch.randn(3, 4, 6, dtype=D)
        else:
            m, inp = nn.Linear(4, 6).to(D), torch.randn(5, 4, dtype=D)
        opt = pmptrain.EMSA(m, lr=lr, **kw)
        out = m(inp)
        (scale * 0.5 * (torch.sin(out) ** 2).sum() / inp.shape[0]).backward()
        w0 = [p.detach().clone() for p in m.parameters()]
        opt.step()
        return torch.cat([(p.detach() - q).reshape(-1) for p, q in zip(m.parameters(), w0)])

    k = 2.0
    lhs = step(scale=k, lr=0.5, rho=9.0, rho_state=0.8, rho_costate=1.5)
    rhs = step(scale=1.0, lr=0.5 * k, rho=9.0, rho_state=0.8 / k, rho_costate=1.5 * k)
    assert (lhs - rhs).abs().max() < 1e-10
    # one ρ for both (the old behaviour) breaks the identity
    assert (step(scale=k, lr=0.5, rho=0.8) - step(scale=1.0, lr=0.5 * k, rho=0.8 / k)).abs().max() > 1e-4
    b = 5 if kind != "grouped" else 3
    units = step(rho=2.0, penalty_units="sum")
    assert (units - step(rho=2.0, rho_state=2.0 * b, rho_costate=2.0 / b)).abs().max() < 1e-12
    assert (units - step(rho=2.0)).abs().max() > 1e-4


def test_perturbed_start_is_seeded_and_zero_means_theta_k():
    def run(**kw):
        model, x, y = _toy(seed=2)
        opt = pmptrain.EMSA.paper(model, blocks=(TanhResidualBlock,), **kw)
        for _ in range(2):
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    a, a2, other = run(perturb_init=0.01), run(perturb_init=0.01), run(perturb_init=0.01, perturb_seed=1)
    assert torch.equal(a, a2)
    assert (a - other).abs().max() > 1e-6
    assert torch.equal(run(perturb_init=0.0), run())
    assert (run(perturb_init=0.0) - a).abs().max() > 1e-6


def test_paper_preset_options():
    model, _, _ = _toy()
    opt = pmptrain.EMSA.paper(model, blocks=(TanhResidualBlock,))
    g = opt.param_groups[0]
    expected = dict(solver="iterative", inner_optimizer="lbfgs", inner_steps=10, inner_lr=1.0, lr=1.0, rho=1.0,
                    penalty_units="sum", proximal=False, l2=1e-3, perturb_init=0.0)
    assert pmptrain.EMSA.PAPER == expected
    assert opt.solver == "iterative"
    for k, v in expected.items():
        if k != "solver":
            assert g[k] == v, k
    assert g["rho_state"] is None and g["rho_costate"] is None and g["perturb_seed"] == 0
    assert {r["rule"] for r in opt.rule_table()} == {"emsa-iterative"}
    assert opt.l2_penalty() == pytest.approx(0.5e-3 * sum(float((p.detach() ** 2).sum()) for p in model.parameters()))
    over = pmptrain.EMSA.paper(model, rho=0.03, perturb_init=0.005)
    assert over.param_groups[0]["rho"] == 0.03 and over.param_groups[0]["perturb_init"] == 0.005
    # the registry name: blocks default to the bench's residual block types present in the model
    spec = get_spec("emsa-paper")
    reg = spec.build(model)
    assert [r["unit"] for r in reg.rule_table()] == ["0", "1"]
    for k, v in expected.items():
        if k != "solver":
            assert reg.param_groups[0][k] == v, k
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mlp = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
        assert [r["unit"] for r in spec.build(mlp).rule_table()] == ["0", "2"]  # no block: per module


def test_blocks_by_name_marker_and_nesting():
    model, x, y = _toy(depth=3)
    opt = pmptrain.EMSA(model, solver="iterative", blocks=["1"])
    assert [r["unit"] for r in opt.rule_table()] == ["0.linear", "1", "2.linear"]
    opt.detach()
    pmptrain.controlled_block(model[2])
    opt = pmptrain.EMSA(model, solver="iterative")
    assert [r["unit"] for r in opt.rule_table()] == ["0.linear", "1.linear", "2"]
    opt.detach()
    assert [r["unit"] for r in pmptrain.EMSA(model).rule_table()] == ["0.linear", "1.linear", "2.linear"]
    outer = nn.Sequential(model, nn.Linear(3, 1)).to(D)
    opt = pmptrain.EMSA(outer, solver="iterative", blocks=["0", TanhResidualBlock])
    assert [r["unit"] for r in opt.rule_table()] == ["0", "1"]  # the outermost block wins
    assert opt.rule_table()[0]["params"] == [f"0.{i}.linear.{k}" for i in range(3) for k in ("weight", "bias")]


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(blocks=(TanhResidualBlock,)), ValueError, "blocks=.* with solver='closed'"),
    (dict(solver="iterative", blocks=["nope"]), ValueError, "module 'nope' does not exist"),
    (dict(solver="iterative", blocks=(nn.Conv2d,)), ValueError, "no module of the model is a Conv2d"),
    (dict(solver="iterative", blocks=[3]), TypeError, "blocks entry 3"),
    (dict(solver="iterative", blocks=[""]), ValueError, "whole model"),
    (dict(l2=1e-3), ValueError, "l2=0.001 with solver='closed'"),
    (dict(perturb_init=0.1), ValueError, "perturb_init=0.1 with solver='closed'"),
    (dict(rho_state=0.0, rho_costate=1.0), ValueError, "rho_state=0"),
    (dict(solver="iterative", proximal=False, inner_optimizer="adam"), ValueError, "proximal=False with inner"),
    (dict(penalty_units="sum", stat_decay=0.9), ValueError, "stat_decay=0.9 with penalty_units='sum'"),
    (dict(penalty_units="total"), ValueError, "penalty_units='total'"),
    (dict(rho_costate=-1.0), ValueError, "rho_costate=-1.0"),
    (dict(rho_state="1"), TypeError, "rho_state='1'"),
    (dict(solver="iterative", perturb_init=-0.1), ValueError, "perturb_init=-0.1"),
    (dict(solver="iterative", l2=float("nan")), ValueError, "l2=nan"),
    (dict(solver="iterative", perturb_seed=-1), ValueError, "perturb_seed=-1"),
    (dict(proximal=1), TypeError, "proximal=1"),
])
def test_paper_options_are_validated(kwargs, err, match):
    model, _, _ = _toy()
    with pytest.raises(err, match=match):
        pmptrain.EMSA(model, **kwargs)


def test_block_state_dict_roundtrip_resumes_identically():
    def make():
        model, x, y = _toy(seed=4)
        return model, x, y, pmptrain.EMSA.paper(model, blocks=(TanhResidualBlock,), perturb_init=0.01)

    m1, x, y, o1 = make()
    for _ in range(3):
        o1.zero_grad()
        _loss(m1, x, y).backward()
        o1.step()
    m2, _, _, o2 = make()
    for _ in range(2):
        o2.zero_grad()
        _loss(m2, x, y).backward()
        o2.step()
    m3, _, _, o3 = make()
    m3.load_state_dict(m2.state_dict())
    o3.load_state_dict(o2.state_dict())
    o3.zero_grad()
    _loss(m3, x, y).backward()
    o3.step()
    for p, q in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(p, q)


def test_rule_table_states_the_paper_options():
    from pmptrain.bench.models import build_model

    model = build_model("restanh", (5,), 5)
    desc = {r["unit"]: r["description"] for r in get_spec("emsa-paper").build(model, perturb_init=0.005).rule_table()}
    assert desc["blocks.0"] == ("iterative E-MSA (10 lbfgs iterations, rho 1.0, summed over the batch, no proximal "
                                "term, L2 0.001 in H, start perturbed by 0.005)")
    lin = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    table = pmptrain.EMSA(lin, rho_state=2.0).rule_table()
    assert "rho_state 2, rho_costate 1," in table[0]["description"]
    assert "rho_state 2, rho_costate 1)" in table[1]["description"]  # the per-channel affine of the LayerNorm
    assert "(rho 1.0, route auto" in pmptrain.EMSA(nn.Sequential(nn.Linear(3, 3))).rule_table()[0]["description"]
    same = pmptrain.EMSA(nn.Sequential(nn.Linear(3, 3)), rho_state=2.0, rho_costate=2.0).rule_table()
    assert "(rho 2, route auto" in same[0]["description"]  # the weight used, not the unused rho


def test_inner_max_eval_bounds_the_lbfgs_evaluations():
    """``inner_max_eval`` is L-BFGS's bound on objective evaluations (torch's default 1.25·steps):
    counted through the module's forward calls during the inner solve."""
    from pmptrain.hamiltonian import iterative_maximise

    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    x, p = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    theta_k = {k: v.detach() for k, v in lin.named_parameters()}
    for max_eval, bound in ((None, 12), (3, 3), (50, 50)):
        calls = []

        def fn(theta, xx, extra):
            calls.append(1)
            return functional_call(lin, theta, (xx,))

        iterative_maximise(fn, theta_k, [(x, p, None)], 16, 1.0, 0.0, steps=10, max_eval=max_eval)
        n = len(calls) - 1  # one evaluation at θ_k prepares the penalties
        assert 1 <= n <= bound, (max_eval, n)
        if max_eval == 3:
            assert n == 3  # the bound binds: an unconstrained Hamiltonian (δ = 0) needs more
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    assert pmptrain.EMSA(model, solver="iterative", inner_max_eval=40).param_groups[0]["inner_max_eval"] == 40
    with pytest.raises(ValueError, match="inner_max_eval"):
        pmptrain.EMSA(model, solver="iterative", inner_max_eval=0)
    assert "inner_max_eval" in get_spec("emsa-paper").options()
