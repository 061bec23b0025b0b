"""Additive parameters (pmptrain.additive, optim/additive.py): recognised from the autograd graph,
their per-sample uses counted exactly, their step the numerical maximiser of the bias-only H̃."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pmptrain
from pmptrain.additive import additive_uses
from test_layers import LR, RHO, newton_maximiser

DT = torch.float64
# relative-position index of a 6-token window into a 5-entry table: uneven use counts (0 … 12)
INDEX = torch.tensor([min(abs(i - j), 4) for i in range(6) for j in range(6)])


class Toy(nn.Module):
    """A ViT/Swin-like embedding + attention block: a class token concatenated, position embeddings
    added, a relative bias table read by index and added to the scores (all additive), a
    layer-scale (a product with a state) and a temperature inside ``exp`` (neither)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = nn.Linear(3, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, 4, generator=g))
        self.pos = nn.Parameter(torch.randn(1, 6, 4, generator=g))
        self.table = nn.Parameter(torch.randn(5, 2, generator=g))
        self.scale = nn.Parameter(torch.ones(4) + 0.1 * torch.randn(4, generator=g))
        self.temp = nn.Parameter(torch.tensor(0.3))
        self.register_buffer("index", INDEX.clone())

    def forward(self, x):
        b = x.shape[0]
        h = torch.cat([self.cls.expand(b, -1, -1), self.proj(x)], 1) + self.pos
        scores = (h @ h.transpose(1, 2)).unsqueeze(1)  # [B, 1, 6, 6]
        bias = self.table[self.index].view(6, 6, 2).permute(2, 0, 1).unsqueeze(0)
        att = ((scores + bias) * self.temp.exp()).softmax(-1)  # [B, 2, 6, 6]
        self.pre = (att @ h.unsqueeze(1)).sum(1)  # the state the layer-scale multiplies
        out = self.pre * self.scale
        if out.requires_grad:
            out.retain_grad()
        self.out = out
        return out


# the selection maps S·θ of each additive parameter, written independently of the module
def _cls_map(theta, s, extra):
    return s + F.pad(theta["cls"].expand(s.shape[0], -1, -1), (0, 0, 0, 5))


def _pos_map(theta, s, extra):
    return s + theta["pos"]


def _table_map(theta, s, extra):
    return s + theta["table"][INDEX].view(6, 6, 2).permute(2, 0, 1).unsqueeze(0)


MAPS = {"cls": (_cls_map, (6, 4)), "pos": (_pos_map, (6, 4)), "table": (_table_map, (2, 6, 6))}


def test_uses_are_counted_from_the_graph():
    model = Toy().double()
    out = model(torch.randn(3, 5, 3, dtype=DT))
    counts = torch.bincount(INDEX, minlength=5).to(DT)
    torch.testing.assert_close(additive_uses([out], model.cls)[0], torch.full((1, 1, 4), 3.0, dtype=DT))
    torch.testing.assert_close(additive_uses([out], model.pos)[0], torch.full((1, 6, 4), 3.0, dtype=DT))
    torch.testing.assert_close(additive_uses([out], model.table)[0], 3.0 * counts[:, None].expand(5, 2))
    u, why = additive_uses([out], model.scale)
    assert u is None and "Mul" in why
    u, why = additive_uses([out], model.temp)
    assert u is None and "Exp" in why
    assert additive_uses([out], nn.Parameter(torch.zeros(2))) == (None, None)  # not used


