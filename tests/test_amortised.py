"""Amortised curvature (``stat_every = K``): a step between two refreshes is the exact E-MSA step
with the statistics of the last refresh and its own ``.grad``; nothing is captured on those steps;
the state resumes bit-exact mid-interval."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pmptrain
from helpers import feed_gradient_average

DT = torch.float64


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(15, 6), nn.Tanh(),
                         nn.Linear(6, 4)).to(DT)


def _batch(i, n=24):  # more rows than features in every layer: all on the primal route
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(n, 2, 5, generator=g, dtype=DT), torch.randn(n, 4, generator=g, dtype=DT)


def _loss(model, i):
    x, t = _batch(i)
    return F.mse_loss(model(x), t)


def _controlled(opt):
    return [p for u in opt.units.values() if u.rule.module_rule for p in u.params]


@pytest.mark.parametrize("k", [2, 3])
def test_a_step_between_refreshes_is_the_exact_step_with_the_refresh_statistics(k):
    """Step t (t mod K ≠ 0) equals the exact primal step of a reference optimizer whose captured
    statistics are those of the refresh batch at the refresh weights θ_r, with ``.grad`` set to
    step t's gradient at θ_t."""
    model = _model()
    opt = pmptrain.EMSA(model, stat_every=k, lr=0.5, rho=0.7, fallback="sgd")
    theta_r = copy.deepcopy(model)  # the weights at the refresh step (step 0)
    for t in range(k):
        opt.zero_grad()
        _loss(model, t).backward()
        if t == k - 1:
            grads = [p.grad.clone() for p in model.parameters()]
            before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        if t == 0:
            assert opt.units["3"].state.running is not None
    # the reference: statistics of batch 0 at θ_r, gradient of batch k-1 at θ_{k-1}
    ref_model = theta_r
    ref = pmptrain.EMSA(ref_model, route="primal", costate="exact", lr=0.5, rho=0.7, fallback="sgd")
    ref.zero_grad()
    _loss(ref_model, 0).backward()
    with torch.no_grad():
        for p, q, g in zip(ref_model.parameters(), before, grads):
            p.copy_(q)
            p.grad.copy_(g)
    ref.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    # and it is not the exact step on its own batch (the test can tell them apart)
    own = copy.deepcopy(model)
    own_opt = pmptrain.EMSA(own, route="primal", costate="exact", lr=0.5, rho=0.7, fallback="sgd")
    with torch.no_grad():
        for p, q in zip(own.parameters(), before):
            p.copy_(q)
    own_opt.zero_grad()
    _loss(own, k - 1).backward()
    own_opt.step()
    assert max(float((p - q).detach().abs().max()) for p, q in zip(own.parameters(), model.parameters())) > 1e-6


def test_refresh_steps_equal_the_exact_step():
    """With K = 2, steps 0 and 2 capture afresh: step 0 is the exact primal step, and the model at
    step 2 (after a stale step 1) takes the exact step on batch 2 from where it is."""
    a, b = _model(), _model()
    oa = pmptrain.EMSA(a, stat_every=2, fallback="sgd")
    ob = pmptrain.EMSA(b, route="primal", costate="exact", fallback="sgd")

    def step(pairs, batch):
        for m, o in pairs:
            o.zero_grad()
            _loss(m, batch).backward()
            o.step()

    step(((a, oa), (b, ob)), 0)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    step(((a, oa),), 1)  # stale
    with torch.no_grad():
        for p, q in zip(b.parameters(), a.parameters()):
            p.copy_(q)
    step(((a, oa), (b, ob)), 2)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_only_the_sample_count_is_captured_between_refreshes():
    """Between refreshes a module records its sample count (distributed steps weight the ranks'
    gradients by it) and nothing else: no rows, no states, no costates."""
    model = _model()
    opt = pmptrain.EMSA(model, stat_every=3, fallback="sgd")
    active = []
    for t in range(7):
        active.append(all(e.spec is not None for e in opt.capture._entries.values()))
        opt.zero_grad()
        _loss(model, t).backward()
        for name in opt.capture.keys():
            st = opt.capture.peek(name)
            assert st.samples == 24, (t, name, st.samples)
            recorded = (st.rows, bool(st.x_rows), st.xx is not None, st.x_sum is not None, bool(st.g_rows),
                        st.gg is not None, st.g_sq is not None)
            assert any(recorded) == active[-1], (t, name, recorded)
        opt.step()
    assert active == [True, False, False, True, False, False, True]


