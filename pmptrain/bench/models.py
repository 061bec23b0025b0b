"""Model builders for ``pmptrain bench``, by name.

``build_model(name, input_shape, num_classes, **kw)`` returns a plain ``torch.nn.Module`` made of
Linear, Conv1d/Conv2d, BatchNorm, ReLU/Tanh, pooling, Dropout and Flatten (and parameter-free
wrappers around them: residual blocks, :class:`ChannelMean`) only, so every controlled layer is
visible to the PMP optimizers (and to discretisation) through ``named_modules()``. Construction is
deterministic given ``torch.manual_seed``: the only random numbers drawn are the layers' default
initialisations, in module order (and, for ``emsa_cnn``, its Glorot-uniform re-initialisation).

Inputs are channels-first: ``input_shape`` is ``(C, L)`` for 1-D signals (MNIST-1D: ``(1, 40)``),
``(C, H, W)`` for images (``(1, 28, 28)``, ``(3, 32, 32)``) or ``(F,)`` for flat features. Models
built for 1-D/2-D shapes pick Conv1d/Conv2d accordingly; MLPs flatten whatever they get.

=================  =========================================================================
name               network
=================  =========================================================================
``mlp``            Flatten → [Linear → (BN) → ReLU → (Dropout)]×len(widths) → Linear
``cnn_small``      [Conv(3) → (BN) → ReLU → MaxPool(2)]×len(channels) → FC(hidden) → ReLU → FC
``ref_mlp``        Li & Hao (2018) MNIST: 784-2048-2048-2048-10, no biases, BN after every layer
``ref_vgg``        Li & Hao CIFAR-10: C128-C128-MP-C256-C256-MP-C512-C512-MP-FC1024-FC1024-FC10
``ref_vgg_svhn``   the same with ``width_mult=0.5`` (half conv widths), their SVHN network
``restanh``        residual tanh network of the E-MSA toy (:class:`ResTanh`)
``emsa_cnn``       the E-MSA reference MNIST CNN (Li, Chen, Tai & E): tanh Conv5-AvgPool-Conv5-AvgPool,
                   two residual tanh convolutions with step 0.5, channel mean, Linear (:func:`emsa_cnn`)
``resnet_small``   CIFAR-style ResNet-(6n+2) (He et al., 2016, §4.2); ``resnet8``, ``resnet20``
``resnet``         ResNet-18 (four stages of two basic blocks, widths w, 2w, 4w, 8w; default
                   w = 64 as torchvision's) with a 3×3 stride-1 stem for 28×28 / 32×32 inputs
``mobilenet``      MobileNet-V3-small-style: inverted residuals with depthwise convolutions,
                   squeeze-and-excitation, hardswish (Howard et al., ICCV 2019, Table 2)
``gpt``            nanoGPT-style decoder-only transformer (:class:`GPT`): token and position
                   embeddings, pre-LayerNorm blocks, causal self-attention, GELU MLP, tied
                   output layer; ``input_shape = (T,)``, ``num_classes`` = vocabulary size
=================  =========================================================================

Everything is built from ``torch.nn`` layers (torchvision's CUDA wheel does not import against the
CPU torch this project pins, so the vision architectures are written here).

Reference: Q. Li and S. Hao, "An optimal control approach to deep learning and applications to
discrete-weight neural networks", ICML 2018 (networks as in their released notebooks; see
docs/discrete.md §3).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import nn

__all__ = [
    "MODELS",
    "build_model",
    "mlp",
    "cnn_small",
    "ref_mlp",
    "ref_vgg",
    "ResTanh",
    "restanh",
    "resnet_small",
    "resnet18",
    "mobilenet_v3_small",
    "GPT",
    "gpt",
    "BasicBlock",
    "emsa_cnn",
    "TanhResidualConv",
    "ChannelMean",
]


# --------------------------------------------------------------------------------------------
# validation helpers


def _shape(input_shape) -> Tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError:
        shape = (int(input_shape),) if isinstance(input_shape, int) else ()
    if not shape or any(s < 1 for s in shape) or len(shape) > 3:
        raise ValueError(f"input_shape must be 1 to 3 positive ints (F,), (C, L) or (C, H, W); "
                         f"got {input_shape!r}")
    return shape


def _pos_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _widths(name: str, v) -> Tuple[int, ...]:
    if isinstance(v, int):
        v = (v,)
    try:
        out = tuple(v)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of positive ints, got {v!r}") from None
    for w in out:
        _pos_int(name, w)
    return out


def _prob(name: str, v) -> float:
    if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {v!r}")
    return float(v)


def _spatial_layers(input_shape: Tuple[int, ...], what: str):
    """(ConvNd, BatchNormNd, MaxPoolNd, AdaptiveAvgPoolNd) for a (C, L) or (C, H, W) shape."""
    if len(input_shape) == 2:
        return nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d, nn.AdaptiveAvgPool1d
    if len(input_shape) == 3:
        return nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d
    raise ValueError(f"input_shape: {what} needs (C, L) or (C, H, W) inputs, got {input_shape}")


@torch.no_grad()
def _out_features(body: nn.Module, input_shape: Tuple[int, ...]) -> int:
    """Flattened output size of ``body`` for one input (a dry run on zeros; draws no RNG)."""
    was = body.training
    body.eval()
    n = body(torch.zeros(1, *input_shape)).numel()
    body.train(was)
    return n


# --------------------------------------------------------------------------------------------
# MLPs


def mlp(input_shape, num_classes: int, widths: Sequence[int] = (256, 256), batchnorm: bool = False,
        dropout: float = 0.0, bias: bool = True) -> nn.Sequential:
    """Multi-layer perceptron.

    ``Flatten → [Linear(d_{i-1}, d_i, bias) → BatchNorm1d(d_i)? → ReLU → Dropout(p)?]_i →
    Linear(d_last, num_classes, bias)`` with ``d_0 = prod(input_shape)``.

    Args:
        input_shape: shape of one example (flattened). num_classes: outputs.
        widths: hidden widths; default ``(256, 256)`` (``()`` gives a linear model).
        batchnorm: BatchNorm1d after each hidden Linear; default False.
        dropout: dropout probability after each hidden ReLU; default 0 (none).
        bias: biases in the Linear layers; default True.
    """
    shape = _shape(input_shape)
    num_classes = _pos_int("num_classes", num_classes)
    widths = _widths("widths", widths)
    dropout = _prob("dropout", dropout)
    layers = [nn.Flatten()]
    d = math.prod(shape)
    for w in widths:
        layers.append(nn.Linear(d, w, bias=bias))
        if batchnorm:
            layers.append(nn.BatchNorm1d(w))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        d = w
    layers.append(nn.Linear(d, num_classes, bias=bias))
    return nn.Sequential(*layers)


#: BatchNorm initialisations of the reference builders (``bn_init``): ``(eps, init)``.
BN_INITS = ("torch", "reference")


def _bn_options(bn_init, bn_eps) -> float:
    """Validate ``bn_init``/``bn_eps``; return the eps to build BatchNorm layers with."""
    if bn_init not in BN_INITS:
        raise ValueError(f"bn_init must be one of {', '.join(map(repr, BN_INITS))}, got {bn_init!r}")
    if bn_eps is None:
        return 1e-4 if bn_init == "reference" else 1e-5
    if isinstance(bn_eps, bool) or not isinstance(bn_eps, (int, float)) or not (0 < bn_eps < 1):
        raise ValueError(f"bn_eps must be a number in (0, 1) or None, got {bn_eps!r}")
    return float(bn_eps)


def _bn_init_(model: nn.Module, bn_init: str) -> nn.Module:
    """``bn_init="reference"``: every BatchNorm's scale and offset drawn from N(0, 1) truncated to
    [−2, 2] (TensorFlow's ``truncated_normal_initializer()``, the reference ``BatchNormLayer``),
    in module order, scale before offset, from torch's global RNG (so ``torch.manual_seed`` fixes
    them). ``"torch"``: left at torch's 1 and 0."""
    if bn_init == "reference":
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    nn.init.trunc_normal_(m.weight, 0.0, 1.0, -2.0, 2.0)
                    nn.init.trunc_normal_(m.bias, 0.0, 1.0, -2.0, 2.0)
    return model


