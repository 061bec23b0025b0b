"""Averaged steps (``grad_decay``): the linear term of every closed-form rule is the running average
``S̄ ← β·S̄ + (1−β)·∇J`` of the gradient; the step is the same closed form with ``.grad`` replaced by
that average (float64, against a reference optimizer fed the average by hand), a skipped step keeps
the average, the fallback's Adam is not averaged twice, and the state resumes bit-exact."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pmptrain
from helpers import feed_gradient_average

DT = torch.float64


class _Custom(nn.Module):
    """A module without a closed form (its parameter enters through exp): the Adam fallback."""

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(4, dtype=DT))

    def forward(self, x):
        return x * self.log_scale.exp()


class _Net(nn.Module):
    """Every closed-form rule at once: an embedding tied to the head (affine tie), a grouped
    convolution, a LayerNorm (channel rule), MultiheadAttention, an additive position table, and a
    fallback module."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.pos = nn.Parameter(0.1 * torch.randn(6, 8))
        self.conv = nn.Conv1d(8, 8, 3, padding=1, groups=2)
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 4)
        self.custom = _Custom()
        self.head = nn.Linear(4, 11, bias=False)

    def forward(self, idx):
        h = self.emb(idx) + self.pos
        h = h + torch.tanh(self.conv(h.transpose(1, 2)).transpose(1, 2))
        h = self.norm(h)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.custom(torch.tanh(self.fc(h))))


def _net(seed=0):
    torch.manual_seed(seed)
    return _Net().to(DT)


def _batch(i):
    g = torch.Generator().manual_seed(200 + i)
    return torch.randint(0, 11, (5, 6), generator=g), torch.randint(0, 11, (5, 6), generator=g)


def _loss(model, i):
    x, y = _batch(i)
    return F.cross_entropy(model(x).reshape(-1, 11), y.reshape(-1))


KW = dict(lr=2.0, rho=0.5, stat_decay=0.8, fallback_lr=1e-2)



@pytest.mark.filterwarnings("ignore:.*fallback")
@pytest.mark.parametrize("beta", [0.5, 0.9])
def test_the_averaged_step_is_the_step_on_the_averaged_gradient(beta):
    """``EMSA(grad_decay=β)`` equals ``EMSA(grad_decay=0)`` whose ``.grad`` of the controlled
    parameters is replaced by ``S̄_t = β·S̄_{t−1} + (1−β)·∇J_t`` (``S̄_0 = ∇J_0``) before each
    step — for the Linear, tied, grouped-convolution, norm, attention and additive rules — while the
    fallback's parameters see their own ``.grad`` in both."""
    a, b = _net(), _net()
    opt_a = pmptrain.EMSA(a, grad_decay=beta, **KW)
    opt_b = pmptrain.EMSA(b, **KW)
    controlled = {id(p) for u in opt_b.units.values() if u.rule.name != "fallback" for p in u.params}
    assert id(b.custom.log_scale) not in controlled and id(b.fc.weight) in controlled
    avg = {}
    for t in range(4):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            _loss(model, t).backward()
        feed_gradient_average([p for p in b.parameters() if id(p) in controlled], avg, beta)
        opt_a.step()
        opt_b.step()
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=f"{n} at step {t}")
    # the averages are the unit's state, published in opt.state
    unit = opt_a.unit_of(a.fc.weight)
    torch.testing.assert_close(unit.state.grad_avg[0], avg[b.fc.weight], rtol=1e-10, atol=1e-12)
    assert opt_a.state[a.fc.weight]["grad_avg"][0] is unit.state.grad_avg[0]


@pytest.mark.filterwarnings("ignore:.*fallback")
def test_averaging_changes_the_step():
    """β > 0 is not a no-op: after two steps the weights differ from β = 0."""
    a, b = _net(), _net()
    opt_a, opt_b = pmptrain.EMSA(a, grad_decay=0.9, **KW), pmptrain.EMSA(b, **KW)
    for t in range(2):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            _loss(model, t).backward()
            opt.step()
    assert (a.fc.weight - b.fc.weight).abs().max() > 1e-4


@pytest.mark.filterwarnings("ignore:.*fallback")
def test_a_skipped_step_keeps_the_weights_and_the_average():
    model = _net()
    opt = pmptrain.EMSA(model, grad_decay=0.9, **KW)
    for t in range(2):
        opt.zero_grad()
        _loss(model, t).backward()
        opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    avg = [g.clone() for g in opt.unit_of(model.fc.weight).state.grad_avg]
    opt.zero_grad()
    _loss(model, 2).backward()
    model.fc.weight.grad[0, 0] = float("nan")
    opt.step()
    assert opt.last_step["skipped"]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(torch.equal(g, h) for g, h in zip(opt.unit_of(model.fc.weight).state.grad_avg, avg))


