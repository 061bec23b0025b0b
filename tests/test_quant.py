"""Tests of pmptrain.quant: STE quantisers (values, pseudo-gradients at boundaries) and discretize_."""

import pytest
import torch
from torch import nn

from pmptrain.discrete import binary_grid, on_grid, ternary_grid, uniform_grid
from pmptrain.quant import (
    QuantizedActivation,
    ScaleParametrization,
    SignActivation,
    discrete_parameters,
    discretize_,
    is_discrete_module,
    sign_ste,
    uniform_quantize_ste,
)


def test_sign_ste_forward_and_pseudo_gradient():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5], requires_grad=True)
    y = sign_ste(x)
    assert y.tolist() == [-1, -1, -1, 1, 1, 1, 1]  # sign(0) = +1
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    y.backward(g)
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0]  # 1{|x| <= 1}, boundaries pass
    assert torch.isnan(sign_ste(torch.tensor([float("nan")]))).all()
    m = SignActivation()
    assert torch.equal(m(torch.tensor([0.0, -0.1])), torch.tensor([1.0, -1.0]))


def test_uniform_quantize_values_and_gradient():
    x = torch.tensor([-1.5, -1.0, -0.4, -1 / 3, 0.0, 0.2, 1.0, 3.0], dtype=torch.float64, requires_grad=True)
    y = uniform_quantize_ste(x, 2)  # levels -1, -1/3, 1/3, 1; step 2/3
    lv = uniform_grid(2).values
    assert y.tolist() == [lv[0], lv[0], lv[1], lv[1], lv[2], lv[2], lv[3], lv[3]]  # exactly the grid
    y.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 1, 1, 0]
    # k = 1 on [-1, 1] is the sign with sign(0) = +1
    z = torch.linspace(-2, 2, 41)
    z = torch.cat([z, torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    assert torch.equal(uniform_quantize_ste(z, 1), sign_ste(z))
    assert torch.isnan(uniform_quantize_ste(torch.tensor([float("nan")]), 3)).all()
    # range [0, 1], 2 bits: levels 0, 1/3, 2/3, 1; half-up rounding at 1/6
    q = QuantizedActivation(2, 0.0, 1.0)
    out = q(torch.tensor([-0.1, 1 / 6 + 1e-6, 0.5, 0.9, 1.2]))
    assert out.tolist() == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 1.0])
    xb = torch.tensor([0.0, 1.0, -0.01, 1.01], requires_grad=True)
    q(xb).sum().backward()
    assert xb.grad.tolist() == [1, 1, 0, 0]
    assert "bits=2" in repr(q)
    with pytest.raises(ValueError, match="bits"):
        QuantizedActivation(0)
    with pytest.raises(ValueError, match="low/high"):
        uniform_quantize_ste(x, 2, 1.0, 0.0)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Linear(8, 8, bias=False), nn.ReLU(),
        nn.Linear(8, 3),
    )


def test_discretize_keep_default_first_last():
    m = mlp()
    w_mid = m[3].weight.detach().clone()
    out = discretize_(m)
    assert out is m
    names = [d.name for d in discrete_parameters(m)]
    assert names == ["3"] and is_discrete_module(m[3]) and not is_discrete_module(m[0])
    assert torch.equal(m[3].weight, torch.where(w_mid >= 0, 1.0, -1.0))  # sign init, no scale
    assert discrete_parameters(m)[0].param is m[3].weight
    assert discrete_parameters(m)[0].param_key == "3.weight"