def test_a_layer_in_gram_form_is_solved_exactly_every_step():
    """At batch 12 the Linear 15→6 has fewer rows than inputs (Gram form): it keeps nothing and
    every step is the default exact step on its own batch, while the convolution is amortised."""
    model = _model()
    opt = pmptrain.EMSA(model, stat_every=3, fallback="sgd")
    for t in range(2):
        x, y = _batch(t, n=12)
        if t == 1:
            ref_model = copy.deepcopy(model)
            ref = pmptrain.EMSA(ref_model, fallback="sgd")
            ref.zero_grad()
            F.mse_loss(ref_model(x), y).backward()
            ref.step()
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    assert opt.units["3"].state.running is None and opt.units["0"].state.running is not None
    assert opt.capture._entries["3"].spec is not None and opt.capture._entries["0"].spec is None
    for name in ("3.weight", "3.bias"):
        torch.testing.assert_close(dict(model.named_parameters())[name], dict(ref_model.named_parameters())[name],
                                   rtol=1e-10, atol=1e-12)
    assert not torch.allclose(model[0].weight, ref_model[0].weight)  # the amortised conv differs


def test_stat_every_with_running_averages_keeps_their_time_constant_in_steps():
    """stat_decay β with K = 3: every step refreshes while the averages are younger than 1/(1−β)
    (β = 0.25: steps 0 and 1), then every K-th; a refresh Δ steps after the last blends with β^Δ.
    So the kept C_x after step 3 is β²·(β·C_x(0) + (1−β)·C_x(1)) + (1−β²)·C_x(3), each at the
    weights of its step, the stale step 2 contributing nothing — the time constant stays 1/(1−β)
    steps (β per refresh would make it K/(1−β))."""
    beta = 0.25
    model = _model()
    opt = pmptrain.EMSA(model, stat_every=3, stat_decay=beta, fallback="sgd")
    seen, active = [], []
    model[3].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach().clone()))
    for t in range(4):
        active.append(all(e.spec is not None for e in opt.capture._entries.values()))
        opt.zero_grad()
        _loss(model, t).backward()
        opt.step()
    assert active == [True, True, False, True]
    c, m = [x.T @ x / x.shape[0] for x in seen], [x.mean(0) for x in seen]
    kept = opt.units["3"].state.running[0]
    b2 = beta ** 2
    torch.testing.assert_close(kept.cxx, b2 * (beta * c[0] + (1 - beta) * c[1]) + (1 - b2) * c[3], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(kept.x_mean, b2 * (beta * m[0] + (1 - beta) * m[1]) + (1 - b2) * m[3],
                               rtol=1e-12, atol=1e-14)


def test_resume_mid_interval_is_bit_exact():
    full, part = _model(), _model()
    of = pmptrain.EMSA(full, stat_every=3, fallback="sgd")
    op = pmptrain.EMSA(part, stat_every=3, fallback="sgd")
    for t in range(7):
        of.zero_grad()
        _loss(full, t).backward()
        of.step()
    for t in range(4):  # stop after step 4 of 7: mid-interval (the next step is stale)
        op.zero_grad()
        _loss(part, t).backward()
        op.step()
    sd, msd = copy.deepcopy(op.state_dict()), copy.deepcopy(part.state_dict())
    resumed = _model(seed=5)
    resumed.load_state_dict(msd)
    orr = pmptrain.EMSA(resumed, stat_every=3, fallback="sgd")
    orr.load_state_dict(sd)
    assert all(e.spec is None for e in orr.capture._entries.values())  # step 4 is stale
    for t in range(4, 7):
        orr.zero_grad()
        _loss(resumed, t).backward()
        orr.step()
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_invalid_stat_every_is_refused():
    with pytest.raises(ValueError, match="stat_every"):
        pmptrain.EMSA(_model(), stat_every=0)
    with pytest.raises(ValueError, match="stat_every"):
        pmptrain.EMSA(_model(), stat_every=2, costate="isotropic")


def test_tied_gpt_amortised_with_costate_units_runs_without_warnings():
    from pmptrain.bench.models import build_model
    torch.manual_seed(0)
    model = build_model("gpt", (16,), 32, n_layer=1, n_embd=16, n_head=2)
    opt = pmptrain.EMSA(model, stat_every=2, rho=5.0, rho_scale="costate", lr=10.0, strict=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 32, (4, 16), generator=g)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(4):
            opt.zero_grad()
            loss = F.cross_entropy(model(x).reshape(-1, 32), x.roll(-1, 1).reshape(-1))
            loss.backward()
            opt.step()
            assert not opt.last_step["skipped"]
    assert opt.units  # every unit stepped
    assert all(u.state.step == 4 for u in opt.units.values() if u.rule.module_rule)


# ---------------------------------------------------------------- amortise="bounded"
def _linear_snapshot(model):
    """``{name: (W, b, ∇W, ∇b)}`` of every Linear, copied (the step under test is checked from them)."""
    return {name: (mod.weight.detach().clone(), mod.bias.detach().clone(), mod.weight.grad.clone(),
                   mod.bias.grad.clone()) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}


def _bounded_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def _bounded_batch(i, n=24):
    """Batch 0 leaves input feature 3 silent (the refresh batch does not excite it); later batches
    use it at a large scale, so the bound lifts the kept curvature there."""
    g = torch.Generator().manual_seed(200 + i)
    x, t = torch.randn(n, 4, generator=g, dtype=DT), torch.randn(n, 3, generator=g, dtype=DT)
    x[:, 3] = 0.0 if i == 0 else 5.0 * x[:, 3]
    return x, t


def _record(model):
    """Each Linear's input rows and its output gradients, per backward pass."""
    rec = {}

    def hook(name):
        def fwd(mod, inp, out):
            rec[name] = {"x": inp[0].detach().clone()}
            out.register_hook(lambda g: rec[name].__setitem__("g", g.detach().clone()))
        return fwd
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            mod.register_forward_hook(hook(name))
    return rec


def _bounded_hamiltonian_maximiser(x, g_out, grad_w, grad_b, rho, lr, bounded):
    """The maximiser of the amortised H̃ of docs/algorithms.md ("Amortised curvature") written from
    its definition — refresh rows ``x``, refresh costates ``p̂ = −B·g_out``, this step's gradients —
    found by a Newton step on the flattened ``(ΔW, Δb)`` (H̃ is quadratic: one step is its maximiser)."""
    b = x.shape[0]
    p = -b * g_out
    cx, xbar, cp = x.T @ x / b, x.sum(0) / b, p.T @ p / b
    d_w = d_b = 1.0 / lr
    c = rho / (rho + d_b)
    gw, gb = -grad_w, -grad_b
    s = gw - c * torch.outer(gb, xbar)
    mu, v = torch.linalg.eigh(cp)
    lam, u = torch.linalg.eigh(cx - c * torch.outer(xbar, xbar))
    excess = (2.0 * (v.T @ s @ u).abs() - mu[:, None] - lam[None, :]).clamp_min(0.0)
    excess = excess if bounded else torch.zeros_like(excess)
    m, n = gw.shape

    def neg_h(z):
        dw, db = z[: m * n].reshape(m, n), z[m * n:]
        h = (gw * dw).sum() + gb @ db
        h = h - rho / 2 * (torch.trace(dw @ cx @ dw.T) + 2 * db @ dw @ xbar + db @ db)
        h = h - rho / 2 * torch.trace(dw.T @ cp @ dw)
        h = h - rho / 2 * (excess * (v.T @ dw @ u) ** 2).sum()
        h = h - d_w / 2 * (dw * dw).sum() - d_b / 2 * (db * db).sum()
        return -h

    z0 = torch.zeros(m * n + m, dtype=DT)
    hess = torch.autograd.functional.hessian(neg_h, z0)
    grad = torch.autograd.functional.jacobian(neg_h, z0)
    z = -torch.linalg.solve(hess, grad)
    return z[: m * n].reshape(m, n), z[m * n:], float((excess > 0).sum())


@pytest.mark.parametrize("k", [2, 3])
def test_bounded_step_between_refreshes_maximises_its_stated_hamiltonian(k):
    """amortise="bounded": step k−1 (between refreshes) is the maximiser of the refresh batch's
    H̃ plus the excess penalty ``(ρ/2)Σ e_ij (VᵀΔWU)²_ij``, ``e = max(0, 2|VᵀSU| − μ_i − λ_j)``,
    with this step's gradients — compared with a Newton step on that H̃ in float64, for both
    layers; the excess is active (a silent feature of the refresh batch), so "kept" differs."""
    rho, lr = 0.7, 0.5
    model = _bounded_model()
    rec = _record(model)
    opt = pmptrain.EMSA(model, stat_every=k, amortise="bounded", lr=lr, rho=rho, max_step=None, fallback="sgd")
    for t in range(k):
        opt.zero_grad()
        x, y = _bounded_batch(t)
        F.mse_loss(model(x), y).backward()
        if t == 0:
            refresh = {name: dict(r) for name, r in rec.items()}
        if t == k - 1:
            before = _linear_snapshot(model)
        opt.step()
    active = 0.0
    for name, (w0, b0, gw, gb) in before.items():
        mod = dict(model.named_modules())[name]
        dw, db, n_active = _bounded_hamiltonian_maximiser(refresh[name]["x"], refresh[name]["g"], gw, gb, rho, lr, True)
        active += n_active
        torch.testing.assert_close(mod.weight.detach() - w0, dw, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(mod.bias.detach() - b0, db, rtol=1e-9, atol=1e-12)
        kept_dw, _, _ = _bounded_hamiltonian_maximiser(refresh[name]["x"], refresh[name]["g"], gw, gb, rho, lr, False)
        if n_active:
            assert float((kept_dw - dw).abs().max()) > 1e-6
    assert active > 0  # the bound is active somewhere: the test tells "bounded" from "kept"


def test_bounded_steps_are_bounded_in_the_kept_basis():
    """Each entry of the weight step in the kept eigenbases is at most 1/(2ρ) in magnitude (the
    bound's divisor is at least 2ρ|S̃_ij|), however small the kept curvature — while "kept" steps
    the silent feature by ≈ lr·S."""
    rho, lr = 0.7, 1e3
    steps = {}
    for mode in ("kept", "bounded"):
        model = _bounded_model()
        opt = pmptrain.EMSA(model, stat_every=4, amortise=mode, lr=lr, rho=rho, max_step=None, fallback="sgd")
        for t in range(2):
            opt.zero_grad()
            x, y = _bounded_batch(t)
            F.mse_loss(model(x), y).backward()
            w0 = model[0].weight.detach().clone()
            opt.step()
        st = opt.units["0"].state
        v, u = st.eig_left[1], st.eig_right[1]
        steps[mode] = v.T @ (model[0].weight.detach() - w0) @ u
    assert float(steps["bounded"].abs().max()) <= 1.0 / (2.0 * rho) * (1 + 1e-12)
    assert float(steps["kept"].abs().max()) > 10.0 / (2.0 * rho)


def test_bounded_changes_nothing_on_refresh_steps_or_without_stat_every():
    """Refresh steps (and every step with stat_every = 1) are the exact step whatever ``amortise``."""
    for every, steps in ((1, 3), (3, 1)):
        a, b = _bounded_model(), _bounded_model()
        oa = pmptrain.EMSA(a, stat_every=every, amortise="bounded", fallback="sgd")
        ob = pmptrain.EMSA(b, stat_every=every, fallback="sgd")
        for t in range(steps):
            for m, o in ((a, oa), (b, ob)):
                o.zero_grad()
                x, y = _bounded_batch(t)
                F.mse_loss(m(x), y).backward()
                o.step()
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q)


def test_invalid_amortise_is_refused():
    with pytest.raises(ValueError, match="amortise"):
        pmptrain.EMSA(_model(), stat_every=2, amortise="soap")


@pytest.mark.parametrize("amortise", ["bounded", "rescaled"])
@pytest.mark.parametrize("grad_decay", [0.0, 0.9])
def test_bounded_steps_under_clipping_are_the_unclipped_steps_at_c_lr(grad_decay, amortise):
    """With ``rho_scale="costate"`` a gradient clipped by ``c`` after the backward pass scales ρ·r by
    ``c`` (docs/algorithms.md, "The units of ρ"); the bound of a step between refreshes is on the
    unclipped gradient (``κ|S̃|/c``), so clipping still acts on the proximal term only: the clipped
    bounded step at ``lr = η`` is the unclipped one at ``lr = c·η`` — with the gradient averaged
    too, the unclipped run's kept average being the clipped run's divided by ``c``. Float64; the
    bound binds there (a silent feature of the refresh batch): the "kept" step differs."""
    eta, clip = 0.5, 0.05
    kw = dict(rho=0.7, rho_scale="costate", stat_every=4, grad_decay=grad_decay, max_step=None,
              max_gain=None, fallback="sgd")
    a, b, k = _bounded_model(), _bounded_model(), _bounded_model()
    oa, ob = (pmptrain.EMSA(m, lr=eta, amortise=amortise, **kw) for m in (a, b))
    ok = pmptrain.EMSA(k, lr=eta, amortise="kept", **kw)
    for model, opt in ((a, oa), (b, ob), (k, ok)):  # step 0 (a refresh): the same unclipped step
        opt.zero_grad()
        x, y = _bounded_batch(0)
        F.mse_loss(model(x), y).backward()
        opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    x, y = _bounded_batch(1)
    for model, opt in ((a, oa), (k, ok)):  # step 1 (between refreshes), clipped by c
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        c = clip / (norm + 1e-6)  # clip_grad_norm_'s factor
        opt.step()
    assert c < 0.1
    if grad_decay:  # S̄_b = S̄_a / c: b's kept average of step 0 divided by c
        for u in ob.units.values():
            if u.state.grad_avg is not None:
                u.state.grad_avg = [None if g is None else g / c for g in u.state.grad_avg]
    ob.zero_grad()
    F.mse_loss(b(x), y).backward()
    for g in ob.param_groups:  # lr = c·η without a schedule (ρ/s unchanged)
        g["lr"] = g["base_lr"] = c * eta
    ob.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=n)
    assert float((a[0].weight - k[0].weight).detach().abs().max()) > 1e-6  # the bound binds


