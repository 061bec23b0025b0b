"""Tests of pmptrain.bench.models: shapes, hand-counted parameters, registry errors."""

import pytest
import torch
from torch import nn

from pmptrain.bench import models as M

SHAPES = [(1, 40), (1, 28, 28), (3, 32, 32)]
ALLOWED = (nn.Sequential, nn.ModuleList, nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d,
           nn.BatchNorm2d, nn.ReLU, nn.Tanh, nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveAvgPool1d,
           nn.AdaptiveAvgPool2d, nn.Dropout, nn.Flatten, M.BasicBlock, M.ResTanh,
           M.TanhResidualBlock)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# resnet20/ref_vgg on 32x32 are the slowest forward passes; batch 2 keeps them well under 1 s.
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["mlp", "cnn_small", "ref_mlp", "ref_vgg", "ref_vgg_svhn",
                                  "resnet_small", "resnet8", "resnet20"])
def test_output_shapes(name, shape):
    torch.manual_seed(0)
    m = M.build_model(name, shape, 7)
    assert all(isinstance(mod, ALLOWED) for mod in m.modules()), name
    y = m(torch.randn(2, *shape))
    assert y.shape == (2, 7)
    y.sum().backward()  # trainable end to end
    m.eval()
    assert m(torch.randn(1, *shape)).shape == (1, 7)


def test_deterministic_given_seed():
    for name in ("mlp", "cnn_small", "resnet8"):
        torch.manual_seed(3)
        a = M.build_model(name, (1, 28, 28), 10)
        torch.manual_seed(3)
        b = M.build_model(name, (1, 28, 28), 10)
        for p, q in zip(a.state_dict().values(), b.state_dict().values()):
            assert torch.equal(p, q)


