r"""Normalisation layers recognised by what they compute, not by their class name.

A module with exactly one 1-D ``weight`` of size ``d`` (and optionally a ``bias`` of the same size)
and no other parameters is *probed*: a copy with random parameters runs its forward in float64 on
random inputs, and the output is compared with candidate formulas (docs/algorithms.md,
"Normalisation layers recognised by what they compute"):

================  ===============================================  ===================================
kind              ``y =``                                           examples
================  ===============================================  ===================================
``layer``         ``w ⊙ (x − x̄)/√(var(x) + ε) + b`` (last dim)      nanoGPT's ``LayerNorm``, ConvNeXt's
                                                                    ``ConvNextLayerNorm`` (channels last)
``rms``           ``w ⊙ x/√(mean(x²) + ε) (+ b)`` (last dim)         T5LayerNorm, MixtralRMSNorm,
                                                                    MambaRMSNorm, any HF ``*RMSNorm``
``rms_1p``        ``(1 + w) ⊙ x/√(mean(x²) + ε)`` (last dim)         GemmaRMSNorm
``layer_cf``      ``w ⊙ (x − x̄)/√(var(x) + ε) + b`` over dim 1 of     ConvNeXt's ``ConvNextLayerNorm``
                  ``[N, C, *]``                                      (``data_format="channels_first"``)
================  ===============================================  ===================================

``ε`` is read from the attributes ``eps``, ``variance_epsilon``, ``epsilon`` when present, else
fitted from common values. The inputs span several scales (``x̄`` ≠ 0, and ``var(x)`` from 1 down
to 1e-8, where a wrong ε shows), and a candidate is accepted only when its largest relative error
is at most :data:`TOLERANCE_32` = 3e-6: a module computing in float64 matches to ~1e-15, one that
normalises in float32 internally, as Hugging Face's RMSNorms do (``x.float()``), to ~1e-7; a wrong
formula or ε misses by 1e-3 or more (at the small scales ε dominates the variance). Results are cached per class and
configuration (the class and its plain attributes).
"""

from __future__ import annotations

import copy
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["recognise_norm", "recognise_scaled_embedding", "TOLERANCE_32", "EPS_CANDIDATES"]

#: largest relative error of a match (a few float32 roundings: modules that normalise in float32)
TOLERANCE_32 = 3e-6
#: values of ε tried when no ``eps``-like attribute matches
EPS_CANDIDATES = (1e-5, 1e-6, 1e-12, 1e-8, 1e-7, 1e-10, 1e-3, 0.0)
_EPS_ATTRS = ("eps", "variance_epsilon", "epsilon")
_SCALES = (1.0, 1e-2, 1e-4)
_CACHE: Dict[tuple, Optional[Tuple[str, float]]] = {}


def _candidates(kind: str, x: Tensor, w: Tensor, b: Optional[Tensor], eps: float) -> Tensor:
    if kind == "layer":
        return F.layer_norm(x, (x.shape[-1],), w, b, eps)
    if kind in ("rms", "rms_1p"):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (w if kind == "rms" else 1.0 + w)
        return y if b is None else y + b
    if kind == "layer_cf":
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        y = (x - mu) * torch.rsqrt(var + eps) * w.reshape(shape)
        return y if b is None else y + b.reshape(shape)
    raise ValueError(kind)


def _key(module: nn.Module) -> tuple:
    plain = tuple(sorted((k, v) for k, v in vars(module).items()
                         if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))))
    params = tuple((n, tuple(p.shape)) for n, p in module.named_parameters())
    return (type(module), plain, params)


def _eligible(module: nn.Module) -> bool:
    params = dict(module.named_parameters())
    if set(params) not in ({"weight"}, {"weight", "bias"}):
        return False
    w = params["weight"]
    if w.dim() != 1 or w.numel() < 2:
        return False
    b = params.get("bias")
    return b is None or tuple(b.shape) == tuple(w.shape)


