"""Affine views (pmptrain.views): recurrent layers, Mixtral's router and fused experts, PReLU.

* the unrolled forward through the views equals the host's own (fused) forward in float64;
* the captured statistics equal those of an explicit model built from ``nn.Linear`` layers;
* the step of every view's unit equals the numerical maximiser of its augmented Hamiltonian
  (``test_layers.newton_maximiser``) over every recorded call of the view (a shared module called
  T times);
* hooks fire: every claimed unit has statistics after a backward.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pmptrain
from pmptrain.views import unrolled_forward, views_of
from test_layers import LR, RHO, _block_linear, newton_maximiser, one_step

DT = torch.float64


def _close(a, b):
    if isinstance(a, tuple):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _close(u, v)
    else:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


RNNS = [
    ("rnn-2layer-bidir", lambda: nn.RNN(3, 4, 2, bidirectional=True)),
    ("rnn-relu-batchfirst-nobias", lambda: nn.RNN(3, 4, nonlinearity="relu", batch_first=True, bias=False)),
    ("lstm-2layer-bidir-batchfirst", lambda: nn.LSTM(3, 5, 2, bidirectional=True, batch_first=True)),
    ("lstm-proj-bidir", lambda: nn.LSTM(3, 5, 2, proj_size=2, bidirectional=True)),
    ("gru-3layer-bidir", lambda: nn.GRU(3, 4, 3, bidirectional=True)),
    ("gru-nobias", lambda: nn.GRU(3, 4, bias=False)),
]
CELLS = [("rnncell", lambda: nn.RNNCell(3, 4, nonlinearity="relu")), ("lstmcell", lambda: nn.LSTMCell(3, 4)),
         ("grucell-nobias", lambda: nn.GRUCell(3, 4, bias=False))]


@pytest.mark.parametrize("name,make", RNNS, ids=[r[0] for r in RNNS])
def test_unrolled_recurrence_equals_the_fused_kernel(name, make):
    torch.manual_seed(0)
    m = make().double()
    first = m.batch_first
    x = torch.randn((2, 6, 3) if first else (6, 2, 3), dtype=DT)
    out = m(x)
    _close(unrolled_forward(m, x), out)
    _close(unrolled_forward(m, x, out[1]), m(x, out[1]))  # given initial states
    xu = torch.randn(5, 3, dtype=DT)  # unbatched
    _close(unrolled_forward(m, xu), m(xu))


@pytest.mark.parametrize("name,make", CELLS, ids=[c[0] for c in CELLS])
def test_unrolled_cells_equal_the_cells(name, make):
    torch.manual_seed(0)
    m = make().double()
    x = torch.randn(3, 3, dtype=DT)
    h = m(x)
    _close(unrolled_forward(m, x), h)
    _close(unrolled_forward(m, x, h), m(x, h))
    _close(unrolled_forward(m, x[0]), m(x[0]))


class ExplicitGRU(nn.Module):
    """A one-layer GRU written with two nn.Linear layers (ih applied to the whole sequence, hh
    called at every step): the reference for the captured statistics."""

    def __init__(self, gru):
        super().__init__()
        self.ih = nn.Linear(gru.input_size, 3 * gru.hidden_size).double()
        self.hh = nn.Linear(gru.hidden_size, 3 * gru.hidden_size).double()
        with torch.no_grad():
            self.ih.weight.copy_(gru.weight_ih_l0)
            self.ih.bias.copy_(gru.bias_ih_l0)
            self.hh.weight.copy_(gru.weight_hh_l0)
            self.hh.bias.copy_(gru.bias_hh_l0)
        self.hidden = gru.hidden_size

    def forward(self, x):  # batch_first
        gi = self.ih(x)
        h = x.new_zeros(x.shape[0], self.hidden)
        ys = []
        for t in range(x.shape[1]):
            ir, iz, inn = gi[:, t].chunk(3, -1)
            hr, hz, hn = self.hh(h).chunk(3, -1)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            h = (1 - z) * torch.tanh(inn + r * hn) + z * h
            ys.append(h)
        return torch.stack(ys, 1)


def test_recurrent_statistics_equal_those_of_an_explicit_linear_model():
    torch.manual_seed(0)
    gru = nn.GRU(3, 4, batch_first=True).double()
    ref = ExplicitGRU(gru)
    x = torch.randn(5, 7, 3, dtype=DT)
    t = torch.randn(5, 7, 4, dtype=DT)
    kw = dict(route="primal", costate="exact")
    oa, ob = pmptrain.EMSA(gru, strict=True, **kw), pmptrain.EMSA(ref, strict=True, **kw)
    out = gru(x)[0]
    _close(out, ref(x))
    F.mse_loss(out, t).backward()
    F.mse_loss(ref(x), t).backward()
    for mine, theirs in (("ih_l0", "ih"), ("hh_l0", "hh")):
        a, b = oa.capture.peek(mine), ob.capture.peek(theirs)
        assert a.rows == b.rows == 35 and a.samples == 5  # a sample is a sequence; its 7 steps are rows
        for field in ("xx", "x_sum", "gg", "g_sq"):
            torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(gru.weight_hh_l0.grad, ref.hh.weight.grad, rtol=1e-12, atol=1e-13)


def _record_views(host):
    """Hooks recording every call (input, output gradient) of every view of ``host``."""
    rec, handles = {}, []
    for suffix, view in views_of(host):
        calls = rec.setdefault(suffix, [])

        def hook(mod, args, out, calls=calls):
            entry = [args[0].detach(), None]
            calls.append(entry)
            out.register_hook(lambda g: entry.__setitem__(1, g.detach()))

        handles.append(view.register_forward_hook(hook))
    return rec, handles


def _edited_step(model, host, loss_fn, strict=True, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Mixtral's RMSNorm (not this file's subject) falls back
        opt = pmptrain.EMSA(model, lr=LR, rho=RHO, strict=strict, route="primal", costate="exact", **kw)
    rec, handles = _record_views(host)
    loss_fn().backward()
    for h in handles:
        h.remove()
    gen = torch.Generator().manual_seed(2)
    grads = {}
    for n, p in host.named_parameters():
        p.grad.mul_(0.7).add_(1e-3 * torch.randn(p.shape, generator=gen, dtype=DT))  # clipping + noise
        grads[id(p)] = p.grad.clone()
    units = {u["unit"]: u for u in opt.rule_table()}
    before = {id(p): p.detach().clone() for p in host.parameters()}
    for u, row in units.items():
        if row["rule"] != "fallback":
            assert not opt.capture.peek(u).empty, f"{u}: no statistics (its hooks did not fire)"
    opt.step()
    assert not opt.last_step["skipped"] and (opt.last_step["fallback"] == 0 or not strict)
    return opt, rec, grads, before


RECURRENT_STEPS = [
    ("lstm-proj-bidir", lambda: nn.LSTM(3, 4, 2, proj_size=2, bidirectional=True, batch_first=True), (3, 5, 3)),
    ("gru", lambda: nn.GRU(3, 4), (5, 3, 3)),
    ("rnn-nobias", lambda: nn.RNN(3, 4, bias=False), (4, 2, 3)),
]


@pytest.mark.parametrize("name,make,shape", RECURRENT_STEPS, ids=[r[0] for r in RECURRENT_STEPS])
def test_recurrent_step_is_the_maximiser_over_every_unrolled_call(name, make, shape):
    torch.manual_seed(0)
    host = make().double()
    x = torch.randn(shape, dtype=DT, generator=torch.Generator().manual_seed(3))
    target = torch.randn(host(x)[0].shape, dtype=DT, generator=torch.Generator().manual_seed(1))
    opt, rec, grads, before = _edited_step(host, host, lambda: F.mse_loss(host(x)[0], target))
    batch = shape[0] if host.batch_first else shape[1]
    views = dict(views_of(host))

    def fn(theta, rows, extra):
        y = rows @ theta["weight"].T
        return y + theta["bias"] if "bias" in theta else y

    for suffix, calls in rec.items():
        v = views[suffix]
        names = [n for n, p in v.named_parameters()]
        theta = {n: before[id(p)] for n, p in v.named_parameters()}
        ham = {n: -grads[id(p)] for n, p in v.named_parameters()}
        rows = [(x_.reshape(-1, x_.shape[-1]), -batch * g.reshape(-1, g.shape[-1]), None) for x_, g in calls]
        assert len(calls) == (1 if suffix.startswith("ih") else shape[1 if host.batch_first else 0])
        ref = newton_maximiser(fn, theta, rows, batch, RHO, 1 / LR, ham)
        for n, p in v.named_parameters():
            torch.testing.assert_close(p.detach() - before[id(p)], ref[n], rtol=1e-8, atol=1e-11,
                                       msg=lambda s: f"{suffix}.{n}: {s}")
        assert names


def test_cell_called_in_a_loop_is_one_shared_unit_per_map():
    torch.manual_seed(0)
    cell = nn.LSTMCell(3, 4).double()
    xs = torch.randn(6, 2, 3, dtype=DT)

    def loss():
        h = c = torch.zeros(2, 4, dtype=DT)
        total = 0.0
        for t in range(6):
            h, c = cell(xs[t], (h, c))
            total = total + h.pow(2).sum()
        return total

    opt, rec, grads, before = _edited_step(cell, cell, loss)
    assert [u["unit"] for u in opt.rule_table()] == ["ih", "hh"]
    assert len(rec["ih"]) == len(rec["hh"]) == 6
    views = dict(views_of(cell))
    for suffix in ("ih", "hh"):
        v = views[suffix]
        theta = {n: before[id(p)] for n, p in v.named_parameters()}
        ham = {n: -grads[id(p)] for n, p in v.named_parameters()}
        rows = [(x_, -2 * g, None) for x_, g in rec[suffix]]
        ref = newton_maximiser(lambda th, r, e: r @ th["weight"].T + th["bias"], theta, rows, 2, RHO, 1 / LR, ham)
        for n, p in v.named_parameters():
            torch.testing.assert_close(p.detach() - before[id(p)], ref[n], rtol=1e-8, atol=1e-11)


def test_fused_kernel_runs_outside_training():
    lstm = nn.LSTM(3, 4).double()
    opt = pmptrain.EMSA(lstm)
    x = torch.randn(5, 2, 3, dtype=DT)
    lstm.eval()
    lstm(x)[0].sum().backward()  # eval: the fused kernel, nothing recorded
    assert all(opt.capture.peek(k).empty for k in opt.capture.keys())


PACKED = [
    ("lstm-proj-bidir-2layers", lambda: nn.LSTM(3, 4, 2, proj_size=2, bidirectional=True), True),
    ("gru-bidir-batch-first", lambda: nn.GRU(3, 4, bidirectional=True, batch_first=True), False),
    ("rnn-relu-nobias", lambda: nn.RNN(3, 4, nonlinearity="relu", bias=False), True),
]
LENGTHS = torch.tensor([3, 5, 1, 4])  # unsorted: the packed batch carries its permutation


def _packed_batch(host, with_hx):
    gen = torch.Generator().manual_seed(3)
    t, b = int(LENGTHS.max()), len(LENGTHS)
    x = torch.randn((b, t, 3) if host.batch_first else (t, b, 3), dtype=DT, generator=gen)
    packed = nn.utils.rnn.pack_padded_sequence(x, LENGTHS, batch_first=host.batch_first, enforce_sorted=False)
    hx = None
    if with_hx:
        dirs = 2 if host.bidirectional else 1
        h_out = host.proj_size if getattr(host, "proj_size", 0) else host.hidden_size
        h0 = torch.randn(host.num_layers * dirs, b, h_out, dtype=DT, generator=gen)
        hx = (h0, torch.randn(host.num_layers * dirs, b, host.hidden_size, dtype=DT, generator=gen)) \
            if isinstance(host, nn.LSTM) else h0
    return x, packed, hx


def _packed_loss(out, h_n):
    gen = torch.Generator().manual_seed(4)
    h = h_n[0] if isinstance(h_n, tuple) else h_n
    return (out.data * torch.randn(out.data.shape, dtype=DT, generator=gen)).sum() + h.pow(2).sum()


@pytest.mark.parametrize("name,make,with_hx", PACKED, ids=[p[0] for p in PACKED])
def test_packed_unrolled_forward_and_gradients_equal_the_fused_kernel_and_each_sequence_alone(name, make, with_hx):
    """The unrolled packed forward equals torch's packed kernel (outputs, h_n, parameter gradients),
    and both equal the padded equivalent: every sequence run alone on its own valid steps (float64)."""
    torch.manual_seed(0)
    host = make().double()
    x, packed, hx = _packed_batch(host, with_hx)
    fused = host(packed, hx)
    ours = unrolled_forward(host, packed, hx)
    _close(ours[0].data, fused[0].data)
    assert torch.equal(ours[0].batch_sizes, fused[0].batch_sizes)
    for a, b in zip(ours[1] if isinstance(ours[1], tuple) else (ours[1],),
                    fused[1] if isinstance(fused[1], tuple) else (fused[1],)):
        _close(a, b)
    grads = {}
    for tag, res in (("fused", fused), ("ours", ours)):
        host.zero_grad()
        _packed_loss(*res).backward()
        grads[tag] = {n: p.grad.clone() for n, p in host.named_parameters()}
    for n in grads["fused"]:
        torch.testing.assert_close(grads["ours"][n], grads["fused"][n], rtol=1e-10, atol=1e-12)
    # each sequence alone (no padding at all): the same outputs
    padded, _ = nn.utils.rnn.pad_packed_sequence(ours[0], batch_first=host.batch_first)
    for i, n in enumerate(LENGTHS.tolist()):
        xi = (x[i, :n] if host.batch_first else x[:n, i])
        hi = None
        if hx is not None:
            hi = tuple(h[:, i] for h in hx) if isinstance(hx, tuple) else hx[:, i]
        yi, hni = host(xi, hi)
        _close(padded[i, :n] if host.batch_first else padded[:n, i], yi)
        h_ours = ours[1][0] if isinstance(ours[1], tuple) else ours[1]
        _close(h_ours[:, i], hni[0] if isinstance(hni, tuple) else hni)


@pytest.mark.parametrize("name,make,with_hx", PACKED, ids=[p[0] for p in PACKED])
def test_packed_statistics_are_the_valid_steps_and_the_step_is_the_maximiser(name, make, with_hx):
    """Under the optimizer a packed batch is recorded on its valid steps only (rows = Σ lengths per
    map and direction, samples = sequences), and every view's step is the maximiser of its H̃ over
    those calls (float64)."""
    torch.manual_seed(0)
    host = make().double()
    x, packed, hx = _packed_batch(host, with_hx)
    opt, rec, grads, before = _edited_step(host, host, lambda: _packed_loss(*host(packed, hx)),
                                           max_step=None)  # the maximiser itself, not its trust-region cut
    batch, total = len(LENGTHS), int(LENGTHS.sum())
    views = dict(views_of(host))

    def fn(theta, rows, extra):
        y = rows @ theta["weight"].T
        return y + theta["bias"] if "bias" in theta else y

    for suffix, calls in rec.items():
        assert sum(c[0].reshape(-1, c[0].shape[-1]).shape[0] for c in calls) == total  # valid steps only
        v = views[suffix]
        theta = {n: before[id(p)] for n, p in v.named_parameters()}
        ham = {n: -grads[id(p)] for n, p in v.named_parameters()}
        rows = [(x_.reshape(-1, x_.shape[-1]), -batch * g.reshape(-1, g.shape[-1]), None) for x_, g in calls]
        ref = newton_maximiser(fn, theta, rows, batch, RHO, 1 / LR, ham)
        for n, p in v.named_parameters():
            torch.testing.assert_close(p.detach() - before[id(p)], ref[n], rtol=1e-8, atol=1e-11,
                                       msg=lambda s: f"{suffix}.{n}: {s}")
    host.train()
    opt.zero_grad()
    _packed_loss(*host(packed, hx)).backward()
    for suffix in views:
        st = opt.capture.peek(f"{suffix}")
        assert st.samples == batch and st.rows == total, (suffix, st.samples, st.rows)


# ------------------------------------------------------------------------------------- PReLU


@pytest.mark.parametrize("prelu,shape", [(nn.PReLU(), (4, 3, 5)), (nn.PReLU(3, init=0.1), (4, 3, 2, 2)),
                                         (nn.PReLU(1), (7,))])
def test_prelu_step_is_the_maximiser(prelu, shape):
    prelu = prelu.double()
    x = torch.randn(shape, dtype=DT, generator=torch.Generator().manual_seed(5))
    rec, grads, change, before = one_step(prelu, x)
    c = prelu.weight.numel()
    xhat = rec["x"].clamp(max=0)

    def to_rows(t):
        return t.reshape(-1, 1) if c == 1 else t.movedim(1, -1).reshape(-1, c)

    rows = to_rows(xhat)
    batch = shape[0] if len(shape) >= 2 else 1
    ref = newton_maximiser(lambda th, r, e: r * th["weight"], before, [(rows, -batch * to_rows(rec["g"]), None)],
                           batch, RHO, 1 / LR, {"weight": -grads["weight"]})
    torch.testing.assert_close(change["weight"], ref["weight"], rtol=1e-8, atol=1e-11)


# ------------------------------------------------------------------------------------ Mixtral


def _tiny_mixtral():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=12, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                     num_experts_per_tok=2, experts_implementation="eager")
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(cfg).double()


def test_mixtral_experts_and_router_unrolled_equal_their_forward():
    model = _tiny_mixtral()
    moe = model.model.layers[0].mlp
    h = torch.randn(9, 16, dtype=DT)
    logits, w, idx = moe.gate(h)
    _close(unrolled_forward(moe.gate, h), (logits, w, idx))
    _close(unrolled_forward(moe.experts, h, idx, w), moe.experts(h, idx, w))


def test_mixtral_experts_step_is_the_maximiser_per_expert():
    model = _tiny_mixtral()
    experts = model.model.layers[0].mlp.experts
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    opt, rec, grads, before = _edited_step(model, experts, lambda: model(ids, labels=ids).loss, strict=False)
    table = {r["unit"]: r["rule"] for r in opt.rule_table()}
    assert table["model.layers.0.mlp.experts.gate_up_proj"] == "emsa-grouped"
    assert table["model.layers.0.mlp.gate"] == "emsa"
    for suffix, v in views_of(experts):
        e, m, n = v.weight.shape
        (xb, g), = rec[suffix]
        batch = xb.shape[0]  # every routed row is a sample
        ref = newton_maximiser(_block_linear(e, e * m, e * n), {"weight": before[id(v.weight)]},
                               [(xb, -batch * g, None)], batch, RHO, 1 / LR, {"weight": -grads[id(v.weight)]})
        torch.testing.assert_close(v.weight.detach() - before[id(v.weight)], ref["weight"], rtol=1e-8, atol=1e-11)


# ------------------------------------------------------------------------- transposed convolutions

CONVT = [
    ("convt1d-stride-outpad", lambda: nn.ConvTranspose1d(3, 2, 4, stride=3, padding=1, output_padding=2), (2, 3, 5)),
    ("convt2d-dilation", lambda: nn.ConvTranspose2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
     (2, 2, 4, 3)),
    ("convt3d-nobias", lambda: nn.ConvTranspose3d(2, 2, 2, stride=2, bias=False), (2, 2, 2, 3, 2)),
]


@pytest.mark.parametrize("name,make,shape", CONVT, ids=[c[0] for c in CONVT])
def test_conv_transpose_views_reproduce_the_forward_and_rows_are_adjoint(name, make, shape):
    torch.manual_seed(0)
    m = make().double()
    x = torch.randn(shape, dtype=DT)
    _close(unrolled_forward(m, x), m(x))
    if name.startswith("convt2d"):  # output_size picks the output padding
        size = [m(x).shape[2] + 1, m(x).shape[3]]  # stride 2 along the first dimension only
        _close(unrolled_forward(m, x, size), m(x, size))
    view = dict(views_of(m))[""]
    ad = view.view_adapter
    y = view(x, m.output_padding)  # without the bias
    g = torch.randn(y.shape, dtype=DT)
    z = ad.input_rows(view, x) @ m.weight.reshape(m.weight.shape[0], -1)  # z_i = Mᵀ x_i per input position
    # the costate rows are the adjoint of col2im: Σ_i ⟨unfold(g)_i, z_i⟩ = ⟨g, y⟩
    torch.testing.assert_close((ad.output_rows(view, g) * z).sum(), (g * y).sum(), rtol=1e-12, atol=1e-12)
    assert ad.output_rows(view, g).shape[0] == z.shape[0]


@pytest.mark.parametrize("name,make,shape", CONVT, ids=[c[0] for c in CONVT])
def test_conv_transpose_step_is_the_maximiser_of_the_adjoint_row_form(name, make, shape):
    torch.manual_seed(0)
    host = make().double()
    x = torch.randn(shape, dtype=DT, generator=torch.Generator().manual_seed(3))
    target = torch.randn(host(x).shape, dtype=DT, generator=torch.Generator().manual_seed(1))
    opt, rec, grads, before = _edited_step(host, host, lambda: F.mse_loss(host(x), target))
    batch = shape[0]
    views = dict(views_of(host))
    wv = views[""]
    (xin, gout), = rec[""]
    rows = wv.view_adapter.input_rows(wv, xin)
    p_rows = -batch * wv.view_adapter.output_rows(wv, gout)
    w = host.weight
    ref = newton_maximiser(lambda th, r, e: r @ th["weight"].reshape(w.shape[0], -1), {"weight": before[id(w)]},
                           [(rows, p_rows, None)], batch, RHO, 1 / LR, {"weight": -grads[id(w)]})
    torch.testing.assert_close(w.detach() - before[id(w)], ref["weight"], rtol=1e-8, atol=1e-11)
    if host.bias is not None:  # its own bias-only unit over the output positions
        (s, gb), = rec["bias"]
        s_rows = s.movedim(1, -1).reshape(-1, s.shape[1])
        b = host.bias
        ref = newton_maximiser(lambda th, r, e: r + th["bias"], {"bias": before[id(b)]},
                               [(s_rows, -batch * gb.movedim(1, -1).reshape(-1, s.shape[1]), None)], batch, RHO,
                               1 / LR, {"bias": -grads[id(b)]})
        torch.testing.assert_close(b.detach() - before[id(b)], ref["bias"], rtol=1e-8, atol=1e-11)


GROUPED_CONVT = [
    ("convt1d-groups2-stride", lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
     (3, 4, 5)),
    ("convt2d-depthwise-dilation", lambda: nn.ConvTranspose2d(3, 3, (2, 3), stride=(1, 2), dilation=(2, 1), groups=3),
     (2, 3, 4, 3)),
    ("convt3d-groups2-multiplier-nobias", lambda: nn.ConvTranspose3d(2, 4, 2, stride=2, groups=2, bias=False),
     (2, 2, 2, 3, 2)),
]


@pytest.mark.parametrize("name,make,shape", GROUPED_CONVT, ids=[c[0] for c in GROUPED_CONVT])
def test_grouped_conv_transpose_step_is_the_maximiser_of_its_block_diagonal_row_form(name, make, shape):
    """``groups = g``: ``W = Mᵀ`` is block-diagonal (``M_j`` = the weight rows of group j's input
    channels), so the rows of the adjoint form reproduce the forward through ``block_diag(M_j)``
    and the step is the maximiser of H̃ over that block-diagonal map (float64)."""
    torch.manual_seed(0)
    host = make().double()
    x = torch.randn(shape, dtype=DT, generator=torch.Generator().manual_seed(3))
    _close(unrolled_forward(host, x), host(x))
    g, w = host.groups, host.weight
    wv = dict(views_of(host))[""]
    ad = wv.view_adapter
    assert ad.kind == "grouped" and ad.groups(wv) == g

    def fn(th, r, e):
        blocks = th["weight"].reshape(g, w.shape[0] // g, -1)
        return r @ torch.block_diag(*blocks)

    y = wv(x, host.output_padding)
    gy = torch.randn(y.shape, dtype=DT)
    z = fn({"weight": w.detach()}, ad.input_rows(wv, x), None)  # z_i = block_diag(M_j)ᵀ x_i per input position
    torch.testing.assert_close((ad.output_rows(wv, gy) * z).sum(), (gy * y).sum(), rtol=1e-12, atol=1e-12)
    target = torch.randn(host(x).shape, dtype=DT, generator=torch.Generator().manual_seed(1))
    opt, rec, grads, before = _edited_step(host, host, lambda: F.mse_loss(host(x), target))
    assert {u["unit"]: u["rule"] for u in opt.rule_table()}[""] == "emsa-grouped"
    (xin, gout), = rec[""]
    batch = shape[0]
    ref = newton_maximiser(fn, {"weight": before[id(w)]}, [(ad.input_rows(wv, xin), -batch * ad.output_rows(wv, gout),
                                                              None)], batch, RHO, 1 / LR, {"weight": -grads[id(w)]})
    torch.testing.assert_close(w.detach() - before[id(w)], ref["weight"], rtol=1e-8, atol=1e-11)


# ------------------------------------------------------------------------------------ Bilinear


def test_bilinear_is_a_linear_on_the_outer_product_and_its_step_the_maximiser():
    torch.manual_seed(0)
    bil = nn.Bilinear(3, 2, 4).double()
    x1 = torch.randn(5, 3, dtype=DT, generator=torch.Generator().manual_seed(3))
    x2 = torch.randn(5, 2, dtype=DT, generator=torch.Generator().manual_seed(4))
    _close(unrolled_forward(bil, x1, x2), bil(x1, x2))
    target = torch.randn(5, 4, dtype=DT)
    opt, rec, grads, before = _edited_step(bil, bil, lambda: F.mse_loss(bil(x1, x2), target))
    (z, g), = rec[""]
    theta = {"weight": before[id(bil.weight)], "bias": before[id(bil.bias)]}
    ref = newton_maximiser(lambda th, r, e: r @ th["weight"].flatten(1).T + th["bias"], theta, [(z, -5 * g, None)],
                           5, RHO, 1 / LR, {"weight": -grads[id(bil.weight)], "bias": -grads[id(bil.bias)]})
    torch.testing.assert_close(bil.weight.detach() - theta["weight"], ref["weight"], rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(bil.bias.detach() - theta["bias"], ref["bias"], rtol=1e-8, atol=1e-11)


# -------------------------------------------------------------------------------- EmbeddingBag

BAGS = [("sum-psw-offsets", dict(mode="sum"), True), ("mean-2d-padding", dict(mode="mean", padding_idx=2), False)]


@pytest.mark.parametrize("name,kw,flat", BAGS, ids=[b[0] for b in BAGS])
def test_embedding_bag_is_a_linear_on_bag_counts_and_its_step_the_maximiser(name, kw, flat):
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(7, 3, **kw).double()
    if flat:
        args = (torch.tensor([1, 2, 4, 5, 4, 3, 2, 6]), torch.tensor([0, 2, 2, 5]), torch.rand(8, dtype=DT))
    else:
        args = (torch.tensor([[1, 2, 2, 5], [0, 0, 6, 1], [2, 2, 2, 2]]),)
    _close(unrolled_forward(bag, *args), bag(*args))
    target = torch.randn(bag(*args).shape, dtype=DT)
    opt, rec, grads, before = _edited_step(bag, bag, lambda: F.mse_loss(bag(*args), target))
    view = dict(views_of(bag))[""]
    (compact, g), = rec[""]
    c = view.view_adapter.input_rows(view, compact)  # the bags' weighted counts
    w0 = before[id(bag.weight)]
    y0 = F.embedding_bag(args[0], w0, args[1] if flat else None, mode=kw["mode"],
                         per_sample_weights=args[2] if flat else None, padding_idx=kw.get("padding_idx"))
    torch.testing.assert_close(c @ w0, y0, rtol=1e-12, atol=1e-12)  # y_b = Eᵀ c_b
    b = c.shape[0]
    ref = newton_maximiser(lambda th, r, e: r @ th["weight"], {"weight": before[id(bag.weight)]}, [(c, -b * g, None)],
                           b, RHO, 1 / LR, {"weight": -grads[id(bag.weight)]})
    torch.testing.assert_close(bag.weight.detach() - before[id(bag.weight)], ref["weight"], rtol=1e-8, atol=1e-11)


def test_embedding_bag_max_mode_falls_back_with_its_name():
    with pytest.warns(UserWarning, match="'0' \\(EmbeddingBag\\)"):
        pmptrain.EMSA(nn.Sequential(nn.EmbeddingBag(5, 2, mode="max")))


def test_under_the_optimizer_the_layer_returns_the_fused_output_and_copies_run_the_kernel():
    import copy

    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, 2, batch_first=True).double()
    seen = []
    lstm.register_forward_hook(lambda m, a, out: seen.append(out[0].grad_fn))  # the user's own hook
    opt = pmptrain.EMSA(lstm)
    twin = copy.deepcopy(lstm)  # hooks are inert in copies: the fused kernel
    x = torch.randn(2, 5, 3, dtype=DT)
    out, (h, c) = lstm(x)
    ref, (h2, c2) = twin(x)
    _close((out, h, c), (ref, h2, c2))
    assert "Stack" in type(out.grad_fn).__name__ or "Transpose" in type(out.grad_fn).__name__  # unrolled
    assert seen[0] is out.grad_fn  # the user's hook saw the output the model returns
    out.sum().backward()
    assert not opt.capture.peek("ih_l0").empty


def test_an_unrolled_forward_that_differs_from_the_module_raises_at_the_first_call(monkeypatch):
    import pmptrain.views as views_mod

    def wrong(host, views, args, kwargs):
        out, h = views_mod._rnn_forward(host, views, args, kwargs)
        return out * 1.001, h

    monkeypatch.setitem(views_mod._HOSTS, nn.RNN, (views_mod._rnn_views, wrong))
    rnn = nn.RNN(3, 4).double()
    opt = pmptrain.EMSA(rnn)  # noqa: F841 (kept alive: its hooks drive the views)
    with pytest.raises(RuntimeError, match="unrolled forward of RNN differs .* exclude"):
        rnn(torch.randn(5, 2, 3, dtype=DT))
