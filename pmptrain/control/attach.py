"""``attach`` controls to a pretrained model by module names or types, ``merge`` them back.

See :mod:`pmptrain.control.modules` for the controls and docs/control.md for the mathematics.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .modules import (BinaryControl, ControlBase, LoRALinear, NonlinearControl, ParallelControl, is_transposed,
                      linear_shape)

__all__ = ["KINDS", "attach", "controls", "merge", "select_modules", "trainable_parameters", "build_control"]

#: The kinds of control :func:`attach` builds.
KINDS = ("lora", "parallel", "nonlinear", "binary", "ternary")

Target = Union[str, type, Callable[[str, nn.Module], bool]]


def _as_list(targets) -> List[Target]:
    if targets is None:
        raise ValueError("targets: name the modules to control (names, globs, 're:<regex>', module types "
                         "or a predicate (name, module) -> bool)")
    if isinstance(targets, (str, type)) or callable(targets) and not isinstance(targets, type) \
            and not isinstance(targets, (list, tuple, set)):
        return [targets]
    out = list(targets)
    if not out:
        raise ValueError("targets: empty; name at least one module")
    return out


def _matches(t: Target, name: str, module: nn.Module) -> bool:
    if isinstance(t, type):
        return isinstance(module, t)
    if isinstance(t, str):
        if t.startswith("re:"):
            return re.fullmatch(t[3:], name) is not None
        if any(c in t for c in "*?["):
            return fnmatch.fnmatchcase(name, t)
        return name == t or name.endswith("." + t)
    if callable(t):
        return bool(t(name, module))
    raise TypeError(f"targets: entry {t!r} is not a name/glob/'re:regex' string, a module type or a callable")


def _inside_control(name: str, ctrl_names: Sequence[str]) -> bool:
    return any(name == c or name.startswith(c + ".") for c in ctrl_names)


def select_modules(model: nn.Module, targets) -> List[Tuple[str, nn.Module]]:
    """The modules of ``model`` that ``targets`` names, outermost only, in ``named_modules()`` order.

    A target is a module name (exact, or a suffix after a dot: ``"c_attn"`` names
    ``"h.0.attn.c_attn"``), a glob over full names (``"h.*.mlp"``), ``"re:<regex>"`` (full match),
    a module type (every instance), or a predicate ``(name, module) -> bool``. Modules inside
    controls already attached are never selected. Raises ``ValueError`` when nothing matches."""
    tl = _as_list(targets)
    existing = [n for n, m in model.named_modules() if isinstance(m, ControlBase)]
    hits: List[Tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if name == "" or _inside_control(name, existing):
            continue
        if any(name.startswith(h + ".") for h, _ in hits):
            continue  # inside a module already selected: the outermost one is the target
        if any(_matches(t, name, module) for t in tl):
            hits.append((name, module))
    if not hits:
        sample = [n for n, _ in model.named_modules() if n][:12]
        raise ValueError(f"targets: {targets!r} matches no module of {type(model).__name__} "
                         f"(module names look like {sample})")
    return hits


def build_control(kind: str, base: nn.Module, rank: int, alpha=None, dropout: float = 0.0, dim=None,
                  causal: bool = False, seed: int = 0, levels=None) -> ControlBase:
    """One control of ``kind`` around ``base`` (see :func:`attach` for the arguments)."""
    if kind == "lora":
        return LoRALinear(base, rank, alpha, dropout)
    if kind == "parallel":
        return ParallelControl(base, rank, alpha, dropout, dim)
    if kind == "nonlinear":
        return NonlinearControl(base, rank, alpha, dropout, dim, causal=causal)
    if kind in ("binary", "ternary", "discrete"):
        return BinaryControl(base, rank, levels if levels is not None else kind, dim, seed)
    raise ValueError(f"kind: {kind!r} is not one of {KINDS}")


def _check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: expected an int >= 1, got {rank!r}")
    return rank


def attach(model: nn.Module, targets, kind: str = "lora", rank: int = 8, alpha: Optional[float] = None,
           dropout: float = 0.0, dim: Optional[int] = None, causal: bool = False, seed: int = 0,
           levels=None, freeze: bool = True, trainable: Iterable[str] = ()) -> nn.Module:
    r"""Add controls to ``model`` in place and freeze everything else; returns ``model``.

    Each selected module ``M`` (see :func:`select_modules`) is replaced, at its name, by a control
    module holding ``M`` as ``.base`` (so ``"h.0.attn.c_attn.weight"`` becomes
    ``"h.0.attn.c_attn.base.weight"``) and the control's ``nn.Linear`` pieces ``A`` and ``B``.

    Args:
        model: any ``nn.Module`` (a Hugging Face model, a ``peft`` model, your own).
        targets: names / globs / ``"re:<regex>"`` / module types / a predicate (see
            :func:`select_modules`).
        kind: ``"lora"`` (``y = Wx + b + (α/r)BAx`` on Linear / GPT-2 Conv1D modules),
            ``"parallel"`` (``y = F(x) + (α/r)BAx`` around a block ``F``), ``"nonlinear"`` (the
            ICML 2024 controller around a block), ``"binary"`` / ``"ternary"`` (a rank-``rank``
            control with codes on the grid, on a Linear or around a block).
        rank: r ≥ 1 (default 8).
        alpha: α (default r for lora/parallel — scale α/r = 1 —, 1 for nonlinear; unused by discrete
            controls).
        dropout: dropout on the control's input (default 0; lora, parallel, nonlinear).
        dim: feature dimension of a block (default: found from the block).
        causal: causal token mixing of the nonlinear controller (default False; True for decoders).
        seed: the seed of a discrete control's initial codes (default 0; each control gets
            ``seed + its index``).
        levels: the grid of a discrete control (default: ``kind``).
        freeze: set ``requires_grad=False`` on every parameter outside the controls (default True).
        trainable: names or globs of parameters outside the controls to keep trainable (e.g. a new
            classifier head, ``"classifier.*"``).

    Raises:
        ValueError: unknown kind, bad rank, targets that match nothing.
        TypeError: ``kind="lora"`` on a module that is not a Linear / Conv1D.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {KINDS}")
    rank = _check_rank(rank)
    hits = select_modules(model, targets)
    if kind == "lora":
        bad = [f"{n} ({type(m).__name__})" for n, m in hits if linear_shape(m) is None]
        if bad:
            raise TypeError(f"kind='lora' controls Linear / GPT-2 Conv1D modules; targets also select {bad}; "
                            "use kind='parallel' for a block")
    built = [(name, build_control(kind, m, rank, alpha, dropout, dim, causal, seed + i, levels))
             for i, (name, m) in enumerate(hits)]  # every control built before the model changes
    for name, ctrl in built:
        _set_module(model, name, ctrl)
    if freeze:
        freeze_base(model, trainable)
    return model


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def freeze_base(model: nn.Module, trainable: Iterable[str] = ()) -> None:
    """``requires_grad=False`` on every parameter outside the controls of ``model``, except those
    whose names match ``trainable`` (names or globs); control parameters become trainable."""
    keep = list(trainable) if not isinstance(trainable, str) else [trainable]
    ctrl = {id(p) for _, c in controls(model) for p in c.control_parameters()}
    for n, p in model.named_parameters():
        if id(p) in ctrl:
            p.requires_grad_(True)
        else:
            p.requires_grad_(any(n == k or fnmatch.fnmatchcase(n, k) for k in keep))


