"""Models the project did not write: claimed modules that cannot go silent, nn.MultiheadAttention,
tied weights with one truth, normalisations recognised by what they compute, karpathy's nanoGPT."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pmptrain

DT = torch.float64


# ------------------------------------------------------------------ no claimed module goes silent


class FusedMixer(nn.Module):
    """HF Mamba's pattern: a depthwise Conv1d child whose weight the parent reads through a
    functional kernel (``F.conv1d`` here, ``causal_conv1d_fn`` there) instead of calling it."""

    def __init__(self, d=6):
        super().__init__()
        self.in_proj = nn.Linear(d, d)
        self.conv1d = nn.Conv1d(d, d, 3, groups=d, padding=2)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x):  # [B, T, d]
        h = self.in_proj(x).transpose(1, 2)
        h = F.conv1d(h, self.conv1d.weight, self.conv1d.bias, padding=2, groups=h.shape[1])[..., :x.shape[1]]
        return self.out_proj(F.silu(h).transpose(1, 2))


class ReadsChildWeight(nn.Module):
    """A hand-built parent that uses ``fc.weight`` directly (and calls ``head``)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.tanh(F.linear(x, self.fc.weight, self.fc.bias)))


@pytest.mark.parametrize("build,silent,x", [
    (lambda: nn.Sequential(FusedMixer()), "0.conv1d", lambda: torch.randn(2, 5, 6)),
    (ReadsChildWeight, "fc", lambda: torch.randn(7, 4)),
])
def test_a_silent_module_falls_back_with_one_warning_and_strict_raises(build, silent, x):
    torch.manual_seed(0)
    model = build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = pmptrain.EMSA(model)  # nothing known to be wrong at construction
    assert any(r["unit"] == silent for r in opt.rule_table())
    inp = x()
    module = dict(model.named_modules())[silent]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(inp).pow(2).mean().backward()
    with pytest.warns(UserWarning) as rec:
        opt.step()
    msgs = [str(w.message) for w in rec if silent in str(w.message)]
    assert len(msgs) == 1 and "forward never ran through its hooks" in msgs[0] and "training-mode" in msgs[0]
    assert "eval()" not in msgs[0] and "no_grad" not in msgs[0]  # not the user's doing
    table = {r["unit"]: r["rule"] for r in opt.rule_table()}
    assert table[f"{silent}.weight"] == "fallback" and silent not in table
    assert not opt.last_step["skipped"] and opt.last_step["fallback"] >= 1
    for n, p in model.named_parameters():  # every parameter moved: the silent one by Adam
        assert not torch.equal(p, before[n]), n
    # Adam's first step moves every entry by lr (1e-3) in the sign of the gradient
    torch.testing.assert_close((module.weight - before[f"{silent}.weight"]).abs(),
                               torch.full_like(module.weight, 1e-3), rtol=1e-3, atol=1e-7)
    opt.zero_grad()
    model(inp).pow(2).mean().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # warned once
    sd = opt.state_dict()  # a fresh optimizer resumes the demoted layout
    opt2 = pmptrain.EMSA(model)
    opt2.load_state_dict(sd)
    assert {r["unit"]: r["rule"] for r in opt2.rule_table()} == table
    strict = pmptrain.EMSA(model, strict=True)
    strict.zero_grad()
    model(inp).pow(2).mean().backward()
    with pytest.raises(ValueError, match=f"{silent}.*forward never ran through its hooks.*strict=True"):
        strict.step()


def test_the_eval_mode_message_blames_the_user_only_when_the_user_caused_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = pmptrain.EMSA(model)
    model.eval()
    model(torch.randn(5, 3)).pow(2).mean().backward()
    with pytest.raises(RuntimeError, match="eval\\(\\) mode"):
        opt.step()
    assert all(r["rule"] == "emsa" for r in opt.rule_table())  # nothing demoted
    opt.zero_grad()
    model.train()
    model[2].eval()  # the user put one module in eval mode: that is not silence
    model(torch.randn(5, 3)).pow(2).mean().backward()
    with pytest.raises(RuntimeError, match="eval\\(\\) mode"):
        opt.step()
    assert all(r["rule"] == "emsa" for r in opt.rule_table())