def ref_mlp(input_shape=(1, 28, 28), num_classes: int = 10, widths: Sequence[int] = (2048, 2048, 2048),
            bn_init: str = "torch", bn_eps=None) -> nn.Sequential:
    """Reference discrete-protocol MLP (Li & Hao, ICML 2018, MNIST): 784-2048-2048-2048-10.

    ``Flatten → [Linear(no bias) → BatchNorm1d → ReLU]×3 → Linear(no bias) → BatchNorm1d``.
    Every Linear is a discrete layer (first and last included) followed by BatchNorm, whose
    affine parameters take the role of the biases. Parameters for 28×28 inputs:
    784·2048 + 2·2048² + 2048·10 = 10,014,720 weights and 2·(3·2048 + 10) = 12,308 BN affine.

    Args:
        widths: hidden widths; default ``(2048, 2048, 2048)``.
        bn_init: ``"torch"`` (default: scale 1, offset 0, eps 1e-5) or ``"reference"`` (the
            reference code's ``BatchNormLayer``, LiQianxiao/discrete-MSA ``layers.py``: scale and
            offset ~ N(0, 1) truncated to [−2, 2], eps 1e-4).
        bn_eps: BatchNorm eps overriding the one of ``bn_init`` (a number in (0, 1); default None).
    """
    shape = _shape(input_shape)
    num_classes = _pos_int("num_classes", num_classes)
    widths = _widths("widths", widths)
    eps = _bn_options(bn_init, bn_eps)
    layers = [nn.Flatten()]
    d = math.prod(shape)
    for w in widths:
        layers += [nn.Linear(d, w, bias=False), nn.BatchNorm1d(w, eps=eps), nn.ReLU()]
        d = w
    layers += [nn.Linear(d, num_classes, bias=False), nn.BatchNorm1d(num_classes, eps=eps)]
    return _bn_init_(nn.Sequential(*layers), bn_init)


