"""Children whose parent applies their weights functionally (pmptrain/taps.py): Hugging Face's Mamba
mixer reads ``conv1d.weight`` inside ``causal_conv1d_fn`` and ``dt_proj.weight`` in a matmul.

* the tapped (state, costate) pairs are the affine maps' own: their row products are the autograd
  gradients of the weight and bias, exactly (float64);
* the step of each tapped child equals the numerical maximiser of its augmented Hamiltonian over
  the tapped calls (``test_layers.newton_maximiser``);
* a call with other settings than the child's (the decode path's ``padding=0``) is not recorded, so
  the child is silent and falls back at the first step instead of taking a wrong closed form.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pmptrain
from pmptrain.modules import adapter_for
from pmptrain.taps import ParentTap, tapped_child
from test_layers import LR, RHO, _block_linear, newton_maximiser

transformers = pytest.importorskip("transformers")
DT = torch.float64


def _tiny_mamba(seed=0):
    cfg = transformers.MambaConfig(vocab_size=32, hidden_size=8, state_size=3, expand=2, conv_kernel=3,
                                   num_hidden_layers=1, time_step_rank=2)
    torch.manual_seed(seed)
    model = transformers.MambaForCausalLM(cfg).double().train()
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(seed))
    return model, ids


class _Recorder:
    """A stand-in capture: keeps every (state, costate) the tap hands over."""

    removed = False

    def __init__(self):
        self.calls = {}

    def recording(self, module):
        return module.training and torch.is_grad_enabled()

    def _accumulate(self, key, x, call, g):
        self.calls.setdefault(key, []).append((x, g))

    def _backward_runs(self):  # the capture's end-of-pass record (gradient norms): nothing to record here
        pass

    def _repeated(self, key):
        raise AssertionError("a second backward")


def _tap(mixer):
    rec = _Recorder()
    tap = ParentTap(rec, mixer)
    tap.keys = {mixer.conv1d: "conv1d"}
    if hasattr(mixer, "dt_proj"):
        tap.keys[mixer.dt_proj] = "dt_proj"
    h = [mixer.register_forward_pre_hook(tap.pre, with_kwargs=True),
         mixer.register_forward_hook(tap.post, with_kwargs=True, always_call=True)]
    return rec, h


def test_the_mamba_mixer_children_are_tapped():
    model, _ = _tiny_mamba()
    mixer = model.backbone.layers[0].mixer
    assert tapped_child(mixer, "conv1d") and tapped_child(mixer, "dt_proj")
    assert not tapped_child(mixer, "in_proj") and not tapped_child(mixer, "x_proj")


def _tiny(kind):
    if kind == "mamba":
        return _tiny_mamba()
    if kind == "falcon_mamba":
        cfg = transformers.FalconMambaConfig(vocab_size=32, hidden_size=8, state_size=3, expand=2, conv_kernel=3,
                                             num_hidden_layers=1, time_step_rank=2)
        make = transformers.FalconMambaForCausalLM
    else:
        cfg = transformers.Mamba2Config(vocab_size=32, hidden_size=8, state_size=3, expand=2, conv_kernel=3,
                                        num_hidden_layers=1, num_heads=4, head_dim=4, n_groups=1, chunk_size=4)
        make = transformers.Mamba2ForCausalLM
    torch.manual_seed(0)
    model = make(cfg).double().train()
    return model, torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["mamba", "falcon_mamba", "mamba2"])
def test_tapped_pairs_are_the_affine_maps_own(kind):
    model, ids = _tiny(kind)
    mixer = model.backbone.layers[0].mixer
    rec, handles = _tap(mixer)
    model(input_ids=ids, labels=ids).loss.backward()
    for h in handles:
        h.remove()
    (xc, gc), = rec.calls["conv1d"]
    conv = mixer.conv1d
    ad = adapter_for(conv)
    rows, grows = ad.input_rows(conv, xc), ad.output_rows(conv, gc)
    # the block-diagonal Σ gᵀx of a depthwise convolution is its weight's gradient
    c, k = conv.weight.shape[0], conv.weight.shape[2]
    wgrad = torch.einsum("nc,nck->ck", grows, rows.reshape(-1, c, k))
    torch.testing.assert_close(wgrad, conv.weight.grad[:, 0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grows.sum(0), conv.bias.grad, rtol=1e-12, atol=1e-14)
    # the tapped call is the module's own map: conv1d(x) at the tapped input reproduces what the mixer used
    assert gc.shape == conv(xc).shape
    if kind == "mamba2":  # Mamba2 has no dt_proj (its dt_bias is an additive parameter)
        assert "dt_proj" not in rec.calls and not tapped_child(mixer, "dt_proj")
        return
    (xd, gd), = rec.calls["dt_proj"]
    lin = mixer.dt_proj
    assert xd.shape[-1] == lin.in_features and gd.shape[-1] == lin.out_features
    torch.testing.assert_close(gd.reshape(-1, gd.shape[-1]).T @ xd.reshape(-1, xd.shape[-1]), lin.weight.grad,
                               rtol=1e-12, atol=1e-14)
    # the scan adds dt_proj.bias.float(): its gradient passes a float32 cast (FalconMamba: rounding ~4e-8)
    torch.testing.assert_close(gd.reshape(-1, gd.shape[-1]).sum(0), lin.bias.grad, rtol=1e-6, atol=1e-12)


def test_tapped_children_step_is_the_maximiser_of_their_hamiltonian():
    model, ids = _tiny_mamba()
    mixer = model.backbone.layers[0].mixer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # A_log (exp) falls back
        opt = pmptrain.EMSA(model, lr=LR, rho=RHO, route="primal", costate="exact")
    rec, handles = _tap(mixer)  # an independent record of the same calls
    model(input_ids=ids, labels=ids).loss.backward()
    for h in handles:
        h.remove()
    units = {u["unit"]: u["rule"] for u in opt.rule_table()}
    conv_key, dt_key = "backbone.layers.0.mixer.conv1d", "backbone.layers.0.mixer.dt_proj"
    assert units[conv_key] != "fallback" and units[dt_key] != "fallback"
    assert not opt.capture.peek(conv_key).empty and not opt.capture.peek(dt_key).empty
    gen = torch.Generator().manual_seed(2)
    grads = {}
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(0.7).add_(1e-3 * torch.randn(p.shape, generator=gen, dtype=DT))  # clipping + noise
            grads[id(p)] = p.grad.clone()
    before = {id(p): p.detach().clone() for p in model.parameters()}
    opt.step()
    assert not opt.last_step["skipped"]
    units = {u["unit"]: u["rule"] for u in opt.rule_table()}
    assert units[conv_key] != "fallback" and units[dt_key] != "fallback"  # not found silent at the step
    conv, lin = mixer.conv1d, mixer.dt_proj
    batch = ids.shape[0]
    (xc, gc), = rec.calls["conv1d"]
    ad = adapter_for(conv)
    c, k = conv.weight.shape[0], conv.weight.shape[2]
    ref = newton_maximiser(_block_linear(c, c, c * k), {n: before[id(p)] for n, p in conv.named_parameters()},
                           [(ad.input_rows(conv, xc), -batch * ad.output_rows(conv, gc), None)], batch, RHO, 1 / LR,
                           {n: -grads[id(p)] for n, p in conv.named_parameters()})
    for n, p in conv.named_parameters():
        torch.testing.assert_close(p.detach() - before[id(p)], ref[n], rtol=1e-8, atol=1e-11)
    (xd, gd), = rec.calls["dt_proj"]
    rows = xd.reshape(-1, xd.shape[-1])
    samples = rows.shape[0]  # a Linear's sample is a row (a token)
    ref = newton_maximiser(lambda th, r, e: r @ th["weight"].T + th["bias"],
                           {n: before[id(p)] for n, p in lin.named_parameters()},
                           [(rows, -samples * gd.reshape(-1, gd.shape[-1]), None)], samples, RHO, 1 / LR,
                           {n: -grads[id(p)] for n, p in lin.named_parameters()})
    for n, p in lin.named_parameters():
        torch.testing.assert_close(p.detach() - before[id(p)], ref[n], rtol=1e-8, atol=1e-11)


def test_a_call_with_other_settings_is_not_recorded_and_the_child_falls_back():
    """A parent applying the child's weight with a padding the child does not have: the tap does
    not record it, the first step finds the child silent and sends it to the fallback."""

    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1d = nn.Conv1d(3, 3, 2, groups=3, padding=1)
            self.dt_proj = nn.Linear(2, 3)

        def forward(self, x):
            y = F.conv1d(x, self.conv1d.weight, self.conv1d.bias, padding=0, groups=3)  # not the child's padding
            return y.sum() + (self.dt_proj.weight @ x[:, :2]).sum()

    Parent.__module__, Parent.__qualname__ = "transformers.models.mamba.modeling_mamba", "MambaMixer"
    model = nn.Sequential(Parent())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = pmptrain.EMSA(model)
    x = torch.randn(2, 3, 5)
    model(x).backward()
    with pytest.warns(UserWarning, match="'0.conv1d'"):
        opt.step()
    rules = {u["unit"]: u["rule"] for u in opt.rule_table()}
    assert rules["0.conv1d.weight"] == "fallback" and rules["0.dt_proj"] != "fallback"


def test_a_child_called_as_a_module_inside_its_parent_is_recorded_once():
    """transformers' quantized path calls ``dt_proj`` itself: its own hook records the call, the tap
    does not record it a second time."""

    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1d = nn.Conv1d(3, 3, 2, groups=3, padding=1)
            self.dt_proj = nn.Linear(4, 3)

        def forward(self, t):
            return (self.dt_proj(t) - self.dt_proj.bias).pow(2).sum() + self.dt_proj.bias.sum()

    Parent.__module__, Parent.__qualname__ = "transformers.models.mamba.modeling_mamba", "MambaMixer"
    model = nn.Sequential(Parent()).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = pmptrain.EMSA(model, route="primal", costate="exact")
    t = torch.randn(5, 4, dtype=DT)
    model(t).backward()
    st = opt.capture.peek("0.dt_proj")
    assert st.rows == 5 and st.samples == 5
    torch.testing.assert_close(st.xx, t.T @ t, rtol=1e-12, atol=1e-12)