def test_a_module_sharing_a_tied_weight_is_not_silent_when_its_partner_recorded():
    emb = nn.Embedding(7, 4)
    head = nn.Linear(4, 7, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    opt = pmptrain.EMSA(model)
    emb(torch.randint(0, 7, (3, 5))).pow(2).mean().backward()  # head unused this step
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert [r["rule"] for r in opt.rule_table()] == ["emsa"]


# ------------------------------------------------------------------ tied weights: one truth


def test_bert_tied_decoder_is_one_closed_form_unit_and_strict_accepts_it():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tf.BertForMaskedLM(tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=37))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cls.predictions holds decoder.bias as an alias: no warning
        opt = pmptrain.EMSA(model, strict=True)
    table = opt.rule_table()
    assert "fallback" not in {r["rule"] for r in table}
    tie = [r for r in table if r["unit"] == "bert.embeddings.word_embeddings+cls.predictions.decoder"]
    assert len(tie) == 1 and tie[0]["rule"] == "emsa" and tie[0]["description"].startswith("tied closed-form")
    assert set(tie[0]["params"]) == {"bert.embeddings.word_embeddings.weight", "cls.predictions.bias"}
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert not opt.last_step["skipped"] and opt.last_step["fallback"] == 0


class TiedHead(nn.Module):
    """An output layer without a rule that uses an embedding's table directly."""

    def __init__(self, emb):
        super().__init__()
        self.weight = emb.weight
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, h):
        return self.scale * F.linear(h, self.weight)


def test_a_tie_with_a_module_without_a_rule_falls_back_and_warning_table_and_strict_agree():
    torch.manual_seed(0)
    emb = nn.Embedding(11, 4)
    model = nn.ModuleDict({"emb": emb, "mix": nn.Linear(4, 4), "head": TiedHead(emb)})
    with pytest.warns(UserWarning) as rec:
        opt = pmptrain.EMSA(model)
    msgs = [str(w.message) for w in rec]
    assert any("'head' (TiedHead) has no closed-form maximiser" in m for m in msgs)
    tie = [m for m in msgs if "shares parameter 'emb.weight' with module 'head'" in m]
    assert len(tie) == 1 and "take the fallback step" in tie[0]
    table = {r["unit"]: r["rule"] for r in opt.rule_table()}
    assert table == {"mix": "emsa", "emb.weight": "fallback", "head.scale": "fallback"}
    with pytest.raises(ValueError, match="(TiedHead|shares parameter).*strict=True"):
        pmptrain.EMSA(model, strict=True)
    pmptrain.EMSA(model, strict=True, exclude=["head", "emb"])  # an explicit choice
    idx = torch.randint(0, 11, (3, 5))
    opt = pmptrain.EMSA(model)
    model["head"](torch.tanh(model["mix"](model["emb"](idx)))).pow(2).mean().backward()
    opt.step()
    assert opt.last_step["fallback"] == 2 and opt.last_step["controlled"] == 1


# ------------------------------------------------------------------ norms recognised by what they compute

from nanogpt_faithful import GPT, GPTConfig  # noqa: E402
from test_layers import LR, RHO, newton_maximiser, one_step  # noqa: E402


class T5StyleNorm(nn.Module):  # variance in float32, no bias, no mean subtraction
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, h):
        v = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.weight * (h * torch.rsqrt(v + self.variance_epsilon))


class GemmaStyleNorm(nn.Module):  # (1 + w), computed in float32
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class ChannelsFirstLN(nn.Module):  # ConvNeXt's channels_first LayerNorm, eps fitted (no attribute)
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + 1e-6)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class NotANorm(nn.Module):  # 1-D weight, but a nonlinear use of it
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:]) * torch.exp(self.weight)