# --------------------------------------------------------------------------------------------
# CNNs


def cnn_small(input_shape, num_classes: int, channels: Sequence[int] = (32, 64), hidden: int = 128,
              batchnorm: bool = False, dropout: float = 0.0, bias: bool = True) -> nn.Sequential:
    """Small CNN for 1-D (``(C, L)``, Conv1d) or 2-D (``(C, H, W)``, Conv2d) inputs.

    ``[Conv(k=3, pad=1, bias) → BN? → ReLU → MaxPool(2)]×len(channels) → Flatten →
    Linear(·, hidden) → ReLU → Dropout? → Linear(hidden, num_classes)``. For MNIST-1D (1, 40)
    the defaults give 40 → 20 → 10 positions; for 28×28, 7×7; for 32×32, 8×8.

    Args:
        channels: conv widths; default ``(32, 64)``. hidden: FC width; default 128.
        batchnorm: BatchNorm after each conv; default False. dropout: before the last Linear;
        default 0. bias: biases in conv and Linear layers; default True.
    """
    shape = _shape(input_shape)
    num_classes = _pos_int("num_classes", num_classes)
    channels = _widths("channels", channels)
    hidden = _pos_int("hidden", hidden)
    dropout = _prob("dropout", dropout)
    Conv, BN, Pool, _ = _spatial_layers(shape, "cnn_small")
    layers = []
    c = shape[0]
    for w in channels:
        layers.append(Conv(c, w, 3, padding=1, bias=bias))
        if batchnorm:
            layers.append(BN(w))
        layers += [nn.ReLU(), Pool(2)]
        c = w
    layers.append(nn.Flatten())
    feats = _out_features(nn.Sequential(*layers), shape)
    layers += [nn.Linear(feats, hidden, bias=bias), nn.ReLU()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, num_classes, bias=bias))
    return nn.Sequential(*layers)