def test_discretize_keep_variants_include_exclude():
    m = discretize_(mlp(), keep=None)
    assert [d.name for d in discrete_parameters(m)] == ["0", "3", "5"]
    m = discretize_(mlp(), keep="first")
    assert [d.name for d in discrete_parameters(m)] == ["3", "5"]
    m = discretize_(mlp(), keep=("last",), exclude=["3"])
    assert [d.name for d in discrete_parameters(m)] == ["0"]
    m = discretize_(mlp(), include=["0", "5"])  # include overrides keep
    assert [d.name for d in discrete_parameters(m)] == ["0", "5"]
    m = mlp()
    m0_bias = m[0].bias.detach().clone()
    discretize_(m, keep=())
    assert torch.equal(m[0].bias, m0_bias)  # biases stay full precision
    with pytest.raises(ValueError, match="already discrete"):
        discretize_(m, keep=())
    with pytest.raises(ValueError, match="include: module 'nope' does not exist"):
        discretize_(mlp(), include=["nope"])
    with pytest.raises(ValueError, match="exclude: module '1' is not a Linear"):
        discretize_(mlp(), exclude=["1"])
    with pytest.raises(ValueError, match="keep"):
        discretize_(mlp(), keep=("middle",))
    with pytest.raises(ValueError, match="include/exclude"):
        discretize_(mlp(), include=["3"], exclude=["3"])
    with pytest.raises(ValueError, match="init"):
        discretize_(mlp(), init="gauss")
    with pytest.raises(ValueError, match="scale"):
        discretize_(mlp(), scale="row")
    with pytest.raises(ValueError, match="train_scale"):
        discretize_(mlp(), train_scale=True)
    with pytest.raises(ValueError, match="levels"):
        discretize_(mlp(), levels="five")


def test_discretize_ternary_sign_init_thresholds():
    m = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[0.1, -0.7, 0.4, 0.8]]))  # mean|W| = 0.5, threshold 0.25
    discretize_(m, levels="ternary", keep=None)
    assert m.weight.tolist() == [[0.0, -1.0, 1.0, 1.0]]


def test_discretize_uniform_init_with_generator():
    a = discretize_(mlp(), levels=4, keep=None, init="uniform", generator=torch.Generator().manual_seed(3))
    b = discretize_(mlp(), levels=4, keep=None, init="uniform", generator=torch.Generator().manual_seed(3))
    g = uniform_grid(4)
    for da, db in zip(discrete_parameters(a), discrete_parameters(b)):
        assert da.grid == g and on_grid(da.param, g) and torch.equal(da.param, db.param)
    counts = torch.bincount(torch.searchsorted(g.tensor(), discrete_parameters(a)[0].param.reshape(-1)), minlength=16)
    assert (counts > 0).sum() >= 12  # 48 draws over 16 levels


@pytest.mark.parametrize("mode", ["tensor", "channel"])
@pytest.mark.parametrize("train", [False, True])
def test_discretize_scale_parametrization(mode, train):
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Conv2d(3, 4, 3))
    w = conv[1].weight.detach().clone()
    discretize_(conv, keep=("first",), scale=mode, train_scale=train)
    (d,) = discrete_parameters(conv)
    if mode == "tensor":
        alpha = w.abs().mean()
        assert d.scale.shape == ()
    else:
        alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True)
        assert d.scale.shape == (4, 1, 1, 1)
    codes = torch.where(w >= 0, 1.0, -1.0)
    assert torch.equal(d.param, codes) and on_grid(d.param, binary_grid())
    assert torch.allclose(d.scale, alpha) and torch.equal(conv[1].weight, d.scale * codes)
    assert d.param is conv[1].parametrizations.weight.original
    assert d.param_key == "1.parametrizations.weight.original"
    assert isinstance(d.scale, nn.Parameter) == train
    params = dict(conv.named_parameters())
    assert ("1.parametrizations.weight.0.alpha" in params) == train
    # gradient reaches codes (times alpha) and, if trainable, alpha
    x = torch.randn(2, 2, 7, 7)
    conv(x).sum().backward()
    assert d.param.grad is not None and d.param.grad.shape == codes.shape
    assert (d.scale.grad is not None) == train


def test_discretize_ternary_channel_scale_conv1d():
    m = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Linear(5, 2))
    discretize_(m, levels="ternary", keep=None, scale="channel")
    ds = discrete_parameters(m)
    assert [d.grid for d in ds] == [ternary_grid(), ternary_grid()]
    assert ds[0].scale.shape == (3, 1, 1) and ds[1].scale.shape == (2, 1)
    assert all(on_grid(d.param, ternary_grid()) for d in ds)


def test_scale_parametrization_module():
    p = ScaleParametrization(torch.tensor(2.0))
    assert p(torch.tensor([1.0, -1.0])).tolist() == [2.0, -2.0]
    assert "alpha" in dict(p.named_buffers())