def _rms(x, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _ln_cf(x, eps):
    u = x.mean(1, keepdim=True)
    return (x - u) * torch.rsqrt((x - u).pow(2).mean(1, keepdim=True) + eps)


PROBED = [
    ("nanogpt-layernorm", lambda: GPT.__init__.__globals__["LayerNorm"](6, True), (5, 3, 6),
     lambda x: F.layer_norm(x, (6,), eps=1e-5), -1),
    ("nanogpt-layernorm-no-bias", lambda: GPT.__init__.__globals__["LayerNorm"](6, False), (5, 3, 6),
     lambda x: F.layer_norm(x, (6,), eps=1e-5), -1),
    ("t5-rmsnorm", lambda: T5StyleNorm(6), (4, 3, 6), lambda x: _rms(x, 1e-6), -1),
    ("gemma-rmsnorm-1+w", lambda: GemmaStyleNorm(6), (4, 3, 6), lambda x: _rms(x, 1e-6), -1),
    ("convnext-channels-first", lambda: ChannelsFirstLN(4), (3, 4, 2, 3), lambda x: _ln_cf(x, 1e-6), 1),
]


@pytest.mark.parametrize("name,build,shape,normalize,cdim", PROBED, ids=[p[0] for p in PROBED])
def test_probed_norm_step_is_the_maximiser_of_its_augmented_hamiltonian(name, build, shape, normalize, cdim):
    norm = build().double()
    ad = pmptrain.modules.adapter_for(norm)
    assert ad is not None and ad.kind == "channel", name
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=DT, generator=torch.Generator().manual_seed(4)))
    x = 2.0 * torch.randn(shape, dtype=DT, generator=torch.Generator().manual_seed(5)) + 0.5
    rec, grads, change, before = one_step(norm, x)
    rows = (normalize(rec["x"]) if cdim == -1 else normalize(rec["x"]).movedim(1, -1)).reshape(-1, shape[cdim])
    torch.testing.assert_close(ad.input_rows(norm, rec["x"]), rows, rtol=1e-12, atol=1e-12)
    gamma = norm.weight.detach() + ad.weight_offset  # the forward is γ x̂ + β with γ = w + offset
    beta = norm.bias.detach() if getattr(norm, "bias", None) is not None else 0.0
    y = norm(rec["x"])
    y_rows = (y if cdim == -1 else y.movedim(1, -1)).reshape(-1, shape[cdim])
    tol = 1e-6 if name.startswith(("t5", "gemma")) else 1e-12  # those normalise in float32
    torch.testing.assert_close(y_rows, rows * gamma + beta, rtol=tol, atol=tol)
    batch = ad.batch_size(norm, rec["x"])
    g = rec["g"] if cdim == -1 else rec["g"].movedim(1, -1)
    p = -batch * g.reshape(-1, shape[cdim])

    def fn(theta, r, extra):
        out = r * (theta["weight"] + ad.weight_offset)
        return out + theta["bias"] if "bias" in theta else out

    ref = newton_maximiser(fn, before, [(rows, p, None)], batch, RHO, 1 / LR, {k: -grads[k] for k in before})
    for k in before:
        torch.testing.assert_close(change[k], ref[k], rtol=1e-8, atol=1e-11, msg=lambda s: f"{k}: {s}")


def test_a_module_that_is_not_a_norm_is_not_recognised_and_the_error_suggests_registration():
    model = nn.Sequential(nn.Linear(4, 4), NotANorm(4))
    assert pmptrain.modules.adapter_for(model[1]) is None
    with pytest.raises(ValueError) as err:
        pmptrain.EMSA(model, strict=True)
    msg = str(err.value)
    assert "'1' (NotANorm)" in msg and "pmptrain.register_module_type(NotANorm" in msg
    assert "solver='iterative'" not in msg
    with pytest.warns(UserWarning, match=r"'1' \(NotANorm\).*fallback step\..*pmptrain.register_module_type\(NotANorm"):
        pmptrain.EMSA(model)  # the warning names the path and the one-line registration too