#: Layer orders of :func:`ref_vgg` (``order``).
VGG_ORDERS = ("vgg", "reference")


def ref_vgg(input_shape=(3, 32, 32), num_classes: int = 10, width_mult: float = 1.0,
            fc_widths: Sequence[int] = (1024, 1024), order: str = "vgg", bn_init: str = "torch",
            bn_eps=None) -> nn.Sequential:
    """Reference discrete-protocol VGG-like net (Li & Hao, ICML 2018, CIFAR-10 / SVHN).

    C128-C128-MP-C256-C256-MP-C512-C512-MP-FC1024-FC1024-FC10: 3×3 convs (padding 1), 2×2 max
    pooling, no biases anywhere, BatchNorm after every conv and FC layer (the last included),
    ReLU after every BN but the last. ``width_mult`` scales the conv widths only (SVHN: 0.5 →
    64-64-128-128-256-256).

    Args:
        order: where the pooling sits in each stage of two convs.
            ``"vgg"`` (default, the common VGG order): ``Conv → BN → ReLU → Conv → BN → ReLU → Pool``.
            ``"reference"`` (the reference notebooks, LiQianxiao/discrete-MSA
            ``cifar10_conv_*.ipynb``/``svhn_conv_*.ipynb``): ``Conv → BN → ReLU → Conv → Pool →
            BN → ReLU`` (the pooled conv is normalised after pooling). Same parameters either way.
        bn_init, bn_eps: as in :func:`ref_mlp` (``"reference"``: truncated-normal N(0, 1) scale and
            offset, eps 1e-4).
    """
    shape = _shape(input_shape)
    num_classes = _pos_int("num_classes", num_classes)
    if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or width_mult <= 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult!r}")
    fc_widths = _widths("fc_widths", fc_widths)
    if order not in VGG_ORDERS:
        raise ValueError(f"order must be one of {', '.join(map(repr, VGG_ORDERS))}, got {order!r}")
    eps = _bn_options(bn_init, bn_eps)
    Conv, BN, Pool, _ = _spatial_layers(shape, "ref_vgg")
    layers = []
    c = shape[0]
    for base in (128, 256, 512):
        w = max(1, int(round(base * width_mult)))
        layers += [Conv(c, w, 3, padding=1, bias=False), BN(w, eps=eps), nn.ReLU()]
        if order == "reference":
            layers += [Conv(w, w, 3, padding=1, bias=False), Pool(2), BN(w, eps=eps), nn.ReLU()]
        else:
            layers += [Conv(w, w, 3, padding=1, bias=False), BN(w, eps=eps), nn.ReLU(), Pool(2)]
        c = w
    layers.append(nn.Flatten())
    d = _out_features(nn.Sequential(*layers), shape)
    for w in fc_widths:
        layers += [nn.Linear(d, w, bias=False), nn.BatchNorm1d(w, eps=eps), nn.ReLU()]
        d = w
    layers += [nn.Linear(d, num_classes, bias=False), nn.BatchNorm1d(num_classes, eps=eps)]
    return _bn_init_(nn.Sequential(*layers), bn_init)


# --------------------------------------------------------------------------------------------
# residual tanh network (E-MSA toy)


class TanhResidualBlock(nn.Module):
    """``h ← h + step · tanh(W h + b)`` with ``W, b`` one ``nn.Linear(width, width)``."""

    def __init__(self, width: int, step: float = 1.0):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.step = step

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.step * torch.tanh(self.linear(h))