@pytest.mark.filterwarnings("ignore:.*fallback")
def test_resume_is_bit_exact_and_an_older_record_without_the_average_loads():
    def run(steps, model, opt, start=0):
        for t in range(start, start + steps):
            opt.zero_grad()
            _loss(model, t).backward()
            opt.step()

    a = _net()
    opt_a = pmptrain.EMSA(a, grad_decay=0.9, **KW)
    run(4, a, opt_a)
    b = _net()
    opt_b = pmptrain.EMSA(b, grad_decay=0.9, **KW)
    run(2, b, opt_b)
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    c = _net(seed=1)
    c.load_state_dict(ck["model"])
    opt_c = pmptrain.EMSA(c, grad_decay=0.9, **KW)
    opt_c.load_state_dict(ck["opt"])
    run(2, c, opt_c, start=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))

    # a state_dict written before grad_decay existed has no grad_avg field: it loads, and the
    # average starts at the next gradient
    old = copy.deepcopy(ck["opt"])
    removed = 0
    for entry in old["state"].values():
        if "grad_avg" in entry:
            del entry["grad_avg"]
            removed += 1
    assert removed > 0
    d = _net(seed=1)
    d.load_state_dict(ck["model"])
    opt_d = pmptrain.EMSA(d, grad_decay=0.9, **KW)
    opt_d.load_state_dict(old)
    run(1, d, opt_d, start=2)
    assert opt_d.unit_of(d.fc.weight).state.grad_avg is not None


def test_grad_decay_is_checked():
    model = nn.Linear(3, 2)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="grad_decay"):
            pmptrain.EMSA(model, grad_decay=bad)


def test_running_averages_keep_an_isotropic_costate_on_a_very_wide_side(monkeypatch):
    """Under ``stat_decay`` a costate side wider than ``RUNNING_DENSE_COSTATE_MAX`` (a vocabulary-
    sized head) keeps ``τ = tr(C_p)/m`` instead of the m×m ``C_p``: the first step equals the
    isotropic primal step, and τ is averaged like the other statistics."""
    from pmptrain.optim import affine

    monkeypatch.setattr(affine, "RUNNING_DENSE_COSTATE_MAX", 3)
    torch.manual_seed(0)
    model = nn.Linear(5, 6).to(DT)  # m = 6 > 3: isotropic; the input side stays dense
    twin = copy.deepcopy(model)
    beta = 0.8
    opt = pmptrain.EMSA(model, lr=2.0, rho=0.5, stat_decay=beta)
    ref = pmptrain.EMSA(twin, lr=2.0, rho=0.5, costate="isotropic", route="primal")
    taus = []
    for t in range(2):
        g = torch.Generator().manual_seed(300 + t)
        x, y = torch.randn(12, 5, generator=g, dtype=DT), torch.randn(12, 6, generator=g, dtype=DT)
        opt.zero_grad()
        out = model(x)
        out.retain_grad()
        F.mse_loss(out, y).backward()
        p_hat = -12 * out.grad  # p̂ = −B·∂J/∂y
        taus.append(float(p_hat.pow(2).sum()) / (12 * 6))
        opt.step()
        if t == 0:
            ref.zero_grad()
            F.mse_loss(twin(x), y).backward()
            ref.step()
            torch.testing.assert_close(model.weight, twin.weight, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(model.bias, twin.bias, rtol=1e-10, atol=1e-12)
    run = opt.unit_of(model.weight).state.running[0]
    assert run.cpp is None
    assert float(run.tau) == pytest.approx(beta * taus[0] + (1 - beta) * taus[1], rel=1e-10)


def test_eigenbases_are_refreshed_every_step_while_the_running_averages_are_young():
    """``eig_refresh = k``: every k-th step, and every step before the averages' time constant
    ``1/(1−β)``; the optimizer keeps the eigenbasis exactly on the other steps."""
    from pmptrain.optim.affine import eig_refresh_due

    due = [s for s in range(30) if eig_refresh_due(s, 10, 0.9)]
    assert due == list(range(10)) + [10, 20]
    assert [s for s in range(25) if eig_refresh_due(s, 10, 0.95)] == list(range(20)) + [20]
    assert [s for s in range(7) if eig_refresh_due(s, 3, 0.0)] == [0, 3, 6]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    opt = pmptrain.EMSA(model, stat_decay=0.5, eig_refresh=3)  # young for steps 0, 1
    seen = []
    for t in range(5):
        g = torch.Generator().manual_seed(t)
        opt.zero_grad()
        F.mse_loss(model(torch.randn(16, 3, generator=g, dtype=DT)), torch.randn(16, 2, generator=g, dtype=DT)).backward()
        opt.step()
        seen.append(opt.unit_of(model[0].weight).state.eig_left[1].clone())
    changed = [not torch.equal(a, b) for a, b in zip(seen, seen[1:])]  # steps 1, 2, 3, 4
    assert changed == [True, False, True, False]
