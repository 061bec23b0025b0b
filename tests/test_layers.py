"""Closed forms of every standard layer against a numerical maximiser of H̃ (float64).

For each layer kind the optimizer's step (with a user-edited gradient) must equal the maximiser of
the augmented Hamiltonian written from its definition (``pmptrain.hamiltonian.augmented_hamiltonian``:
the Hamiltonian term, both feasibility penalties by double backward, the proximal term), found by
one Newton step — the objective is exactly quadratic in the parameters. The controlled function is
the layer in row form: the im2col rows of a convolution (block-diagonal for groups), the normalised
state ``x̂`` of a normalisation layer (computed here independently of the adapters).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pmptrain
import pmptrain.modules as modules_mod
from helpers import ExpScale
from pmptrain.hamiltonian import augmented_hamiltonian
from pmptrain.modules import (
    LayerNormAdapter,
    RMSNormAdapter,
    TransposedLinearAdapter,
    adapter_for,
    register_module_type,
)

DT = torch.float64
RHO, LR = 1.3, 0.6


def newton_maximiser(fn, theta_k, calls, batch, rho, delta, ham_grad):
    """Maximiser of ``augmented_hamiltonian`` + the linear correction that makes its first-order
    term ``⟨ham_grad, θ − θ_k⟩``, by one Newton step (dense autograd Hessian)."""
    names = list(theta_k)
    shapes = [theta_k[k].shape for k in names]
    sizes = [theta_k[k].numel() for k in names]
    prepared = []
    for x, p, extra in calls:
        xr = x.detach().requires_grad_(True)
        y = fn(theta_k, xr, extra)
        gx = torch.autograd.grad((p * y).sum(), xr)[0].detach()
        prepared.append((x, p, extra, y.detach(), gx))
    th = {k: v.detach().clone().requires_grad_(True) for k, v in theta_k.items()}
    h = sum((p * fn(th, x, e)).sum() for x, p, e in calls) / batch
    grads = torch.autograd.grad(h, [th[k] for k in names])
    correction = {k: ham_grad[k] - g for k, g in zip(names, grads)}

    def unflat(t):
        out, i = {}, 0
        for k, shp, n in zip(names, shapes, sizes):
            out[k] = theta_k[k] + t[i:i + n].view(shp)
            i += n
        return out

    def neg(t):
        return -augmented_hamiltonian(fn, unflat(t), theta_k, prepared, batch, rho, delta, correction)

    t0 = torch.zeros(sum(sizes), dtype=DT)
    hess = torch.autograd.functional.hessian(neg, t0)
    grad = torch.autograd.functional.jacobian(neg, t0)
    step = torch.linalg.solve(hess, -grad)
    return {k: v - theta_k[k] for k, v in unflat(step).items()}


def one_step(module, x, extra_kw=None):
    """One EMSA step on ``module`` (the whole model) with an edited gradient; returns the recorded
    input, output gradient, the edited gradients and the parameter changes."""
    torch.manual_seed(0)
    model = nn.Sequential(module)
    opt = pmptrain.EMSA(model, lr=LR, rho=RHO, strict=True, **(extra_kw or {}))
    rec = {}

    def hook(mod, args, out):
        rec["x"] = args[0].detach()
        out.register_hook(lambda g: rec.__setitem__("g", g.detach()))

    h = module.register_forward_hook(hook)
    out = model(x)
    target = torch.randn(out.shape, dtype=DT, generator=torch.Generator().manual_seed(1))
    F.mse_loss(out, target).backward()
    h.remove()
    g = torch.Generator().manual_seed(2)
    grads = {}
    for n, p in module.named_parameters():
        p.grad.mul_(0.7).add_(1e-3 * torch.randn(p.shape, generator=g, dtype=DT))  # clipping + noise
        grads[n] = p.grad.clone()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    opt.step()
    assert not opt.last_step["skipped"] and opt.last_step["fallback"] == 0
    after = {n: p.detach() - before[n] for n, p in module.named_parameters()}
    return rec, grads, after, before


# --------------------------------------------------------------------------- convolutions


def _block_linear(groups, m, n):
    def fn(theta, rows, extra):
        w = theta["weight"].reshape(groups, m // groups, n // groups)
        xs = rows.reshape(rows.shape[0], groups, n // groups)
        y = torch.einsum("ngi,goi->ngo", xs, w).reshape(rows.shape[0], m)
        return y + theta["bias"] if "bias" in theta else y
    return fn


CONVS = [
    ("conv3d", nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(1, 1, 2)), (2, 2, 4, 5, 6)),
    ("conv3d-same-reflect", nn.Conv3d(2, 2, 3, padding="same", padding_mode="reflect", bias=False), (2, 2, 4, 4, 4)),
    ("grouped-conv2d", nn.Conv2d(4, 6, 3, padding=1, groups=2), (3, 4, 5, 5)),
    ("depthwise-conv2d", nn.Conv2d(3, 3, 3, stride=2, padding=1, groups=3, bias=False), (4, 3, 6, 6)),
    ("depthwise-multiplier-conv1d", nn.Conv1d(2, 4, 5, padding=2, groups=2, padding_mode="circular"), (3, 2, 9)),
    ("grouped-conv3d", nn.Conv3d(4, 4, 2, groups=2), (2, 4, 3, 3, 3)),
]


@pytest.mark.parametrize("name,conv,shape", CONVS, ids=[c[0] for c in CONVS])
def test_convolution_rows_reproduce_the_forward(name, conv, shape):
    conv = conv.double()
    x = torch.randn(shape, dtype=DT)
    ad = adapter_for(conv)
    rows = ad.input_rows(conv, x)
    m, n = ad.weight_shape_2d(conv)
    theta = dict(conv.named_parameters())
    y_rows = _block_linear(conv.groups, m, n)(theta, rows, None)
    torch.testing.assert_close(y_rows, ad.output_rows(conv, conv(x)))
    assert ad.kind == ("grouped" if conv.groups > 1 else "matrix")


@pytest.mark.parametrize("conv,shape", [
    (nn.Conv2d(3, 4, 3, padding=1), (5, 3, 7, 6)),
    (nn.Conv2d(2, 3, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(2, 0)), (2, 2, 9, 8)),
    (nn.Conv2d(4, 6, 1, stride=2, groups=2), (3, 4, 5, 5)),
])
def test_convolution_rows_are_bit_identical_to_unfold(conv, shape):
    x = torch.randn(shape)
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    assert torch.equal(adapter_for(conv).input_rows(conv, x), cols.transpose(1, 2).reshape(-1, cols.shape[1]))


@pytest.mark.parametrize("costate", ["exact", "isotropic"])
@pytest.mark.parametrize("name,conv,shape", CONVS, ids=[c[0] for c in CONVS])
def test_convolution_step_is_the_maximiser_of_the_row_form(name, conv, shape, costate):
    conv = conv.double()
    x = torch.randn(shape, dtype=DT, generator=torch.Generator().manual_seed(3))
    rec, grads, change, before = one_step(conv, x, {"costate": costate, "route": "primal"})
    ad = adapter_for(conv)
    m, n = ad.weight_shape_2d(conv)
    batch = shape[0]
    rows = ad.input_rows(conv, rec["x"])
    p_rows = -batch * ad.output_rows(conv, rec["g"])
    fn = _block_linear(conv.groups, m, n)
    ham = {k: -grads[k] for k in before}
    if costate == "exact":
        ref = newton_maximiser(fn, before, [(rows, p_rows, None)], batch, RHO, 1 / LR, ham)
    else:  # surrogate costate rows whose C_p is tr(C_p)/m·I (per group for a grouped conv)
        g = conv.groups
        tau = p_rows.reshape(p_rows.shape[0], g, m // g).pow(2).sum((0, 2)) / (batch * (m // g))
        p_iso = torch.block_diag(*[torch.eye(m // g, dtype=DT) * torch.sqrt(tau[j] * batch) for j in range(g)])
        ref = _newton_split(fn, before, rows, p_iso, batch, ham, m, n, g)
    for k in before:
        torch.testing.assert_close(change[k], ref[k], rtol=1e-8, atol=1e-11, msg=lambda s: f"{k}: {s}")


def _newton_split(fn, theta_k, rows, p_iso, batch, ham, m, n, groups):
    """Reference for the isotropic costate: H̃ with the state penalty of the rows and the costate
    penalty ``(ρ/2B)‖ΔWᵀ P‖²`` of surrogate costate rows ``P`` whose ``C_p`` is isotropic per group."""
    names = list(theta_k)
    sizes = [theta_k[k].numel() for k in names]

    def split(t):
        d, i = {}, 0
        for k, sz in zip(names, sizes):
            d[k] = t[i:i + sz].view(theta_k[k].shape)
            i += sz
        return d

    def neg(t):
        d = split(t)
        gain = sum((ham[k] * d[k]).sum() for k in names)
        state = fn(d, rows, None).pow(2).sum() / batch
        dw = torch.block_diag(*d["weight"].reshape(groups, m // groups, n // groups))
        cost = (p_iso @ dw).pow(2).sum() / batch
        prox = sum(v.pow(2).sum() for v in d.values())
        return -(gain - 0.5 * RHO * state - 0.5 * RHO * cost - 0.5 / LR * prox)

    t0 = torch.zeros(sum(sizes), dtype=DT)
    return split(torch.linalg.solve(torch.autograd.functional.hessian(neg, t0),
                                    -torch.autograd.functional.jacobian(neg, t0)))


# --------------------------------------------------------------------------- normalisation


def _rms(x, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


NORMS = [
    ("layernorm", nn.LayerNorm(6), (5, 3, 6), lambda x: F.layer_norm(x, (6,)), -1),
    ("layernorm-2d-shape", nn.LayerNorm((2, 3)), (4, 2, 3), lambda x: F.layer_norm(x, (2, 3)), None),
    ("layernorm-no-bias", nn.LayerNorm(5, bias=False), (6, 5), lambda x: F.layer_norm(x, (5,)), -1),
    ("rmsnorm", nn.RMSNorm(6, eps=1e-6), (4, 3, 6), lambda x: _rms(x, 1e-6), -1),
    ("batchnorm1d", nn.BatchNorm1d(4), (8, 4), lambda x: F.batch_norm(x, None, None, training=True), 1),
    ("batchnorm1d-seq", nn.BatchNorm1d(3), (5, 3, 4), lambda x: F.batch_norm(x, None, None, training=True), 1),
    ("batchnorm2d", nn.BatchNorm2d(3), (4, 3, 3, 3), lambda x: F.batch_norm(x, None, None, training=True), 1),
    ("batchnorm3d", nn.BatchNorm3d(2), (3, 2, 2, 3, 2), lambda x: F.batch_norm(x, None, None, training=True), 1),
    ("groupnorm", nn.GroupNorm(2, 4), (3, 4, 5), lambda x: F.group_norm(x, 2), 1),
    ("instancenorm2d", nn.InstanceNorm2d(3, affine=True), (2, 3, 4, 4), lambda x: F.instance_norm(x), 1),
]


def _channel_rows(t, channel_dim, cshape):
    if channel_dim is None:  # trailing normalized shape
        return t.reshape(-1, math.prod(cshape))
    if channel_dim == -1:
        return t.reshape(-1, t.shape[-1])
    return t.movedim(1, -1).reshape(-1, t.shape[1])


@pytest.mark.parametrize("name,norm,shape,normalize,cdim", NORMS, ids=[n[0] for n in NORMS])
def test_normalisation_affine_step_is_the_maximiser(name, norm, shape, normalize, cdim):
    norm = norm.double()
    with torch.no_grad():  # non-trivial γ, β
        for p in norm.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=DT, generator=torch.Generator().manual_seed(4)))
    x = 2.0 * torch.randn(shape, dtype=DT, generator=torch.Generator().manual_seed(5)) + 0.5
    rec, grads, change, before = one_step(norm, x)
    cshape = tuple(before["weight"].shape)
    xhat = normalize(rec["x"])
    ad = adapter_for(norm)
    rows = _channel_rows(xhat, cdim, cshape)
    torch.testing.assert_close(ad.input_rows(norm, rec["x"]), rows)  # the adapter's x̂ (independent)
    # the adapter's rows reproduce the forward: y = γ x̂ + β (with the parameters after the step)
    y_rows = _channel_rows(norm(rec["x"]), cdim, cshape)
    gamma = norm.weight.detach().reshape(-1)
    beta = norm.bias.detach().reshape(-1) if getattr(norm, "bias", None) is not None else 0.0
    torch.testing.assert_close(y_rows, rows * gamma + beta)
    batch = ad.batch_size(norm, rec["x"])
    p = -batch * _channel_rows(rec["g"], cdim, cshape)

    def fn(theta, r, extra):
        y = r * theta["weight"].reshape(-1)
        return y + theta["bias"].reshape(-1) if "bias" in theta else y

    ham = {k: -grads[k] for k in before}
    ref = newton_maximiser(fn, before, [(rows, p, None)], batch, RHO, 1 / LR, ham)
    for k in before:
        torch.testing.assert_close(change[k], ref[k], rtol=1e-8, atol=1e-11, msg=lambda s: f"{k}: {s}")


def test_token_as_sample_for_row_wise_layers_and_batch_entry_for_batch_norm():
    x = torch.randn(4, 5, 6)
    assert adapter_for(nn.Linear(6, 2)).batch_size(nn.Linear(6, 2), x) == 20
    assert adapter_for(nn.LayerNorm(6)).batch_size(nn.LayerNorm(6), x) == 20
    emb = nn.Embedding(9, 3)
    assert adapter_for(emb).batch_size(emb, torch.zeros(4, 5, dtype=torch.long)) == 20
    assert adapter_for(nn.BatchNorm1d(5)).batch_size(nn.BatchNorm1d(5), x) == 4
    assert adapter_for(nn.Conv1d(5, 2, 3)).batch_size(nn.Conv1d(5, 2, 3), x) == 4


def test_the_step_does_not_depend_on_how_tokens_are_split_into_sequences():
    """Row-wise layers: a fixed set of tokens gives the same update as 2 × 16 or 8 × 4 (or 32 × 1)."""
    tokens = torch.randn(32, 6, dtype=DT, generator=torch.Generator().manual_seed(0))
    target = torch.randn(32, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    results = []
    for b, t in ((2, 16), (8, 4), (32, 1)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).double()
        opt = pmptrain.EMSA(model)
        F.mse_loss(model(tokens.reshape(b, t, 6)), target.reshape(b, t, 3)).backward()
        opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for other in results[1:]:
        for a, c in zip(results[0], other):
            torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- Conv1D and registration


class Conv1D(nn.Module):
    """GPT-2's transposed Linear (as in transformers.pytorch_utils), defined here."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    """Registrations are process-wide: each test starts from the built-in table."""
    monkeypatch.setattr(modules_mod, "_REGISTERED", dict(modules_mod._REGISTERED))