def test_probe_reads_and_fits_eps():
    from pmptrain.probe import recognise_norm

    assert recognise_norm(T5StyleNorm(5, eps=1e-5)) == ("rms", 1e-5)
    assert recognise_norm(T5StyleNorm(5, eps=1e-6)) == ("rms", 1e-6)
    assert recognise_norm(ChannelsFirstLN(5)) == ("layer_cf", 1e-6)  # no attribute: fitted
    assert recognise_norm(GemmaStyleNorm(5)) == ("rms_1p", 1e-6)
    assert recognise_norm(NotANorm(5)) is None


def test_faithful_nanogpt_is_accepted_by_strict_fully_controlled_and_steps():
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = pmptrain.EMSA(model, strict=True)
    table = opt.rule_table()
    assert "fallback" not in {r["rule"] for r in table}
    assert "transformer.wte+lm_head" in {r["unit"] for r in table}
    assert sum(r["rule"] == "emsa-channel" for r in table) == 5  # 2 per block + ln_f: nanoGPT's own LayerNorm
    idx = torch.randint(0, 64, (4, 16))
    losses = []
    for _ in range(3):
        opt.zero_grad()
        _, loss = model(idx, targets=idx.roll(-1, 1))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        assert not opt.last_step["skipped"] and opt.last_step["fallback"] == 0
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------ nn.MultiheadAttention