def test_additive_and_scale_steps_are_the_maximisers_and_the_rest_falls_back_with_a_reason():
    model = Toy().double()
    opt = pmptrain.EMSA(model, lr=LR, rho=RHO)
    assert {r["unit"]: r["rule"] for r in opt.rule_table()}[""] == "emsa-additive"
    x = torch.randn(3, 5, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    model(x).pow(2).mean().backward()
    gen = torch.Generator().manual_seed(2)
    grads, before = {}, {}
    for n, p in model.named_parameters():
        p.grad.mul_(0.7).add_(1e-3 * torch.randn(p.shape, generator=gen, dtype=DT))
        grads[n], before[n] = p.grad.clone(), p.detach().clone()
    with pytest.warns(UserWarning, match=r"'temp' of module '' is not an additive parameter \(it enters through Exp"):
        opt.step()
    assert not opt.last_step["skipped"]
    for name, (fn, shape) in MAPS.items():
        s = torch.zeros((3,) + shape, dtype=DT)  # the state it is added to (its value cancels in H̃)
        ref = newton_maximiser(fn, {name: before[name]}, [(s, torch.randn(s.shape, dtype=DT), None)], 3, RHO,
                               1 / LR, {name: -grads[name]})
        change = getattr(model, name).detach() - before[name]
        torch.testing.assert_close(change, ref[name], rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    # the layer-scale y = γ ⊙ x: the channel kind with state x (both penalties)
    rows, p_rows = model.pre.detach().reshape(-1, 4), -3 * model.out.grad.reshape(-1, 4)
    ref = newton_maximiser(lambda th, r, e: r * th["scale"], {"scale": before["scale"]}, [(rows, p_rows, None)], 3,
                           RHO, 1 / LR, {"scale": -grads["scale"]})
    torch.testing.assert_close(model.scale.detach() - before["scale"], ref["scale"], rtol=1e-10, atol=1e-12)
    # the temperature took Adam's first step: -fallback_lr·sign(g) (up to eps)
    fb = opt.param_groups[0]["fallback_lr"]
    torch.testing.assert_close(model.temp.detach() - before["temp"], -fb * grads["temp"].sign(), rtol=1e-5, atol=0)


def test_strict_raises_at_the_first_step_for_a_parameter_that_is_not_additive():
    model = Toy().double()
    opt = pmptrain.EMSA(model, strict=True)  # accepted: the parameters are recognised at the first forward
    model(torch.randn(2, 5, 3, dtype=DT)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="strict=True: parameter 'temp' .*Exp.*exclude"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # nothing moved


def test_vit_cls_token_and_position_embeddings_are_additive():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=20, num_labels=3)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = pmptrain.EMSA(model, strict=True)
        x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
        model(pixel_values=x, labels=y).loss.backward()
        opt.step()
    obs = opt.capture.observation("vit.embeddings")
    assert set(obs.uses) == {"cls_token", "position_embeddings"} and not obs.reasons
    assert bool((obs.uses["position_embeddings"] == 1).all()) and opt.last_step["fallback"] == 0


class LearnedPositions(nn.Embedding):
    """A learned position table with its own forward (as Whisper's and BART's): positions, not ids."""

    def forward(self, ids):
        positions = torch.arange(ids.shape[-1], device=ids.device)
        return super().forward(positions).unsqueeze(0).expand(ids.shape[0], -1, -1)


def test_an_embedding_subclass_with_its_own_forward_is_a_bias_only_unit():
    torch.manual_seed(0)
    pos = LearnedPositions(6, 3).double()
    model = nn.Sequential(pos, nn.Linear(3, 2)).double()
    opt = pmptrain.EMSA(model, lr=LR, rho=RHO, strict=True)
    ids = torch.zeros(4, 5, dtype=torch.long)
    model(ids).pow(2).sum().backward()
    g, before = pos.weight.grad.clone(), pos.weight.detach().clone()
    opt.step()
    u = opt.capture.observation("0").uses["weight"]
    torch.testing.assert_close(u, torch.tensor([1.0] * 5 + [0.0], dtype=DT)[:, None].expand(6, 3))  # row 5 unused
    torch.testing.assert_close(pos.weight.detach() - before, -g / (RHO * u + 1 / LR), rtol=1e-12, atol=1e-14)


def test_additive_unit_state_round_trips_through_state_dict(tmp_path):
    model = Toy().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = pmptrain.EMSA(model)
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(2, 5, 3, dtype=DT)).sum().backward()
            opt.step()
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    st = opt.state_of(model.temp)
    assert st.step == 2 and st.fallback["temp"].step == 2
    other = pmptrain.EMSA(Toy().double())
    other.load_state_dict(torch.load(path, weights_only=True))
    again = other.state_of(other.model.temp)
    assert again.step == 2 and torch.equal(again.fallback["temp"].exp_avg, st.fallback["temp"].exp_avg)