def controls(model: nn.Module) -> List[Tuple[str, ControlBase]]:
    """``[(name, control)]`` of every control attached to ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ControlBase)]


def trainable_parameters(model: nn.Module) -> int:
    """The number of parameters with ``requires_grad`` (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def merge(model: nn.Module, strict: bool = True) -> List[str]:
    r"""Fold every linear control into its base weights and remove it; returns the merged names.

    Exact for controls that are a weight delta of one linear map, ``y = W x + b + ΔW x`` with
    ``ΔW = (α/r)·B A`` (``kind="lora"``) or ``ΔW = s_B s_A·B_q A_q`` (a discrete control on a
    Linear): ``W ← W + ΔW`` gives the same map. In exact arithmetic the outputs agree; in floating
    point ``(W + ΔW)x`` and ``Wx + ΔW x`` round differently (float64: agreement to ~1e-15 relative).
    Not exact, so refused, for state-based controls around a block (``parallel``, ``nonlinear``,
    discrete controls around a block): ``F(x) + u(x)`` is not ``F`` with other weights.

    Args:
        strict: raise ``ValueError`` naming every control that cannot be merged, before changing
            anything (default True); with False, merge what can be merged and leave the others.
    """
    found = controls(model)
    refused = [(n, type(c).__name__, c.merge_reason()) for n, c in found if c.merge_reason() is not None]
    if refused and strict:
        raise ValueError("merge: cannot fold these controls exactly into base weights: "
                         + "; ".join(f"{n} ({t}): {why}" for n, t, why in refused)
                         + ". Use merge(model, strict=False) to merge the others")
    merged = []
    for name, ctrl in found:
        if ctrl.merge_reason() is not None:
            continue
        base = ctrl.base
        delta = ctrl.delta_weight().to(base.weight.dtype)
        base.weight.add_(delta.t() if is_transposed(base) else delta)
        _set_module(model, name, base)
        merged.append(name)
    return merged
