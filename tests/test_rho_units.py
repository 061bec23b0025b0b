"""The units of ρ and what a schedule does to it (docs/algorithms.md, "The units of ρ, and schedules").

* A schedule ``s = lr/base_lr`` divides every penalty of H̃ (``δ = 1/lr`` and ``ρ/s``), so each
  closed-form step is exactly ``s`` times its value at ``base_lr``.
* ``rho_scale="costate"`` is ``ρ_t = ρ·r_t`` with ``r_t`` the rms costate entry of unit t, checked
  against ``rho_scale="none"`` with ``ρ·r_t`` computed here from autograd costates.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pmptrain

DT = torch.float64


class Tied(nn.Module):
    """Embedding → LayerNorm → Linear with the output weight tied to the embedding, + a depthwise
    convolution over the sequence: every closed-form rule (matrix, tie, channel, grouped)."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.conv = nn.Conv1d(d, d, 3, padding=1, groups=d)
        self.ln = nn.LayerNorm(d)
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        h = self.emb(idx)
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = torch.tanh(self.mid(self.ln(h)))
        return self.head(h)


def _data(seed=0, b=3, t=5, vocab=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g), torch.randint(0, vocab, (b, t), generator=g)


def _loss(model, x, y, scale=1.0):
    out = model(x)
    return scale * F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _step(model, opt, x, y, scale=1.0, loss=_loss):
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss(model, x, y, scale).backward()
    opt.step()
    assert not opt.last_step["skipped"]
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


@pytest.mark.parametrize("kw", [
    {},
    {"rho_scale": "costate"},
    {"costate": "exact", "route": "primal"},
    {"stat_decay": 0.5},
])
def test_a_schedule_scales_every_closed_form_step_exactly(kw):
    torch.manual_seed(0)
    base = Tied().to(DT)
    x, y = _data()
    steps = {}
    for s in (1.0, 0.3, 2.5):
        model = copy.deepcopy(base)
        opt = pmptrain.EMSA(model, lr=0.7, rho=1.3, strict=True, **kw)
        for g in opt.param_groups:
            g["lr"] = 0.7 * s  # what a scheduler does
        steps[s] = _step(model, opt, x, y)
        opt.detach()
    for s in (0.3, 2.5):
        for d1, ds in zip(steps[1.0], steps[s]):
            torch.testing.assert_close(ds, s * d1, rtol=1e-9, atol=1e-14)
    assert all(d.abs().max() > 0 for d in steps[1.0])


def test_a_schedule_reaches_the_penalty_not_only_delta():
    """With a dominant penalty (ρC ≫ δ) the 0.1.0 behaviour — δ = 1/lr alone — barely moved the
    step; now it halves with lr."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3)).to(DT)
    x, y = torch.randn(32, 4, dtype=DT), torch.randn(32, 3, dtype=DT)
    sizes = []
    for lr in (1e3, 5e2):
        m = copy.deepcopy(model)
        opt = pmptrain.EMSA(m, lr=1e3, rho=10.0)
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        F.mse_loss(m(x), y).backward()
        w0 = m[0].weight.detach().clone()
        opt.step()
        sizes.append((m[0].weight.detach() - w0).norm())
    torch.testing.assert_close(sizes[1], sizes[0] / 2, rtol=1e-9, atol=0)


def _costates(model, x, y):
    """Per-row costates ``p̂`` of every module output, from autograd: ``p̂ = −B·∂J/∂y`` with B the
    module's sample count (tokens for row-wise layers, sequences for the convolution)."""
    rec = {}
    hooks = []
    for name in ("emb", "conv", "mid", "head"):
        mod = getattr(model, name)

        def hook(m, args, out, name=name):
            out.register_hook(lambda g: rec.__setitem__(name, g.detach()))
        hooks.append(mod.register_forward_hook(hook))
    _loss(model, x, y).backward()
    for h in hooks:
        h.remove()
    model.zero_grad()
    b, t = x.shape
    rows = {
        "emb": -(b * t) * rec["emb"].reshape(-1, rec["emb"].shape[-1]),
        "mid": -(b * t) * rec["mid"].reshape(-1, rec["mid"].shape[-1]),
        "head": -(b * t) * rec["head"].reshape(-1, rec["head"].shape[-1]),
        "conv": -b * rec["conv"].transpose(1, 2).reshape(-1, rec["conv"].shape[1]),
    }
    return rows


def _rms(*rows):
    return (sum(float(r.pow(2).sum()) for r in rows) / sum(r.numel() for r in rows)) ** 0.5


