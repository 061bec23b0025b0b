"""K-FAC-reduce statistics (``stat_reduce=True``): the rows of one sequence / image are summed and
divided by √L before the outer product; the step is exact when an entry's rows are equal."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pmptrain

DT = torch.float64


def _linear_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).to(DT)


def test_reduced_statistics_are_the_outer_products_of_the_summed_rows():
    """C_x·B = Σ_b x̃_b x̃_bᵀ with x̃_b = Σ_t x_bt/√T (and likewise the costates), while Σx, the row
    count and the sample count are those of the rows."""
    model = _linear_model()
    opt = pmptrain.EMSA(model, stat_reduce=True, fallback="sgd")
    seen = {}

    def hook(mod, inp, out):
        seen["x"] = inp[0].detach()
        out.register_hook(lambda g: seen.__setitem__("g", g.detach()))
    model[2].register_forward_hook(hook)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 5, 3, generator=g, dtype=DT), torch.randn(4, 5, 2, generator=g, dtype=DT)
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    st = opt.capture.peek("2")
    xr, gr = seen["x"], seen["g"]
    xt, gt = xr.sum(1) / 5 ** 0.5, gr.sum(1) / 5 ** 0.5
    torch.testing.assert_close(st.xx, xt.T @ xt, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(st.gg, gt.T @ gt, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(st.x_sum, xr.reshape(-1, 6).sum(0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(st.g_sq, gr.pow(2).sum(), rtol=1e-12, atol=1e-14)
    assert st.rows == 20 and st.samples == 20
    row_form = xr.reshape(-1, 6)
    assert float((st.xx - row_form.T @ row_form).abs().max()) > 1e-3  # not the row form


def _step(model, opt, x, y):
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_reduced_step_is_exact_when_the_rows_of_an_entry_are_equal(kind):
    """Tokens repeated along the sequence (a token-wise MLP) or a constant image without padding (one
    convolution: a second one would give border positions other costates): every row of an entry
    is equal, so the reduced statistics are the row form's and
    the step is the exact primal step; with distinct rows it is not."""
    g = torch.Generator().manual_seed(2)
    if kind == "linear":
        build = _linear_model
        x = torch.randn(6, 1, 3, generator=g, dtype=DT).expand(6, 4, 3).contiguous()
        y = torch.randn(6, 1, 2, generator=g, dtype=DT).expand(6, 4, 2).contiguous()
        x_distinct = torch.randn(6, 4, 3, generator=g, dtype=DT)
    else:
        def build():
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(2, 3, 2), nn.Tanh()).to(DT)  # one layer: equal costates too
        x = torch.randn(6, 2, 1, 1, generator=g, dtype=DT).expand(6, 2, 5, 5).contiguous()
        y = torch.randn(6, 3, 1, 1, generator=g, dtype=DT).expand(6, 3, 4, 4).contiguous()
        x_distinct = torch.randn(6, 2, 5, 5, generator=g, dtype=DT)
    results = {}
    for name, inp in (("equal", x), ("distinct", x_distinct)):
        a, b = build(), build()
        oa = pmptrain.EMSA(a, stat_reduce=True, max_step=None, fallback="sgd")
        ob = pmptrain.EMSA(b, route="primal", costate="exact", max_step=None, fallback="sgd")
        _step(a, oa, inp, y)
        _step(b, ob, inp, y)
        results[name] = max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))
    assert results["equal"] < 1e-12
    assert results["distinct"] > 1e-6


def test_reduce_composes_with_bounded_amortisation():
    """stat_every with stat_reduce: refresh steps capture reduced statistics, the steps between
    capture nothing and train (loss decreases over a few steps)."""
    model = _linear_model()
    opt = pmptrain.EMSA(model, stat_every=3, amortise="bounded", stat_reduce=True, fallback="sgd")
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 5, 3, generator=g, dtype=DT), torch.randn(8, 5, 2, generator=g, dtype=DT)
    losses = []
    for t in range(6):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        losses.append(float(loss.detach()))
        assert (opt.capture.peek("0").xx is not None) == (t % 3 == 0)
        opt.step()
    assert losses[-1] < losses[0]