def recognise_norm(module: nn.Module) -> Optional[Tuple[str, float]]:
    """``(kind, ε)`` of a normalisation layer recognised by probing its forward (see the module
    docstring), or None."""
    if not _eligible(module):
        return None
    key = _key(module)
    if key not in _CACHE:
        _CACHE[key] = _probe(module)
    return _CACHE[key]


def _probe(module: nn.Module) -> Optional[Tuple[str, float]]:
    try:
        twin = copy.deepcopy(module).double().train()
    except Exception:  # noqa: BLE001 - an uncopyable module is not probed
        return None
    d, dev = twin.weight.numel(), twin.weight.device
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        twin.weight.copy_(0.5 + torch.rand(d, generator=gen, dtype=torch.float64))
        if getattr(twin, "bias", None) is not None:
            twin.bias.copy_(torch.randn(d, generator=gen, dtype=torch.float64))
    w, b = twin.weight.detach(), (twin.bias.detach() if getattr(twin, "bias", None) is not None else None)
    eps_given = [float(getattr(module, a)) for a in _EPS_ATTRS
                 if isinstance(getattr(module, a, None), (int, float)) and not isinstance(getattr(module, a), bool)]
    eps_list = list(dict.fromkeys(eps_given + list(EPS_CANDIDATES)))
    for kind, shape in (("layer", (2, 3, d)), ("rms", (2, 3, d)), ("rms_1p", (2, 3, d)), ("layer_cf", (2, d, 3, 2))):
        xs = [(s * (torch.randn(shape, generator=gen, dtype=torch.float64) + 0.7)).to(dev) for s in _SCALES]
        try:
            with torch.no_grad():
                ys = [twin(x) for x in xs]
        except Exception:  # noqa: BLE001 - the module does not take this layout
            continue
        if not all(isinstance(y, Tensor) and y.shape == x.shape for y, x in zip(ys, xs)):
            continue
        best = None
        for eps in eps_list:
            err = 0.0
            for x, y in zip(xs, ys):
                ref = _candidates(kind, x, w, b, eps)
                err = max(err, float((y.double() - ref).abs().max()) / max(float(ref.abs().max()), 1e-300))
            if math.isfinite(err) and (best is None or err < best[0]):
                best = (err, eps)
        if best is not None and best[0] <= TOLERANCE_32:
            return kind, best[1]
    return None


def recognise_scaled_embedding(module: nn.Module) -> Optional[float]:
    """The constant ``s`` of an ``nn.Embedding`` subclass whose forward computes ``s·E[i]`` (Gemma's
    ``GemmaTextScaledWordEmbedding``: ``E[i]·√d``), found by probing as :func:`recognise_norm` does
    (random table, random indices; accepted at a relative error ≤ :data:`TOLERANCE_32`), or None.
    Cached per class and configuration."""
    if not isinstance(module, nn.Embedding) or set(dict(module.named_parameters())) != {"weight"}:
        return None
    key = ("embedding",) + _key(module)
    if key not in _CACHE:
        _CACHE[key] = _probe_embedding(module)
    return _CACHE[key]


def _probe_embedding(module: nn.Embedding) -> Optional[float]:
    try:
        twin = copy.deepcopy(module).double().train()
    except Exception:  # noqa: BLE001
        return None
    gen = torch.Generator().manual_seed(4321)
    v, d = twin.weight.shape
    with torch.no_grad():
        twin.weight.copy_(torch.randn(v, d, generator=gen, dtype=torch.float64).to(twin.weight.device))
        idx = torch.randint(0, v, (2, 5), generator=gen).to(twin.weight.device)
        try:
            y = twin(idx)
        except Exception:  # noqa: BLE001
            return None
        if not isinstance(y, Tensor) or y.shape != (2, 5, d):
            return None
        ref = twin.weight[idx]
        scale = float((y.double() * ref).sum() / ref.pow(2).sum())
        err = float((y.double() - scale * ref).abs().max()) / max(float(y.double().abs().max()), 1e-300)
    return scale if math.isfinite(err) and err <= TOLERANCE_32 and scale != 0.0 else None