class ResTanh(nn.Module):
    """Residual tanh network of the E-MSA toy problem (a forward-Euler discretised ODE).

    ``h_0 = A x + a`` (``self.inp = Linear(in_features, width)``), then ``depth`` blocks
    ``h_{t+1} = h_t + step · tanh(W_t h_t + b_t)`` (``self.blocks[t].linear``), then
    ``y = C h_T + c`` (``self.out = Linear(width, out_features)``). Inputs of any shape
    ``(N, ...)`` are flattened to ``(N, in_features)``.

    Args:
        depth: number of residual blocks; default 20. width: state dimension; default 5.
        in_features, out_features: default 1, 1 (scalar regression, e.g. fitting ``sin``).
        step: the Euler step ``δt`` multiplying each residual; default 1.0.
    """

    def __init__(self, depth: int = 20, width: int = 5, in_features: int = 1, out_features: int = 1,
                 step: float = 1.0):
        super().__init__()
        for name, v in (("depth", depth), ("width", width), ("in_features", in_features),
                        ("out_features", out_features)):
            _pos_int(name, v)
        if not isinstance(step, (int, float)) or not step > 0:
            raise ValueError(f"step must be > 0, got {step!r}")
        self.depth, self.width = depth, width
        self.inp = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(TanhResidualBlock(width, float(step)) for _ in range(depth))
        self.out = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def restanh(input_shape=(1,), num_classes: int = 1, depth: int = 20, width: int = 5,
            step: float = 1.0) -> ResTanh:
    """:class:`ResTanh` with ``in_features = prod(input_shape)`` and ``out_features = num_classes``."""
    shape = _shape(input_shape)
    return ResTanh(depth, width, math.prod(shape), _pos_int("num_classes", num_classes), step)


# --------------------------------------------------------------------------------------------
# small ResNet


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(BN(conv(relu(BN(conv(x))))) + shortcut(x))``.

    Both convs are 3×3 (padding 1), the first with ``stride``; the shortcut is the identity,
    or ``BN(conv1×1(x, stride))`` when the shape changes (He et al. 2016, option B).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, Conv, BN, bias: bool = False):
        super().__init__()
        self.conv1 = Conv(c_in, c_out, 3, stride=stride, padding=1, bias=bias)
        self.bn1 = BN(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = Conv(c_out, c_out, 3, stride=1, padding=1, bias=bias)
        self.bn2 = BN(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(Conv(c_in, c_out, 1, stride=stride, bias=bias), BN(c_out))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(h)) + self.shortcut(x))