class ExplicitMHA(nn.Module):
    """``nn.MultiheadAttention`` rebuilt from four explicit ``nn.Linear`` layers (copied from
    ``mha``): the projections run as modules, the rest through torch's functional with identity
    projections (exact), so the outputs equal ``mha``'s and the hooks of the four Linears fire."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        e = mha.embed_dim
        kd, vd = mha.kdim, mha.vdim
        dt = mha.out_proj.weight.dtype
        self.e, self.h, self.batch_first, self.zero = e, mha.num_heads, mha.batch_first, mha.add_zero_attn
        self.q, self.k, self.v = nn.Linear(e, e, dtype=dt), nn.Linear(kd, e, dtype=dt), nn.Linear(vd, e, dtype=dt)
        self.out = nn.Linear(e, e, dtype=dt)
        with torch.no_grad():
            for j, (lin, name) in enumerate(((self.q, "q"), (self.k, "k"), (self.v, "v"))):
                w = mha.in_proj_weight[j * e:(j + 1) * e] if mha._qkv_same_embed_dim else \
                    getattr(mha, f"{name}_proj_weight")
                lin.weight.copy_(w)
                lin.bias.copy_(mha.in_proj_bias[j * e:(j + 1) * e])
            self.out.weight.copy_(mha.out_proj.weight)
            self.out.bias.copy_(mha.out_proj.bias)
        self.register_buffer("bias_k", None if mha.bias_k is None else mha.bias_k.detach().clone())
        self.register_buffer("bias_v", None if mha.bias_v is None else mha.bias_v.detach().clone())
        self.register_buffer("eye", torch.eye(e, dtype=mha.out_proj.weight.dtype))

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        q, k, v = self.q(query), self.k(key), self.v(value)
        if self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        eye = self.eye
        a, w = F.multi_head_attention_forward(
            q, k, v, self.e, self.h, None, None, self.bias_k, self.bias_v, self.zero, 0.0, eye, None,
            training=True, key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        a = self.out(a)
        return (a.transpose(0, 1) if self.batch_first else a), w


def _mha_pairs(mha):
    e = mha.embed_dim
    rows = lambda j: (lambda m: m.in_proj_weight[j * e:(j + 1) * e] if m._qkv_same_embed_dim  # noqa: E731
                      else getattr(m, "qkv"[j] + "_proj_weight"))
    return [(rows(j), lambda x, j=j: getattr(x, "qkv"[j]).weight) for j in range(3)] + [
        (lambda m, j=j: m.in_proj_bias[j * e:(j + 1) * e], lambda x, j=j: getattr(x, "qkv"[j]).bias) for j in range(3)
    ] + [(lambda m: m.out_proj.weight, lambda x: x.out.weight), (lambda m: m.out_proj.bias, lambda x: x.out.bias)]


MHA_CASES = [
    ("self-packed", dict(), dict(need_weights=False), True),
    ("self-packed-batch-first-masked", dict(batch_first=True), dict(need_weights=True, mask=True), True),
    ("cross-kdim-vdim", dict(kdim=3, vdim=5), dict(need_weights=True), False),
    ("cross-packed-bias-kv-zero-attn", dict(add_bias_kv=True, add_zero_attn=True), dict(need_weights=False), False),
]


@pytest.mark.parametrize("name,kw,call,self_attn", MHA_CASES, ids=[c[0] for c in MHA_CASES])
@pytest.mark.parametrize("costate", ["auto", "exact"])
def test_mha_step_equals_four_explicit_linear_units(name, kw, call, self_attn, costate):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(6, 2, **kw).double()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    twin = ExplicitMHA(mha)
    bf = kw.get("batch_first", False)
    gen = torch.Generator().manual_seed(1)
    shape = lambda t, d: (3, t, d) if bf else (t, 3, d)  # noqa: E731
    query = torch.randn(shape(4, 6), dtype=DT, generator=gen)
    key = query if self_attn else torch.randn(shape(5, kw.get("kdim", 6)), dtype=DT, generator=gen)
    value = query if self_attn else torch.randn(shape(5, kw.get("vdim", 6)), dtype=DT, generator=gen)
    extra = {"need_weights": call["need_weights"]}
    if call.get("mask"):
        extra["attn_mask"] = torch.triu(torch.ones(4, 4, dtype=torch.bool), 1)
        extra["key_padding_mask"] = torch.tensor([[False] * 4, [False, False, False, True], [False] * 4])
    target = torch.randn(shape(4, 6), dtype=DT, generator=gen)
    opts = [pmptrain.EMSA(m, strict=True, lr=0.6, rho=1.3, costate=costate, exclude=[])
            for m in (mha, twin)]
    for m, o in zip((mha, twin), opts):
        out, _ = m(query, key, value, **extra)
        F.mse_loss(out, target).backward()
    torch.testing.assert_close(mha.out_proj.weight.grad, twin.out.weight.grad, rtol=1e-10, atol=1e-12)
    before = [a(mha).detach().clone() for a, _ in _mha_pairs(mha)]
    bias_k = None if mha.bias_k is None else (mha.bias_k.detach().clone(), mha.bias_k.grad.clone())
    for o in opts:
        o.step()
        assert not o.last_step["skipped"] and o.last_step["fallback"] == 0
    assert opts[0].rule_table()[0]["rule"] == "emsa-mha"
    for (a, b), w0 in zip(_mha_pairs(mha), before):
        assert not torch.equal(a(mha), w0)
        torch.testing.assert_close(a(mha), b(twin), rtol=1e-9, atol=1e-11)
    if bias_k is not None:  # Δb = −∇J/(ρ + δ): the maximiser of its own H̃ (no state, one row a sequence)
        torch.testing.assert_close(mha.bias_k - bias_k[0], -bias_k[1] / (1.3 + 1 / 0.6), rtol=1e-12, atol=1e-14)


def test_mha_projection_step_is_the_numerical_maximiser_of_its_augmented_hamiltonian():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 2).double()
    twin = ExplicitMHA(mha)
    rec = {}

    def hook(mod, args, out):
        rec["x"] = args[0].detach()
        out.register_hook(lambda g: rec.__setitem__("g", g.detach()))

    twin.k.register_forward_hook(hook)
    x = torch.randn(5, 3, 4, dtype=DT, generator=torch.Generator().manual_seed(2))
    t = torch.randn(5, 3, 4, dtype=DT, generator=torch.Generator().manual_seed(3))
    opt = pmptrain.EMSA(mha, lr=LR, rho=RHO, max_step=None, strict=True)
    F.mse_loss(mha(x, x, x)[0], t).backward()
    F.mse_loss(twin(x, x, x)[0], t).backward()
    wk = mha.in_proj_weight[4:8].detach().clone()
    bk = mha.in_proj_bias[4:8].detach().clone()
    gw, gb = mha.in_proj_weight.grad[4:8].clone(), mha.in_proj_bias.grad[4:8].clone()
    opt.step()
    rows, g = rec["x"].reshape(-1, 4), rec["g"].reshape(-1, 4)
    batch = rows.shape[0]

    def fn(theta, r, extra):
        return r @ theta["weight"].T + theta["bias"]

    before = {"weight": wk, "bias": bk}
    ref = newton_maximiser(fn, before, [(rows, -batch * g, None)], batch, RHO, 1 / LR,
                           {"weight": -gw, "bias": -gb})
    torch.testing.assert_close(mha.in_proj_weight[4:8] - wk, ref["weight"], rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(mha.in_proj_bias[4:8] - bk, ref["bias"], rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("build,run", [
    (lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
     lambda m, x, y: m(x, src_mask=nn.Transformer.generate_square_subsequent_mask(5, dtype=DT), is_causal=True)),
    (lambda: nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0),
     lambda m, x, y: m(x.transpose(0, 1), y.transpose(0, 1)).transpose(0, 1)),
    (lambda: nn.Transformer(8, 2, 1, 1, 16, dropout=0.0, batch_first=True), lambda m, x, y: m(x, y[:, :5])),
])
def test_torch_transformer_layers_are_fully_controlled_and_match_explicit_linears(build, run):
    torch.manual_seed(0)
    model = build().double()
    twin = __import__("copy").deepcopy(model)
    for name, mod in list(twin.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                setattr(mod, cname, ExplicitMHA(child))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 5, 8, dtype=DT, generator=gen), torch.randn(3, 6, 8, dtype=DT, generator=gen)
    opts = [pmptrain.EMSA(m, strict=True, setting="classic") for m in (model, twin)]
    assert any(r["rule"] == "emsa-mha" for r in opts[0].rule_table())
    for m, o in zip((model, twin), opts):
        run(m, x, y).pow(2).mean().backward()
        o.step()
        assert not o.last_step["skipped"] and o.last_step["fallback"] == 0
    ours = dict(model.named_parameters())
    for n, p in twin.named_parameters():  # every non-attention parameter, and the projections
        if n in ours:
            torch.testing.assert_close(ours[n], p, rtol=1e-9, atol=1e-11, msg=lambda s: f"{n}: {s}")
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            ex = dict(twin.named_modules())[name]
            for a, b in _mha_pairs(mod):
                torch.testing.assert_close(a(mod), b(ex), rtol=1e-9, atol=1e-11)


def test_out_proj_is_refused_at_construction_when_the_attention_rule_is_unavailable(monkeypatch):
    """A torch whose functional MHA the tap cannot see (tap_available() False): no MHA rule, and
    out_proj — a Linear whose weight its parent reads directly — is refused up front."""
    import pmptrain.optim.emsa as emsa_mod

    monkeypatch.setattr(emsa_mod, "tap_available", lambda: False)
    model = nn.Sequential(nn.MultiheadAttention(4, 2))
    with pytest.warns(UserWarning) as rec:
        opt = pmptrain.EMSA(model)
    msgs = [str(w.message) for w in rec if "'0.out_proj'" in str(w.message)]
    assert len(msgs) == 1 and "F.multi_head_attention_forward without calling out_proj" in msgs[0]
    assert {r["rule"] for r in opt.rule_table()} == {"fallback"}
    x = torch.randn(3, 2, 4)
    model[0](x, x, x)[0].pow(2).mean().backward()
    opt.step()  # no error: every parameter on the fallback
    assert opt.last_step["fallback"] == 4
    with pytest.raises(ValueError, match="(MultiheadAttention|out_proj).*strict=True"):
        pmptrain.EMSA(model, strict=True)


def _mha_rank(rank, world):
    import torch.distributed as dist

    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double()
    x = torch.randn(4, 5, 8, dtype=DT, generator=torch.Generator().manual_seed(1))
    opt = pmptrain.EMSA(model, strict=True, process_group=dist.group.WORLD)
    for _ in range(2):
        opt.zero_grad()
        model(x[2 * rank:2 * rank + 2]).pow(2).mean().backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _rank_cases(rank, world):
    return {"mha": _mha_rank(rank, world), "silent": _silent_rank(rank, world)}


@pytest.fixture(scope="module")
def dist_cases():
    from dist_utils import run_distributed

    return run_distributed(_rank_cases, 2)  # one spawn for every distributed case of this file


@pytest.mark.distributed
def test_mha_rule_under_two_ranks_equals_one_process_on_the_union_batch(dist_cases):
    results = [r["mha"] for r in dist_cases]
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double()
    x = torch.randn(4, 5, 8, dtype=DT, generator=torch.Generator().manual_seed(1))
    opt = pmptrain.EMSA(model, strict=True)
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    for n, p in model.named_parameters():
        for r in results:
            torch.testing.assert_close(r[n], p.detach(), rtol=1e-10, atol=1e-10, msg=lambda s: f"{n}: {s}")


def test_hf_t5_is_fully_controlled_through_its_recognised_norms():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=1,
                                                      num_heads=2))
    opt = pmptrain.EMSA(model, strict=True)
    table = opt.rule_table()
    assert "fallback" not in {r["rule"] for r in table}
    assert sum(r["rule"] == "emsa-channel" for r in table) == 7  # every T5LayerNorm: a probed RMSNorm
    ids = torch.randint(0, 64, (2, 8))
    logits = model(input_ids=ids, decoder_input_ids=ids).logits
    F.cross_entropy(logits.reshape(-1, 64), ids.reshape(-1)).backward()
    opt.step()
    assert not opt.last_step["skipped"] and opt.last_step["fallback"] == 0


def test_hf_mamba_conv1d_read_by_its_mixer_falls_back_at_the_first_step():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tf.MambaForCausalLM(tf.MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1,
                                               expand=2, conv_kernel=3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # A_log and D enter nonlinearly: fallback, warned
        opt = pmptrain.EMSA(model)
    rules = {r["unit"]: r["rule"] for r in opt.rule_table()}
    assert rules["backbone.layers.0.norm"] == "emsa-channel"  # MambaRMSNorm, probed
    ids = torch.randint(0, 64, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt.step()
    msgs = [str(w.message) for w in rec if "conv1d" in str(w.message)]
    if not msgs:  # this transformers version calls the conv1d module: nothing to demote
        assert rules["backbone.layers.0.mixer.conv1d"].startswith("emsa")
        return
    assert len(msgs) == 1 and "'backbone.layers.0.mixer.conv1d'" in msgs[0] and "MambaMixer" in msgs[0]
    assert {r["unit"]: r["rule"] for r in opt.rule_table()}["backbone.layers.0.mixer.conv1d.weight"] == "fallback"


class ScaledEmbedding(nn.Embedding):
    """Gemma's pattern: ``E[i]·√d`` with the scale in a buffer."""

    def __init__(self, v, d):
        super().__init__(v, d)
        self.register_buffer("embed_scale", torch.tensor(d ** 0.5), persistent=False)

    def forward(self, idx):
        return super().forward(idx) * self.embed_scale.to(self.weight.dtype)