def test_mlp_options():
    m = M.mlp((1, 40), 10, widths=(16, 8), batchnorm=True, dropout=0.5, bias=False)
    linears = [l for l in m if isinstance(l, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(40, 16), (16, 8), (8, 10)]
    assert all(l.bias is None for l in linears)
    assert sum(isinstance(l, nn.BatchNorm1d) for l in m) == 2
    assert sum(isinstance(l, nn.Dropout) for l in m) == 2
    assert n_params(M.mlp((40,), 10, widths=(16,))) == 40 * 16 + 16 + 16 * 10 + 10
    assert n_params(M.mlp((40,), 3, widths=())) == 40 * 3 + 3  # linear model


def test_ref_mlp_parameter_count():
    m = M.build_model("ref_mlp", (1, 28, 28), 10)
    weights = 784 * 2048 + 2048 * 2048 + 2048 * 2048 + 2048 * 10  # 10,014,720, no biases
    bn_affine = 2 * (2048 + 2048 + 2048 + 10)  # gamma and beta of the 4 BatchNorms
    assert n_params(m) == weights + bn_affine == 10_027_028
    linears = [l for l in m if isinstance(l, nn.Linear)]
    assert len(linears) == 4 and all(l.bias is None for l in linears)
    assert sum(isinstance(l, nn.BatchNorm1d) for l in m) == 4  # BN after every layer, last too


def test_ref_vgg_structure():
    m = M.build_model("ref_vgg", (3, 32, 32), 10)
    convs = [l for l in m if isinstance(l, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [128, 128, 256, 256, 512, 512]
    assert all(c.kernel_size == (3, 3) and c.bias is None for c in convs)
    fcs = [l for l in m if isinstance(l, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(512 * 16, 1024), (1024, 1024), (1024, 10)]
    assert all(f.bias is None for f in fcs)
    assert sum(isinstance(l, (nn.BatchNorm1d, nn.BatchNorm2d)) for l in m) == 9
    svhn = M.build_model("ref-vgg-svhn", (3, 32, 32), 10)
    assert [c.out_channels for c in svhn if isinstance(c, nn.Conv2d)] == [64, 64, 128, 128, 256, 256]
    assert [c.out_channels for c in M.ref_vgg(width_mult=0.5) if isinstance(c, nn.Conv2d)][-1] == 256


def test_restanh():
    m = M.ResTanh()
    assert len(m.blocks) == 20 and m.width == 5
    assert all(b.linear.in_features == b.linear.out_features == 5 for b in m.blocks)
    assert n_params(m) == (1 * 5 + 5) + 20 * (5 * 5 + 5) + (5 * 1 + 1)
    x = torch.linspace(-1, 1, 11).unsqueeze(1)
    assert m(x).shape == (11, 1)
    # the forward pass is the stated recursion
    h = m.inp(x)
    for b in m.blocks:
        h = h + torch.tanh(b.linear(h))
    torch.testing.assert_close(m(x), m.out(h))
    m2 = M.build_model("restanh", (3,), 2, depth=4, width=6)
    assert len(m2.blocks) == 4 and m2(torch.randn(5, 3)).shape == (5, 2)


def test_resnet_depths():
    def blocks(m):
        return sum(isinstance(b, M.BasicBlock) for b in m.modules())

    assert blocks(M.build_model("resnet8", (3, 32, 32), 10)) == 3
    assert blocks(M.build_model("resnet20", (3, 32, 32), 10)) == 9
    assert blocks(M.resnet_small((1, 28, 28), 10, depth=14)) == 6
    with pytest.raises(ValueError, match="depth"):
        M.resnet_small(depth=10)


def test_cnn_small_conv_dims():
    assert any(isinstance(l, nn.Conv1d) for l in M.cnn_small((1, 40), 10))
    assert any(isinstance(l, nn.Conv2d) for l in M.cnn_small((3, 32, 32), 10))
    with pytest.raises(ValueError, match="input_shape"):
        M.cnn_small((40,), 10)


def test_errors():
    with pytest.raises(ValueError) as e:
        M.build_model("transformer", (1, 40), 10)
    for name in ("mlp", "cnn_small", "ref_mlp", "ref_vgg", "restanh", "resnet_small"):
        assert name in str(e.value)
    with pytest.raises(ValueError, match="num_classes"):
        M.build_model("mlp", (1, 40), 0)
    with pytest.raises(ValueError, match="input_shape"):
        M.build_model("mlp", (0, 40), 10)
    with pytest.raises(ValueError, match="widths"):
        M.mlp((40,), 10, widths=(16, -1))
    with pytest.raises(ValueError, match="dropout"):
        M.mlp((40,), 10, dropout=1.0)
    with pytest.raises(ValueError, match="width_mult"):
        M.ref_vgg(width_mult=0)
    with pytest.raises(TypeError):
        M.build_model("mlp", (40,), 10, no_such_option=1)


def test_emsa_cnn_is_the_reference_network():
    """The E-MSA reference MNIST CNN (main_mnist.py/config.yml of LiQianxiao/MaxPrinciple-DeepLearning):
    layer order, hand-counted parameters, Glorot-uniform weights and zero biases, and the forward
    pass recomputed with functional ops (so the residual step 0.5 and the channel mean are checked)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    m = M.build_model("emsa-cnn", (1, 28, 28), 10)
    kinds = [type(l) for l in m]
    assert kinds == [nn.Conv2d, nn.Tanh, nn.AvgPool2d, nn.Conv2d, nn.Tanh, nn.AvgPool2d,
                     M.TanhResidualConv, M.TanhResidualConv, M.ChannelMean, nn.Flatten, nn.Linear]
    convs = [l for l in m.modules() if isinstance(l, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == \
        [(1, 5, (3, 3), (1, 1))] + [(5, 5, (3, 3), (1, 1))] * 3
    assert (m[10].in_features, m[10].out_features) == (49, 10)
    # 1·5·9+5, 5·5·9+5 three times, 49·10+10
    assert n_params(m) == 50 + 3 * 230 + 500 == 1240
    for layer in convs + [m[10]]:
        fan_in = layer.weight[0].numel()
        fan_out = layer.weight.shape[0] * layer.weight[0, 0].numel()
        limit = (6.0 / (fan_in + fan_out)) ** 0.5
        assert layer.weight.abs().max() <= limit
        assert layer.weight.abs().max() > 0.8 * limit  # Glorot's bound, not torch's default 1/sqrt(fan_in)
        assert torch.count_nonzero(layer.bias) == 0
    with torch.no_grad():
        for p in m.parameters():  # non-zero biases, so that a dropped bias would show
            p.add_(0.1 * torch.randn_like(p))
    x = torch.rand(4, 1, 28, 28)
    h = F.avg_pool2d(torch.tanh(F.conv2d(x, convs[0].weight, convs[0].bias, padding=1)), 2)
    h = F.avg_pool2d(torch.tanh(F.conv2d(h, convs[1].weight, convs[1].bias, padding=1)), 2)
    for c in convs[2:]:
        h = h + 0.5 * torch.tanh(F.conv2d(h, c.weight, c.bias, padding=1))
    want = h.mean(1).reshape(4, 49) @ m[10].weight.T + m[10].bias
    torch.testing.assert_close(m(x), want)


def test_emsa_cnn_options_odd_sizes_and_errors():
    m = M.emsa_cnn((3, 7, 9), 4, channels=2, kernel_size=5, depth=3, step=0.25)
    assert sum(isinstance(l, M.TanhResidualConv) for l in m) == 3
    assert all(b.step == 0.25 and b.conv.kernel_size == (5, 5) for b in m if isinstance(b, M.TanhResidualConv))
    assert m[-1].in_features == 2 * 3  # 7x9 -> 4x5 -> 2x3 (TensorFlow "same" pooling)
    assert m(torch.randn(2, 3, 7, 9)).shape == (2, 4)
    # a partial window averages only the entries inside the image (no zero padding counted)
    x = torch.ones(1, 1, 3, 3)
    torch.testing.assert_close(m[2](x), torch.ones(1, 1, 2, 2))
    assert sum(isinstance(l, M.TanhResidualConv) for l in M.emsa_cnn(depth=0)) == 0
    for kw, word in (({"kernel_size": 4}, "kernel_size"), ({"depth": -1}, "depth"), ({"step": 0}, "step"),
                     ({"channels": 0}, "channels"), ({"step": float("nan")}, "step")):
        with pytest.raises(ValueError, match=word):
            M.emsa_cnn(**kw)
    with pytest.raises(ValueError, match="input_shape"):
        M.emsa_cnn((1, 40))
