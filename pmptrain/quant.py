"""Low-precision layers: activation quantisers with straight-through gradients and ``discretize_``.

Activation quantisers are plain functions first (:func:`sign_ste`, :func:`uniform_quantize_ste`), thin
modules second (:class:`SignActivation`, :class:`QuantizedActivation`). With them in a network the
MSA costates ``p̂ = -B ∂J/∂y`` flow backwards through the *pseudo-gradient* stated in each docstring.

:func:`discretize_` puts the weights of ``Linear``/``Conv1d``/``Conv2d`` modules onto a grid in place
(docs/discrete.md); :func:`discrete_parameters` lists them for the discrete optimizers
(``DiscreteMSA``, ``BinaryConnect``, ``TWN``, ``Bop``) and for export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .discrete import Grid, init_scale, make_grid, nearest_on_grid, sign_nonzero
from .modules import is_weight_layer

__all__ = [
    "sign_ste",
    "uniform_quantize_ste",
    "SignActivation",
    "QuantizedActivation",
    "discretize_",
    "discrete_parameters",
    "is_discrete_module",
    "DiscreteTensor",
    "DiscreteSpec",
    "ScaleParametrization",
]
_SPEC_ATTR = "_pmp_discrete"


# ---------------------------------------------------------------------------- activations


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return sign_nonzero(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)


def sign_ste(x: Tensor) -> Tensor:
    """Binary activation with a straight-through pseudo-gradient.

    Forward:  ``y = sign(x) = +1 if x >= 0 else -1``   (convention **sign(0) = +1**, as larq; never 0).
    Backward: ``∂y/∂x := 1{|x| <= 1}`` (the gradient of ``hardtanh``; 1 at ``|x| = 1`` inclusive, so
    ``x = ±1`` pass the gradient and ``|x| > 1`` blocks it).

    NaN inputs give NaN outputs.
    """
    return _SignSTE.apply(x)


class _UniformSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, bits: int, low: float, high: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.low, ctx.high = low, high
        n = 2**bits
        levels = torch.tensor([(low * (n - 1 - i) + high * i) / (n - 1) for i in range(n)], dtype=x.dtype, device=x.device)
        mids = (levels[1:] + levels[:-1]) / 2
        y = levels[torch.searchsorted(mids, x.detach().contiguous(), right=True)]
        return torch.where(torch.isnan(x), x, y)

    @staticmethod
    def backward(ctx, g: Tensor):
        (x,) = ctx.saved_tensors
        inside = (x >= ctx.low) & (x <= ctx.high)
        return g * inside.to(g.dtype), None, None, None


def _check_quant_args(bits, low, high) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits: need an int in [1, 16], got {bits!r}")
    if isinstance(low, bool) or isinstance(high, bool):
        raise ValueError(f"low/high: need numbers, got low={low!r}, high={high!r}")
    if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and float(low) < float(high)):
        raise ValueError(f"low/high: need numbers with low < high, got low={low!r}, high={high!r}")


def uniform_quantize_ste(x: Tensor, bits: int, low: float = -1.0, high: float = 1.0) -> Tensor:
    """k-bit uniform activation quantiser with a straight-through pseudo-gradient.

    With ``k = bits``, ``a = low``, ``b = high``, ``Δ = (b - a)/(2^k - 1)``:

    Forward:  ``y = a + Δ · floor( (clip(x, a, b) - a)/Δ + 1/2 )``  — the nearest of the ``2^k``
    levels ``l_i = a + iΔ``, an exact midpoint going *up*. Implemented by comparing ``x`` with the
    midpoints ``(l_i + l_{i+1})/2`` (no rounding of ``(x - a)/Δ``), so on ``[-1, 1]`` the levels are
    exactly ``uniform_grid(k).values`` and ``k = 1`` reproduces :func:`sign_ste` (0 -> +1) bit for bit.
    NaN propagates.
    Backward: ``∂y/∂x := 1{a <= x <= b}`` (straight-through inside the range, boundaries inclusive).

    Args:
        x: input tensor.
        bits: k in [1, 16].
        low, high: the range ``[a, b]`` (default ``[-1, 1]``; ``[0, 1]`` suits post-ReLU values).
    """
    _check_quant_args(bits, low, high)
    return _UniformSTE.apply(x, bits, float(low), float(high))


class SignActivation(nn.Module):
    """Module form of :func:`sign_ste`: ``y = sign(x)`` (sign(0)=+1), pseudo-gradient ``1{|x|<=1}``."""

    def forward(self, x: Tensor) -> Tensor:
        return sign_ste(x)


class QuantizedActivation(nn.Module):
    """Module form of :func:`uniform_quantize_ste` (defaults ``low=-1.0``, ``high=1.0``)."""

    def __init__(self, bits: int, low: float = -1.0, high: float = 1.0) -> None:
        super().__init__()
        _check_quant_args(bits, low, high)
        self.bits, self.low, self.high = bits, float(low), float(high)

    def forward(self, x: Tensor) -> Tensor:
        return uniform_quantize_ste(x, self.bits, self.low, self.high)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, low={self.low}, high={self.high}"


# ------------------------------------------------------------------------------ discretize_


class ScaleParametrization(nn.Module):
    """``weight = α · codes``: the parametrization registered on the ``weight`` of scaled discrete
    layers. ``α`` is an ``nn.Parameter`` named ``alpha`` when trainable, else a buffer ``alpha``;
    shape ``[]`` (per tensor) or ``[C_out, 1, ...]`` (per output channel)."""

    def __init__(self, alpha: Tensor, trainable: bool = False) -> None:
        super().__init__()
        if trainable:
            self.alpha = nn.Parameter(alpha.detach().clone())
        else:
            self.register_buffer("alpha", alpha.detach().clone())

    def forward(self, codes: Tensor) -> Tensor:
        return self.alpha * codes


@dataclass(frozen=True)
class DiscreteSpec:
    """What :func:`discretize_` recorded on a module: the grid, the scale mode (None, "tensor",
    "channel") and whether the scale is trainable."""

    grid: Grid
    scale: Optional[str] = None
    train_scale: bool = False

    def to_dict(self) -> dict:
        return {"grid": self.grid.to_dict(), "scale": self.scale, "train_scale": self.train_scale}

    @classmethod
    def from_dict(cls, d: dict) -> "DiscreteSpec":
        """The spec of :meth:`to_dict`'s mapping, checked field by field (a packed file's manifest
        is input): ``grid`` (:meth:`Grid.from_dict`), ``scale`` one of null, ``"tensor"``,
        ``"channel"``, ``train_scale`` true or false (``"no"`` is refused, not read as true) and
        only with a scale; other keys are refused. Raises ``ValueError`` naming the field."""
        if not isinstance(d, dict):
            raise ValueError(f"spec: must be a mapping {{grid, scale, train_scale}}, got {d!r}")
        unknown = sorted(set(d) - {"grid", "scale", "train_scale"})
        if unknown:
            raise ValueError(f"spec: unknown field(s) {unknown}")
        if "grid" not in d:
            raise ValueError("spec: lacks the field 'grid'")
        scale, train_scale = d.get("scale"), d.get("train_scale", False)
        if scale not in (None, "tensor", "channel"):
            raise ValueError(f"spec scale: must be null, 'tensor' or 'channel', got {scale!r}")
        if not isinstance(train_scale, bool):
            raise ValueError(f"spec train_scale: must be true or false, got {train_scale!r}")
        if train_scale and scale is None:
            raise ValueError("spec train_scale: true needs a scale ('tensor' or 'channel')")
        return cls(Grid.from_dict(d["grid"]), scale, train_scale)


@dataclass
class DiscreteTensor:
    """One discrete weight: ``name`` (module qualified name), ``module``, ``param`` (the
    ``nn.Parameter`` holding the grid codes; optimizers update it in place), ``grid``, ``scale``
    (the α tensor — parameter or buffer — or None) and ``spec``."""

    name: str
    module: nn.Module
    param: nn.Parameter
    grid: Grid
    scale: Optional[Tensor]
    spec: DiscreteSpec

    @property
    def param_key(self) -> str:
        """The state_dict key of the codes."""
        suffix = "parametrizations.weight.original" if self.scale is not None else "weight"
        return f"{self.name}.{suffix}" if self.name else suffix


def is_discrete_module(module: nn.Module) -> bool:
    """Whether :func:`discretize_` (or ``load_packed``) marked ``module`` as discrete."""
    return getattr(module, _SPEC_ATTR, None) is not None


def _codes_param(module: nn.Module) -> nn.Parameter:
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def _scale_tensor(module: nn.Module) -> Optional[Tensor]:
    if parametrize.is_parametrized(module, "weight"):
        for p in module.parametrizations.weight:
            if isinstance(p, ScaleParametrization):
                return p.alpha
    return None


def attach_discrete(module: nn.Module, spec: DiscreteSpec, codes: Tensor, alpha: Optional[Tensor] = None) -> None:
    """Low-level: write ``codes`` into ``module.weight``, register the scale parametrization if
    ``spec.scale`` (with ``alpha``), record ``spec``. Used by :func:`discretize_` and ``load_packed``."""
    if is_discrete_module(module):
        raise ValueError(f"module: {type(module).__name__} is already discrete")
    with torch.no_grad():
        module.weight.copy_(codes)
    if spec.scale is not None:
        if alpha is None:
            raise ValueError("alpha: a scale is required when spec.scale is set")
        parametrize.register_parametrization(module, "weight", ScaleParametrization(alpha, spec.train_scale))
    setattr(module, _SPEC_ATTR, spec)


def _names_list(arg, argname: str) -> Optional[List[str]]:
    if arg is None:
        return None
    if isinstance(arg, str):
        return [arg]
    try:
        out = list(arg)
    except TypeError:
        raise ValueError(f"{argname}: expected a list of module names, got {arg!r}") from None
    if not all(isinstance(n, str) for n in out):
        raise ValueError(f"{argname}: expected module names (str), got {arg!r}")
    return out


def discretize_(
    model: nn.Module,
    levels: Union[str, int, Sequence[float], Grid] = "binary",
    keep: Union[None, str, Iterable[str]] = ("first", "last"),
    include: Optional[Iterable[str]] = None,
    exclude: Optional[Iterable[str]] = None,
    init: str = "sign",
    scale: Optional[str] = None,
    train_scale: bool = False,
    generator: Optional[torch.Generator] = None,
) -> nn.Module:
    """Put the weights of ``Linear``/``Conv1d``/``Conv2d`` modules onto a grid, in place.

    Selection: the controlled modules in ``model.named_modules()`` order. ``keep`` (default
    ``("first", "last")``, the mixed-precision switch) leaves the first and/or last of them full
    precision; ``keep=None``/``()`` discretizes all (the reference protocol of Li & Hao 2018).
    ``include`` (names) restricts the selection to those modules and *overrides* ``keep``;
    ``exclude`` (names) removes modules. Unknown or non-controlled names raise ``ValueError``.
    Biases, norm layers and everything else stay full precision.

    Codes (``weight.data`` becomes grid values ``q ∈ Q``):

    * ``init="sign"``: ``W <- nearest_Q(W / mean|W|)`` (mean per tensor, or per output channel if
      ``scale="channel"``); midpoints go to the larger value, so binary gives ``sign(W)`` with
      sign(0)=+1, ternary zeroes ``|W| < mean|W|/2``.
    * ``init="uniform"``: i.i.d. uniform over ``Q`` (reference protocol), drawn with ``generator``.

    Scale (``scale``, default None): effective weight ``α·codes`` with ``α = mean|W|`` of the weights
    before conversion, per tensor (``"tensor"``) or per output channel (``"channel"``), registered
    with ``torch.nn.utils.parametrize`` so that the optimised tensor holds the codes
    (``module.parametrizations.weight.original``). ``train_scale=True`` makes ``α`` an
    ``nn.Parameter`` (trained by the fallback optimizer); otherwise ``α`` is a fixed buffer.

    Returns:
        ``model`` (modified in place). See :func:`discrete_parameters`.
    """
    grid = make_grid(levels)
    if init not in ("sign", "uniform"):
        raise ValueError(f"init: expected 'sign' or 'uniform', got {init!r}")
    if scale not in (None, "tensor", "channel"):
        raise ValueError(f"scale: expected None, 'tensor' or 'channel', got {scale!r}")
    if not isinstance(train_scale, bool):
        raise ValueError(f"train_scale: expected a bool, got {train_scale!r}")
    if train_scale and scale is None:
        raise ValueError("train_scale: True needs scale='tensor' or 'channel', got scale=None")
    keep_set = set(_names_list(keep, "keep") or [])
    if keep_set - {"first", "last"}:
        raise ValueError(f"keep: expected a subset of ('first', 'last'), got {keep!r}")
    include_l, exclude_l = _names_list(include, "include"), _names_list(exclude, "exclude")

    controlled = [(n, m) for n, m in model.named_modules() if is_weight_layer(m)]
    names = [n for n, _ in controlled]
    all_names = {n for n, _ in model.named_modules()}
    for argname, lst in (("include", include_l), ("exclude", exclude_l)):
        for n in lst or []:
            if n not in names:
                why = "is not a Linear/Conv1d/Conv2d" if n in all_names else "does not exist"
                raise ValueError(f"{argname}: module {n!r} {why}; controlled modules: {names}")
    if include_l and exclude_l and set(include_l) & set(exclude_l):
        raise ValueError(f"include/exclude: names in both: {sorted(set(include_l) & set(exclude_l))}")

    if include_l is not None:
        selected = set(include_l)
    else:
        selected = set(names)
        if names and "first" in keep_set:
            selected.discard(names[0])
        if names and "last" in keep_set:
            selected.discard(names[-1])
    selected -= set(exclude_l or [])

    spec = DiscreteSpec(grid, scale, train_scale)
    for name, module in controlled:
        if name not in selected:
            continue
        if is_discrete_module(module):
            raise ValueError(f"model: module {name!r} is already discrete")
        w = module.weight.detach()
        alpha = init_scale(w, scale or "tensor")
        if init == "sign":
            codes = nearest_on_grid(w / alpha, grid)
        else:
            q = grid.tensor(w.dtype, w.device)
            idx = torch.randint(0, len(grid), w.shape, generator=generator, device="cpu").to(w.device)
            codes = q[idx]
        attach_discrete(module, spec, codes, alpha if scale is not None else None)
    return model


def discrete_parameters(model: nn.Module) -> List[DiscreteTensor]:
    """The discrete weights of ``model`` in ``named_modules()`` order, as :class:`DiscreteTensor`."""
    out = []
    for name, module in model.named_modules():
        spec = getattr(module, _SPEC_ATTR, None)
        if spec is None:
            continue
        out.append(DiscreteTensor(name, module, _codes_param(module), spec.grid, _scale_tensor(module), spec))
    return out