@pytest.mark.parametrize("k", [2, 3])
def test_rescaled_step_maximises_the_hamiltonian_of_the_refresh_batch_at_this_steps_traces(k):
    """amortise="rescaled": step k−1 maximises the bounded H̃ of the refresh batch whose states are
    scaled by ``√a_x`` and costates by ``√a_p``, ``a = tr C(this batch)/tr C(refresh batch)`` per side
    (``C_x → a_x C_x``, ``x̄ → √a_x x̄``, ``C_p → a_p C_p``), with this step's gradients — against a
    Newton step on that H̃ in float64; the traces differ (a feature 5× larger), so it is not
    "bounded"."""
    rho, lr = 0.7, 0.5
    model, twin = _bounded_model(), _bounded_model()
    rec = _record(model)
    opt = pmptrain.EMSA(model, stat_every=k, amortise="rescaled", lr=lr, rho=rho, max_step=None, fallback="sgd")
    o2 = pmptrain.EMSA(twin, stat_every=k, amortise="bounded", lr=lr, rho=rho, max_step=None, fallback="sgd")
    for t in range(k):
        for m, o in ((model, opt), (twin, o2)):
            o.zero_grad()
            x, y = _bounded_batch(t)
            F.mse_loss(m(x), y).backward()
        if t == 0:
            refresh = {name: dict(r) for name, r in rec.items()}
        if t == k - 1:
            now = {name: dict(r) for name, r in rec.items()}
            before = _linear_snapshot(model)
            # between refreshes only Σx², Σx and Σ‖g‖² are captured
            assert all(e.spec is not None and e.spec.states == "diag" and e.spec.costates == "sqnorm"
                       for e in opt.capture._entries.values())
        opt.step()
        o2.step()
    for name, (w0, b0, gw, gb) in before.items():
        mod = dict(model.named_modules())[name]
        xr, gr, xt, gt = refresh[name]["x"], refresh[name]["g"], now[name]["x"], now[name]["g"]
        a_x = (xt.square().sum() / xt.shape[0]) / (xr.square().sum() / xr.shape[0])
        a_p = (xt.shape[0] * gt).square().sum() / xt.shape[0] / ((xr.shape[0] * gr).square().sum() / xr.shape[0])
        assert abs(float(a_x) - 1.0) > 0.5 or abs(float(a_p) - 1.0) > 0.5
        dw, db, _ = _bounded_hamiltonian_maximiser(xr * a_x.sqrt(), gr * a_p.sqrt(), gw, gb, rho, lr, True)
        torch.testing.assert_close(mod.weight.detach() - w0, dw, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(mod.bias.detach() - b0, db, rtol=1e-9, atol=1e-12)
    assert float((model[0].weight - twin[0].weight).detach().abs().max()) > 1e-6


def test_rescaled_refresh_steps_are_the_exact_step_and_ties_and_embeddings_stay_bounded():
    """Refresh steps of "rescaled" equal "bounded"'s (the exact step); a tied embedding and a
    position embedding are not rescaled (their steps between refreshes equal "bounded"'s), a Linear
    is."""
    from pmptrain.bench.models import build_model
    models, opts = [], []
    for mode in ("bounded", "rescaled"):
        torch.manual_seed(0)
        m = build_model("gpt", (8,), 16, n_layer=1, n_embd=8, n_head=2).to(DT)
        models.append(m)
        opts.append(pmptrain.EMSA(m, stat_every=3, amortise=mode, rho=5.0, rho_scale="costate", lr=10.0, max_gain=None))
    g = torch.Generator().manual_seed(0)
    for t in range(2):
        x = torch.randint(0, 16, (4, 8), generator=g)
        for m, o in zip(models, opts):
            o.zero_grad()
            F.cross_entropy(m(x).reshape(-1, 16), x.roll(-1, 1).reshape(-1)).backward()
            o.step()
        a, b = (dict(m.named_parameters()) for m in models)
        same = {n for n in a if torch.equal(a[n], b[n])}
        if t == 0:
            assert same == set(a)
        else:
            assert {"wte.weight", "wpe.weight"} <= same and "h.0.mlp.0.weight" not in same


def test_rescaled_with_reduced_statistics_is_refused():
    with pytest.raises(ValueError, match="rescaled"):
        pmptrain.EMSA(_model(), stat_every=2, amortise="rescaled", stat_reduce=True)


def test_rescaled_traces_are_averaged_every_step_like_the_statistics():
    """With stat_decay β the traces that "rescaled" scales the kept statistics to are averaged every
    step, refresh or not: ``T_t = β·T_{t−1} + (1−β)·(Σ‖x‖²/B, Σ‖p̂‖²/B)_t`` (float64, by hand from
    hooks), so the kept mixture is rescaled to the mixture's current trace, not to one batch's."""
    beta = 0.5
    model = _bounded_model()
    rec = _record(model)
    opt = pmptrain.EMSA(model, stat_every=3, stat_decay=beta, amortise="rescaled", lr=0.5, rho=0.7, fallback="sgd")
    expect = None
    for t in range(3):  # steps 0, 1 refresh (younger than 1/(1−β) = 2), step 2 between refreshes
        opt.zero_grad()
        x, y = _bounded_batch(t)
        F.mse_loss(model(x), y).backward()
        xt, gt = rec["0"]["x"], rec["0"]["g"]
        b = xt.shape[0]
        now = torch.stack([xt.square().sum() / b, (b * gt).square().sum() / b])
        expect = now if expect is None else beta * expect + (1 - beta) * now
        opt.step()
        torch.testing.assert_close(opt.units["0"].state.traces, expect, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("amortise", ["bounded", "rescaled"])
def test_averaged_gradient_is_the_linear_term_between_refreshes(amortise):
    """With grad_decay β every step, refresh or not, is the step of ``grad_decay = 0`` whose ``.grad``
    is replaced by ``S̄_t = β·S̄_{t−1} + (1−β)·∇J_t`` (float64, K = 3: one refresh, two steps between;
    the statistics, captured in the backward pass, do not depend on ``.grad``)."""
    beta = 0.5
    a, b = _bounded_model(), _bounded_model()
    kw = dict(stat_every=3, amortise=amortise, stat_decay=0.5, lr=0.5, rho=0.7, max_step=None, max_gain=None,
              fallback="sgd")
    oa, ob = pmptrain.EMSA(a, grad_decay=beta, **kw), pmptrain.EMSA(b, **kw)
    avg = {}
    for t in range(5):  # steps 0, 1 refresh (younger than 1/(1−β)), 2 and 4 between, 3 refreshes
        x, y = _bounded_batch(t)
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            F.mse_loss(m(x), y).backward()
        feed_gradient_average(b.parameters(), avg, beta)
        oa.step()
        ob.step()
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=f"{n} at step {t}")


def test_bounded_step_does_not_depend_on_the_basis_of_a_null_space():
    """A rank-deficient kept statistic (reduced rows of a small batch) has a null space whose basis
    the eigensolver picks arbitrarily; the bound takes the norm over that block, so rotating the
    null basis leaves the step unchanged — and with distinct eigenvalues it is the entrywise rule."""
    from pmptrain.hamiltonian import sylvester_in_eigenbases

    g = torch.Generator().manual_seed(0)
    m, n, r = 7, 6, 3
    a = torch.randn(r, m, generator=g, dtype=torch.float64)
    mu, v = torch.linalg.eigh(a.T @ a)  # rank 3: a 4-dimensional null space
    mu = mu.clamp_min(0.0)
    b = torch.randn(n, n, generator=g, dtype=torch.float64)
    lam, u = torch.linalg.eigh(b @ b.T)
    s = torch.randn(m, n, generator=g, dtype=torch.float64)
    null = mu <= 1e-8 * mu.max()
    assert int(null.sum()) == m - r
    q, _ = torch.linalg.qr(torch.randn(m - r, m - r, generator=g, dtype=torch.float64))
    v2 = v.clone()
    v2[:, null] = v[:, null] @ q  # another orthonormal basis of the same null space
    step = sylvester_in_eigenbases(s, (mu, v), (lam, u), rho=1.0, delta=0.01, bound=3.0)
    rotated = sylvester_in_eigenbases(s, (mu, v2), (lam, u), rho=1.0, delta=0.01, bound=3.0)
    torch.testing.assert_close(rotated, step, rtol=1e-12, atol=1e-14)
    # the entrywise rule depends on the basis here (what the block norm removes)
    core, core2 = v.T @ s @ u, v2.T @ s @ u
    entry = [x @ ((c / (torch.maximum(mu[:, None] + lam[None, :], 3.0 * c.abs()) + 0.01)) @ u.T)
             for x, c in ((v, core), (v2, core2))]
    assert (entry[0] - entry[1]).abs().max() > 1e-3
    # distinct eigenvalues on both sides: exactly the entrywise rule
    mu_full = mu + torch.arange(1, m + 1, dtype=torch.float64)
    want = v @ ((core / (torch.maximum(mu_full[:, None] + lam[None, :], 3.0 * core.abs()) + 0.01)) @ u.T)
    torch.testing.assert_close(sylvester_in_eigenbases(s, (mu_full, v), (lam, u), 1.0, 0.01, 3.0), want,
                               rtol=1e-12, atol=1e-14)