def test_scaled_embedding_step_is_the_maximiser_of_its_augmented_hamiltonian():
    from test_hamiltonian import _newton

    from pmptrain.hamiltonian import affine_augmented_hamiltonian

    v, d = 7, 4
    emb = ScaledEmbedding(v, d).double()
    ad = pmptrain.modules.adapter_for(emb)
    assert ad is not None and ad.index_input and ad.state_scale == pytest.approx(2.0, rel=1e-12)
    idx = torch.randint(0, v - 2, (3, 5), generator=torch.Generator().manual_seed(1))
    target = torch.randn(3, 5, d, dtype=DT, generator=torch.Generator().manual_seed(2))
    opt = pmptrain.EMSA(nn.Sequential(emb), lr=LR, rho=RHO, max_step=None, strict=True)
    F.mse_loss(emb(idx), target).backward()
    grad, before = emb.weight.grad.clone(), emb.weight.detach().clone()
    opt.step()
    batch = idx.numel()  # every index a sample
    states = 2.0 * F.one_hot(idx.reshape(-1), v).to(DT)  # x = s·e_i
    zeros_p = torch.zeros(batch, d, dtype=DT)  # indices are not differentiable: no costate penalty

    def h(de):
        return affine_augmented_hamiltonian(de.T, None, states, zeros_p, batch, RHO, 1 / LR, grad.T)

    (ref,) = _newton(h, [(v, d)])
    torch.testing.assert_close(emb.weight - before, ref, rtol=1e-10, atol=1e-12)


