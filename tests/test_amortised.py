"""Amortised curvature (``stat_every = K``): a step between two refreshes is the exact E-MSA step
with the statistics of the last refresh and its own ``.grad``; nothing is captured on those steps;
the state resumes bit-exact mid-interval."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pmptrain

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


def test_stat_every_with_running_averages_blends_only_refreshes():
    """stat_decay β with K = 2: the kept C_x after the refresh at step 2 is β·C_x(batch 0, θ_0) +
    (1−β)·C_x(batch 2, θ_2), the stale step 1 contributing nothing."""
    model = _model()
    opt = pmptrain.EMSA(model, stat_every=2, stat_decay=0.25, fallback="sgd")
    seen = []
    model[3].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach().clone()))
    for t in range(3):
        opt.zero_grad()
        _loss(model, t).backward()
        opt.step()
    c0, c2 = (x.T @ x / x.shape[0] for x in (seen[0], seen[2]))
    kept = opt.units["3"].state.running[0]
    torch.testing.assert_close(kept.cxx, 0.25 * c0 + 0.75 * c2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(kept.x_mean, 0.25 * seen[0].mean(0) + 0.75 * seen[2].mean(0), rtol=1e-12, atol=1e-14)


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
