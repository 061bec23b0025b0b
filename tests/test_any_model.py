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