def test_hf_gemma_tie_through_its_scaled_embedding_is_one_closed_form_unit():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tf.GemmaForCausalLM(tf.GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=37,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                               head_dim=16))
    opt = pmptrain.EMSA(model, strict=True)
    table = {r["unit"]: r["rule"] for r in opt.rule_table()}
    assert table["model.embed_tokens+lm_head"] == "emsa" and "fallback" not in table.values()
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert not opt.last_step["skipped"] and opt.last_step["fallback"] == 0


def test_tapped_attention_computes_exactly_what_torch_computes_and_is_inert_in_copies():
    """The tapped forward is torch's own code: the same output and attention weights, the same
    dropout draws; eval mode and no_grad run torch's path untouched; copies carry no tap."""
    import copy
    import pickle

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=True)
    plain = copy.deepcopy(mha)
    opt = pmptrain.EMSA(mha, strict=True)
    x = torch.randn(3, 5, 8)
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    for kw in ({"need_weights": True, "average_attn_weights": False}, {"need_weights": False, "attn_mask": mask}):
        torch.manual_seed(7)
        ours = mha(x, x, x, **kw)
        torch.manual_seed(7)
        ref = plain(x, x, x, **kw)
        torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=0)
        if kw["need_weights"]:
            torch.testing.assert_close(ours[1], ref[1], rtol=0, atol=0)
        ours[0].sum().backward()
    assert all(not opt.capture.peek(k).empty for k in opt.units[""].rule.capture_keys(opt.units[""]))
    opt.zero_grad()
    mha.eval()
    with torch.no_grad():
        torch.testing.assert_close(mha(x, x, x)[0], plain.eval()(x, x, x)[0])
    assert all(opt.capture.peek(k).empty for k in opt.units[""].rule.capture_keys(opt.units[""]))
    mha.train()
    twin = copy.deepcopy(mha)
    twin2 = pickle.loads(pickle.dumps(mha))
    for m in (twin, twin2):
        m(x, x, x)[0].sum().backward()  # runs torch's forward; nothing reaches the optimizer
    assert all(opt.capture.peek(k).empty for k in opt.units[""].rule.capture_keys(opt.units[""]))