def resnet_small(input_shape=(3, 32, 32), num_classes: int = 10, depth: int = 8, width: int = 16,
                 bias: bool = False) -> nn.Sequential:
    """CIFAR-style ResNet-``depth`` (He et al., "Deep residual learning", CVPR 2016, §4.2).

    ``depth = 6n + 2``: a 3×3 stem conv (``width`` channels) + BN + ReLU, three stages of ``n``
    :class:`BasicBlock` with ``width, 2·width, 4·width`` channels (stride 1, 2, 2), global
    average pooling and a Linear classifier. ``depth=8`` (n=1, ~78k parameters at width 16) and
    ``depth=20`` (n=3, ~0.27M) are the usual small ones. Works for 32×32, 28×28 and 1-D inputs.

    Args:
        depth: 6n+2 with n ≥ 1; default 8. width: channels of the first stage; default 16.
        bias: biases in the convs (BN follows each); default False. The classifier has a bias.
    """
    shape = _shape(input_shape)
    num_classes = _pos_int("num_classes", num_classes)
    width = _pos_int("width", width)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n+2 with n >= 1 (8, 14, 20, 32, ...), got {depth!r}")
    Conv, BN, _, AvgPool = _spatial_layers(shape, "resnet_small")
    n = (depth - 2) // 6
    layers = [Conv(shape[0], width, 3, padding=1, bias=bias), BN(width), nn.ReLU()]
    c = width
    for stage, w in enumerate((width, 2 * width, 4 * width)):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            layers.append(BasicBlock(c, w, stride, Conv, BN, bias))
            c = w
    layers += [AvgPool(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)


def resnet18(input_shape=(3, 32, 32), num_classes: int = 10, width: int = 64, bias: bool = False) -> nn.Sequential:
    """ResNet-18 (He et al. 2016; torchvision's layout: [2, 2, 2, 2] basic blocks with widths
    ``w, 2w, 4w, 8w``, strides 1, 2, 2, 2) for small images: the 7×7 stride-2 stem and max-pool are
    a 3×3 stride-1 conv (the usual CIFAR adaptation). 11.2M parameters at ``width=64``; 1-D
    ``(C, L)`` inputs get Conv1d/BatchNorm1d.

    Args:
        width: channels of the first stage (default 64). bias: conv biases (default False; BN
            follows every conv).
    """
    shape = _shape(input_shape)
    num_classes = _pos_int("num_classes", num_classes)
    width = _pos_int("width", width)
    Conv, BN, _, AvgPool = _spatial_layers(shape, "resnet18")
    layers = [Conv(shape[0], width, 3, padding=1, bias=bias), BN(width), nn.ReLU()]
    c = width
    for stage in range(4):
        w = width * 2 ** stage
        for i in range(2):
            layers.append(BasicBlock(c, w, 2 if (stage > 0 and i == 0) else 1, Conv, BN, bias))
            c = w
    layers += [AvgPool(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: ``x · hardsigmoid(W₂ relu(W₁ mean(x)))`` with 1×1 convolutions."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    """MobileNet-V3 bottleneck: 1×1 expansion, k×k depthwise conv (``groups = channels``),
    optional squeeze-and-excitation, 1×1 projection; a residual connection when shapes agree."""

    def __init__(self, c_in: int, k: int, expand: int, c_out: int, se: bool, act: str, stride: int):
        super().__init__()
        Act = nn.Hardswish if act == "hs" else nn.ReLU
        layers = []
        if expand != c_in:
            layers += [nn.Conv2d(c_in, expand, 1, bias=False), nn.BatchNorm2d(expand), Act()]
        layers += [nn.Conv2d(expand, expand, k, stride, k // 2, groups=expand, bias=False),
                   nn.BatchNorm2d(expand), Act()]
        if se:
            layers.append(SqueezeExcite(expand, max(8, expand // 4)))
        layers += [nn.Conv2d(expand, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


#: MobileNet-V3-small bottlenecks (kernel, expansion, out, SE, activation, stride), Table 2.
_MBV3_SMALL = [(3, 16, 16, True, "re", 2), (3, 72, 24, False, "re", 2), (3, 88, 24, False, "re", 1),
               (5, 96, 40, True, "hs", 2), (5, 240, 40, True, "hs", 1), (5, 240, 40, True, "hs", 1),
               (5, 120, 48, True, "hs", 1), (5, 144, 48, True, "hs", 1), (5, 288, 96, True, "hs", 2),
               (5, 576, 96, True, "hs", 1), (5, 576, 96, True, "hs", 1)]


def mobilenet_v3_small(input_shape=(3, 32, 32), num_classes: int = 10, width_mult: float = 1.0,
                       dropout: float = 0.2) -> nn.Sequential:
    """MobileNet-V3-small (Howard et al., "Searching for MobileNetV3", ICCV 2019, Table 2): a 3×3
    stride-2 stem, the 11 bottlenecks of :data:`_MBV3_SMALL` (11 depthwise convolutions), a 1×1 conv
    to 576·width_mult channels, global pooling, Linear 1024 → hardswish → dropout → Linear.

    Args:
        width_mult: channel multiplier (default 1.0; channels rounded to multiples of 8).
        dropout: before the classifier (default 0.2).
    """
    shape = _shape(input_shape)
    if len(shape) != 3:
        raise ValueError(f"mobilenet needs (C, H, W) inputs, got {shape}")
    num_classes = _pos_int("num_classes", num_classes)
    _prob("dropout", dropout)

    def ch(c):
        return max(8, int(c * width_mult + 4) // 8 * 8)

    c = ch(16)
    layers = [nn.Conv2d(shape[0], c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.Hardswish()]
    for k, e, o, se, act, s in _MBV3_SMALL:
        layers.append(InvertedResidual(c, k, ch(e), ch(o), se, act, s))
        c = ch(o)
    last = ch(576)
    layers += [nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last), nn.Hardswish(),
               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, 1024), nn.Hardswish(),
               nn.Dropout(dropout), nn.Linear(1024, num_classes)]
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------
# a small GPT


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused ``c_attn`` projection (nanoGPT's layout)."""

    def __init__(self, n_embd: int, n_head: int, bias: bool):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class GPTBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln₁(x))``, then ``x + mlp(ln₂(x))``."""

    def __init__(self, n_embd: int, n_head: int, bias: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd, bias=bias), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd, bias=bias))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A nanoGPT-style decoder-only transformer (Karpathy's nanoGPT, after GPT-2).

    ``wte`` (token embedding) and ``wpe`` (learned positions) → ``n_layer`` :class:`GPTBlock` →
    ``ln_f`` → ``lm_head``, whose weight is ``wte.weight`` (tied). Initialisation as nanoGPT:
    N(0, 0.02) for Linear and Embedding weights, residual projections scaled by ``1/√(2·n_layer)``,
    zero biases. ``forward(idx)`` maps ``[B, T]`` token ids to ``[B, T, vocab]`` logits.
    """

    def __init__(self, vocab_size: int = 256, block_size: int = 128, n_layer: int = 2, n_head: int = 4,
                 n_embd: int = 128, bias: bool = True):
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(GPTBlock(n_embd, n_head, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))
            elif p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("bias") and "ln" not in name:
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def gpt(input_shape=(128,), num_classes: int = 256, n_layer: int = 2, n_head: int = 4, n_embd: int = 128,
        bias: bool = True) -> GPT:
    """:class:`GPT` with ``block_size = input_shape[0]`` and ``vocab_size = num_classes``."""
    shape = _shape(input_shape)
    if len(shape) != 1:
        raise ValueError(f"gpt needs input_shape (T,), got {shape}")
    return GPT(_pos_int("num_classes", num_classes), shape[0], _pos_int("n_layer", n_layer),
               _pos_int("n_head", n_head), _pos_int("n_embd", n_embd), bool(bias))


# --------------------------------------------------------------------------------------------
# the E-MSA reference MNIST CNN (Li, Chen, Tai & E, JMLR 2018; their released main_mnist.py)


class ChannelMean(nn.Module):
    """``x ↦ mean(x, dim=1, keepdim=True)``: the average over the channels of a ``(N, C, ...)``
    tensor (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1, keepdim=True)


class TanhResidualConv(nn.Module):
    """``h ← h + step · tanh(conv(h))`` with ``conv`` one ``nn.Conv2d(channels, channels, k)``
    ("same" zero padding, stride 1, with bias): one convolution per residual block."""

    def __init__(self, channels: int, kernel_size: int = 3, step: float = 0.5):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.step = step

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.step * torch.tanh(self.conv(h))


def emsa_cnn(input_shape=(1, 28, 28), num_classes: int = 10, channels: int = 5, kernel_size: int = 3,
             depth: int = 2, step: float = 0.5) -> nn.Sequential:
    """The tiny CNN of the reference E-MSA MNIST experiment (Li, Chen, Tai & E, JMLR 2018; the
    authors' ``LiQianxiao/MaxPrinciple-DeepLearning``, ``main_mnist.py`` and ``config.yml``):

    ``Conv(c, k) → Tanh → AvgPool(2) → Conv(c, k) → Tanh → AvgPool(2)
    → [h ← h + step·tanh(Conv(c, k)(h))]×depth → ChannelMean → Flatten → Linear(num_classes)``

    All convolutions are 2-D, stride 1, "same" zero padding (``k // 2``), with biases; the pooling
    is 2×2 average pooling with stride 2 that, like TensorFlow's ``padding="same"``, keeps a
    partial last window on odd sizes and averages only the entries inside the image
    (``ceil_mode=True``). The channel mean reduces ``(N, c, H/4, W/4)`` to one map, flattened to
    ``H/4 · W/4`` features (49 for 28×28) for the linear output layer (logits; no activation).
    Every weight is Glorot-uniform (``nn.init.xavier_uniform_``, TensorFlow's default kernel
    initialiser) and every bias zero, as in the reference. For MNIST the reference values are the
    defaults (``c = 5``, ``k = 3``, ``depth = 2``, ``step = 0.5``): 1,240 parameters.

    Args:
        input_shape: ``(C, H, W)``; default ``(1, 28, 28)``. num_classes: outputs; default 10.
        channels: ``c``, channels of every convolution; default 5. kernel_size: odd ``k``; default 3.
        depth: number of residual convolutions; default 2 (may be 0).
        step: the residual step (the reference's ``delta``) multiplying each residual; default 0.5.

    Raises:
        ValueError: a shape that is not ``(C, H, W)``, an even or non-positive ``kernel_size``, a
        negative ``depth`` or a non-positive ``step`` (each named).
    """
    shape = _shape(input_shape)
    if len(shape) != 3:
        raise ValueError(f"input_shape: emsa_cnn needs (C, H, W) images, got {shape}")
    c, k = _pos_int("channels", channels), _pos_int("kernel_size", kernel_size)
    if k % 2 == 0:
        raise ValueError(f"kernel_size must be odd (\"same\" padding), got {k}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be a non-negative int, got {depth!r}")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) or not step > 0:
        raise ValueError(f"step must be a finite number > 0, got {step!r}")
    h, w = shape[1:]
    for _ in range(2):
        h, w = -(-h // 2), -(-w // 2)
    layers = [nn.Conv2d(shape[0], c, k, padding=k // 2), nn.Tanh(), nn.AvgPool2d(2, 2, ceil_mode=True),
              nn.Conv2d(c, c, k, padding=k // 2), nn.Tanh(), nn.AvgPool2d(2, 2, ceil_mode=True)]
    layers += [TanhResidualConv(c, k, float(step)) for _ in range(depth)]
    layers += [ChannelMean(), nn.Flatten(), nn.Linear(h * w, _pos_int("num_classes", num_classes))]
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return net


# --------------------------------------------------------------------------------------------
# registry


def _ref_vgg_svhn(input_shape=(3, 32, 32), num_classes: int = 10, **kw) -> nn.Sequential:
    kw.setdefault("width_mult", 0.5)
    return ref_vgg(input_shape, num_classes, **kw)


def _resnet(depth: int) -> Callable[..., nn.Module]:
    def build(input_shape=(3, 32, 32), num_classes: int = 10, **kw) -> nn.Module:
        if "depth" in kw:
            raise ValueError(f"depth: resnet{depth} fixes depth={depth}; use resnet_small(depth=...)")
        return resnet_small(input_shape, num_classes, depth=depth, **kw)

    return build


#: Builders by name: ``MODELS[name](input_shape, num_classes, **kw)``.
MODELS: Dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn_small": cnn_small,
    "ref_mlp": ref_mlp,
    "ref_vgg": ref_vgg,
    "ref_vgg_svhn": _ref_vgg_svhn,
    "restanh": restanh,
    "resnet_small": resnet_small,
    "resnet8": _resnet(8),
    "resnet20": _resnet(20),
    "resnet": resnet18,
    "resnet18": resnet18,
    "mobilenet": mobilenet_v3_small,
    "gpt": gpt,
    "emsa_cnn": emsa_cnn,
}


def build_model(name: str, input_shape, num_classes: int, **kw) -> nn.Module:
    """Build model ``name`` (see ``MODELS``; ``-`` and ``_`` are interchangeable, case ignored).

    Args:
        name: registry name, e.g. ``"mlp"``, ``"cnn-small"``, ``"ref_mlp"``, ``"resnet20"``.
        input_shape: one example's shape, channels first. num_classes: number of outputs.
        **kw: builder-specific options (e.g. ``widths=(512,)``, ``batchnorm=True``,
            ``width_mult=0.5``); an unknown option raises ``TypeError`` naming it.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names) or bad arguments.
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in MODELS:
        raise ValueError(f"name: unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    return MODELS[key](input_shape, num_classes, **kw)