def test_costate_scaled_rho_is_rho_times_each_units_rms_costate():
    torch.manual_seed(2)
    base = Tied().to(DT)
    x, y = _data(3)
    p = _costates(base, x, y)
    r = {"tie": _rms(p["emb"], p["head"]), "mid": _rms(p["mid"]), "conv": _rms(p["conv"])}
    assert len({round(v, 6) for v in r.values()}) == 3  # the check distinguishes the units
    rho = 1.7
    scaled = copy.deepcopy(base)
    opt_a = pmptrain.EMSA(scaled, lr=0.8, rho=rho, rho_scale="costate", strict=True)
    got = dict(zip([n for n, _ in scaled.named_parameters()], _step(scaled, opt_a, x, y)))

    ref = copy.deepcopy(base)
    groups = [
        {"params": [ref.emb.weight], "rho": rho * r["tie"]},
        {"params": list(ref.conv.parameters()), "rho": rho * r["conv"]},
        {"params": list(ref.mid.parameters()), "rho": rho * r["mid"]},
        {"params": list(ref.ln.parameters()), "rho": rho},  # norm affines keep ρ as given
    ]
    opt_b = pmptrain.EMSA(ref, groups, lr=0.8, strict=True)
    want = dict(zip([n for n, _ in ref.named_parameters()], _step(ref, opt_b, x, y)))
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-13)
    # and the scale is real: ρ as given takes a different step
    plain = copy.deepcopy(base)
    d_plain = _step(plain, pmptrain.EMSA(plain, lr=0.8, rho=rho), x, y)
    assert (d_plain[0] - got["emb.weight"]).abs().max() > 1e-6


def test_costate_scale_follows_the_loss_scale():
    """ρ_t ∝ r_t ∝ the loss scale: multiplying the loss by c multiplies ρ_t by c (checked against
    ρ given explicitly), so the penalties keep pace with the linear term."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x, y = torch.randn(16, 5, dtype=DT), torch.randn(16, 3, dtype=DT)

    def mse(m, x, y, scale):
        return scale * F.mse_loss(m(x), y)

    a = copy.deepcopy(model)
    d_c = _step(a, pmptrain.EMSA(a, rho=2.0, rho_scale="costate", lr=5.0), x, y, scale=10.0, loss=mse)
    b = copy.deepcopy(model)
    d_1 = _step(b, pmptrain.EMSA(b, rho=2.0, rho_scale="costate", lr=5.0), x, y, scale=1.0, loss=mse)
    # the reference: rho_scale="none" with ρ·r measured from the unscaled loss, times 10
    rows = {}

    def recorder(i):
        def hook(mod, args, out):
            out.register_hook(lambda g: rows.__setitem__(i, g.detach()))
        return hook
    hooks = [model[i].register_forward_hook(recorder(i)) for i in (0, 2)]
    F.mse_loss(model(x), y).backward()
    for h in hooks:
        h.remove()
    model.zero_grad()
    r = {i: _rms(-16 * g) for i, g in rows.items()}
    for scale, d in ((1.0, d_1), (10.0, d_c)):
        c = copy.deepcopy(model)
        groups = [{"params": list(c[0].parameters()), "rho": 2.0 * scale * r[0]},
                  {"params": list(c[2].parameters()), "rho": 2.0 * scale * r[2]}]
        want = _step(c, pmptrain.EMSA(c, groups, lr=5.0), x, y, scale=scale, loss=mse)
        for u, v in zip(d, want):
            torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-13)


def test_rho_scale_is_validated():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="rho_scale"):
        pmptrain.EMSA(model, rho_scale="relative")
    with pytest.raises(ValueError, match="rho_scale='costate' with solver='iterative'|rho_scale.*iterative"):
        pmptrain.EMSA(model, rho_scale="costate", solver="iterative")
    opt = pmptrain.EMSA(model, rho_scale="costate")
    assert "rms costate" in opt.rule_table()[0]["description"]
    assert pmptrain.EMSA(model).param_groups[0]["rho_scale"] == "none"


def test_costate_scale_set_after_the_backward_pass_warns_and_uses_rho_as_given():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Embedding(7, 3)).to(DT)
    x = torch.randint(0, 7, (5,))
    ref = copy.deepcopy(model)
    opt = pmptrain.EMSA(model, rho=2.0)
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    opt.param_groups[0]["rho_scale"] = "costate"  # too late for this backward pass
    with pytest.warns(UserWarning, match="no costate was recorded"):
        opt.step()
    opt_ref = pmptrain.EMSA(ref, rho=2.0)
    ref(x).pow(2).sum().backward()
    opt_ref.step()
    torch.testing.assert_close(model[0].weight, ref[0].weight, rtol=0, atol=0)


@pytest.mark.parametrize("route", ["auto", "primal"])
def test_costate_scaled_steps_carry_the_scale_of_a_clipped_gradient(route):
    """Under ``rho_scale="costate"`` the costates are in the units of the gradient the step uses:
    clipping ``.grad`` by ``c`` after the backward pass scales ρ·r with it (measured against the
    gradient's norm at the backward pass), so the clipped step at ``lr = η`` is the unclipped step
    at ``lr = c·η`` — clipping acts on the proximal term only. Float64, Gram and primal routes."""
    import copy

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 5)).double()
    x, t = torch.randn(7, 6, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    kw = dict(rho=3.0, rho_scale="costate", route=route, max_step=None, max_gain=None, fallback="sgd")
    eta, clip = 2.0, 0.05
    a = copy.deepcopy(base)
    opt_a = pmptrain.EMSA(a, lr=eta, **kw)
    torch.nn.functional.mse_loss(a(x), t).backward()
    norm = float(torch.nn.utils.clip_grad_norm_(a.parameters(), clip))
    c = clip / (norm + 1e-6)  # clip_grad_norm_'s factor
    assert c < 0.5
    opt_a.step()
    b = copy.deepcopy(base)
    opt_b = pmptrain.EMSA(b, lr=c * eta, **kw)
    torch.nn.functional.mse_loss(b(x), t).backward()
    opt_b.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=n)