def test_transposed_linear_equals_the_linear_it_transposes():
    register_module_type(Conv1D, TransposedLinearAdapter())
    torch.manual_seed(0)
    c1d = Conv1D(4, 5).double()
    lin = nn.Linear(5, 4).double()
    with torch.no_grad():
        lin.weight.copy_(c1d.weight.T)
        lin.bias.copy_(c1d.bias)
    x = torch.randn(3, 7, 5, dtype=DT)
    t = torch.randn(3, 7, 4, dtype=DT)
    oa, ob = pmptrain.EMSA(c1d, strict=True), pmptrain.EMSA(lin, strict=True)
    F.mse_loss(c1d(x), t).backward()
    F.mse_loss(lin(x), t).backward()
    oa.step()
    ob.step()
    torch.testing.assert_close(c1d.weight.T, lin.weight, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c1d.bias, lin.bias, rtol=1e-10, atol=1e-12)


def test_transformers_conv1d_is_controlled():
    transformers = pytest.importorskip("transformers")
    c = transformers.pytorch_utils.Conv1D(4, 5)
    assert adapter_for(c).transposed and adapter_for(c).weight_shape_2d(c) == (4, 5)


class NanoLayerNorm(nn.Module):
    """nanoGPT's LayerNorm with an optional bias (calls F.layer_norm with eps 1e-5)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class HFStyleRMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, x):  # HF's upcast of half precision to float32 (float64 stays float64)
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        v = h.pow(2).mean(-1, keepdim=True)
        return self.weight * (h * torch.rsqrt(v + self.variance_epsilon)).to(x.dtype)


@pytest.mark.parametrize("custom,builtin,adapter", [
    (lambda: NanoLayerNorm(6, True), lambda: nn.LayerNorm(6), LayerNormAdapter(eps_attr=None, default_eps=1e-5)),
    (lambda: NanoLayerNorm(6, False), lambda: nn.LayerNorm(6, bias=False), LayerNormAdapter(eps_attr=None)),
    (lambda: HFStyleRMSNorm(6), lambda: nn.RMSNorm(6, eps=1e-6), RMSNormAdapter("variance_epsilon")),
])
def test_registered_module_types_are_controlled_like_their_builtin_twins(custom, builtin, adapter):
    mod = custom().double()
    probed = adapter_for(mod)  # recognised by what it computes (pmptrain.probe), before any registration
    assert probed is not None and probed.kind == "channel"
    pmptrain.register_module_type(type(mod), adapter)  # the public spelling
    try:
        twin = builtin().double()
        x = torch.randn(4, 3, 6, dtype=DT)
        t = torch.randn(4, 3, 6, dtype=DT)
        oa, ob = pmptrain.EMSA(nn.Sequential(mod), strict=True), pmptrain.EMSA(nn.Sequential(twin), strict=True)
        assert oa.rule_table()[0]["rule"] == "emsa-channel"
        for m, o in ((mod, oa), (twin, ob)):
            F.mse_loss(m(x), t).backward()
            o.step()
        for (n, p), q in zip(mod.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=lambda s: f"{n}: {s}")
        oa.detach()
        assert adapter_for(mod) is adapter
    finally:
        pmptrain.unregister_module_type(type(mod))
    assert adapter_for(mod) is not adapter  # unregistered: the probe's adapter again


def test_register_module_type_validates():
    with pytest.raises(TypeError, match="cls"):
        register_module_type(int, LayerNormAdapter())
    with pytest.raises(TypeError, match="adapter"):
        register_module_type(NanoLayerNorm, object())


# --------------------------------------------------------------------------- strict=True


@pytest.mark.parametrize("name,shape,classes,kw", [
    ("resnet", (3, 32, 32), 10, {"width": 8}),     # ResNet-18 topology, narrow for speed
    ("resnet", (1, 28, 28), 10, {"width": 8}),
    ("mobilenet", (3, 32, 32), 10, {}),             # 11 depthwise convolutions, SE, hardswish
    ("gpt", (16,), 64, {"n_layer": 2, "n_embd": 32}),  # nanoGPT-style, tied embeddings
])
def test_strict_accepts_standard_architectures(name, shape, classes, kw):
    from pmptrain.bench.models import build_model

    torch.manual_seed(0)
    model = build_model(name, shape, classes, **kw)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = pmptrain.EMSA(model, strict=True)
    rules = {r["rule"] for r in opt.rule_table()}
    assert "fallback" not in rules
    if name == "mobilenet":
        assert sum(r["rule"] == "emsa-grouped" for r in opt.rule_table()) == 11
    if name == "gpt":
        assert any(r["unit"] == "wte+lm_head" for r in opt.rule_table())
        x = torch.randint(0, classes, (3, shape[0]))
        loss = F.cross_entropy(model(x).reshape(-1, classes), torch.randint(0, classes, (3 * shape[0],)))
    else:
        loss = F.cross_entropy(model(torch.randn(3, *shape)), torch.tensor([0, 1, 2]))
    before = [p.detach().clone() for p in model.parameters()]
    loss.backward()
    opt.step()
    assert not opt.last_step["skipped"] and opt.last_step["fallback"] == 0
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_strict_raises_for_any_fallback_whatever_the_reason():
    frozen = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    frozen[0].weight.requires_grad_(False)  # its bias would take the fallback
    with pytest.raises(ValueError, match="frozen.*strict=True"):
        pmptrain.EMSA(frozen, strict=True)
    with pytest.warns(UserWarning, match="frozen"):
        pmptrain.EMSA(frozen)
    prelu = nn.Sequential(nn.Linear(3, 3), ExpScale())
    with pytest.raises(ValueError, match="ExpScale.*strict=True"):
        pmptrain.EMSA(prelu, strict=True)
    pmptrain.EMSA(prelu, strict=True, exclude=["1"])  # an explicit choice
    disc = pmptrain.discretize_(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)), keep=())
    with pytest.raises(ValueError, match="strict=True: parameter '0.bias' would take the fallback"):
        pmptrain.DiscreteMSA(disc, strict=True)  # biases and BatchNorm: DiscreteMSA's fallback


def test_rule_table_lists_every_unit_and_prints_as_a_table():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), ExpScale(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="ExpScale"):
        opt = pmptrain.EMSA(model)
    table = opt.rule_table()
    assert [(r["unit"], r["rule"], r["params"]) for r in table] == [
        ("0", "emsa", ["0.weight", "0.bias"]), ("1", "emsa-channel", ["1.weight", "1.bias"]),
        ("3", "emsa", ["3.weight", "3.bias"]), ("2.weight", "fallback", ["2.weight"])]
    note, *lines = str(table).splitlines()  # the first line: the setting EMSA(model) chose, and why
    assert note == table.note and note.startswith("setting: classic (auto: no token embedding, attention or convolution module")
    assert lines[0].split() == ["unit", "rule", "params", "description"] and set(lines[1]) <= {"-", " "}
    assert lines[3].startswith("1 ") and "emsa-channel" in lines[3] and "1.weight, 1.bias" in lines[3]
    assert lines[5].split()[:3] == ["2.weight", "fallback", "2.weight"] and len(lines) == 6