def test_silence_is_found_when_only_a_submodule_is_called():
    torch.manual_seed(0)
    model = nn.ModuleDict({"body": FusedMixer(), "unused": nn.Linear(2, 2)})
    opt = pmptrain.EMSA(model)
    model["body"](torch.randn(2, 5, 6)).pow(2).mean().backward()  # the root's forward never runs
    with pytest.warns(UserWarning, match="'body.conv1d'.*forward never ran through its hooks"):
        opt.step()
    assert {r["unit"]: r["rule"] for r in opt.rule_table()}["body.conv1d.weight"] == "fallback"


def _silent_rank(rank, world):
    import torch.distributed as dist

    torch.manual_seed(0)
    model = nn.Sequential(FusedMixer())
    opt = pmptrain.EMSA(model, process_group=dist.group.WORLD)
    x = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.zero_grad()
            model(x[2 * rank:2 * rank + 2]).pow(2).mean().backward()
            opt.step()
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "rules": {r["unit"]: r["rule"] for r in opt.rule_table()},
            "warned": sum("forward never ran" in str(w.message) for w in rec)}


@pytest.mark.distributed
def test_a_silent_module_is_demoted_alike_on_every_rank(dist_cases):
    results = [r["silent"] for r in dist_cases]
    for r in results:
        assert r["rules"]["0.conv1d.weight"] == "fallback" and r["rules"]["0.in_proj"] == "emsa"
        assert r["warned"] == 1
    for n, p in results[0]["params"].items():
        assert torch.equal(p, results[1]["params"][n]), n
