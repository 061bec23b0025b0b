r"""Additive parameters, recognised by what they compute: a parameter added to a state.

A parameter ``θ`` that a module adds to one of its states — ``s' = s + Sθ`` with ``S`` a 0/1
selection (ViT's ``cls_token`` concatenated to the patch tokens, learned position embeddings added
to them, CLIP's ``class_embedding``, Swin's relative-position bias table read by index and added to
the attention scores) — is a *bias-only affine unit*: its map is affine in ``θ`` with ``∂s'/∂s = I``
independent of ``θ``, so the costate penalty vanishes and the state penalty is
``(ρ/2)·Σ_j u_j Δθ_j²`` with ``u_j`` the number of uses of ``θ_j`` per sample (docs/algorithms.md §2,
"Additive parameters"). The maximiser of the augmented Hamiltonian is elementwise:

.. math::

    Δθ_j = −\frac{(∇_θ J)_j}{ρ\,u_j + δ}.

:func:`additive_uses` reads ``u`` from the autograd graph of one forward call: it follows ``θ``'s
uses up through pure selections (view, expand, index, permute, slice, …) to the node that adds or
concatenates them to a state, and pushes ones back down the same selections (so each entry counts
its uses). Any other operation on the way (a product — a layer-scale —, ``exp``, ``softplus``, a
matrix product) makes ``θ`` not additive, and the reason names that operation.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["additive_uses", "additive_step", "trace_uses", "scale_state_sq", "scale_costate_sq", "scale_step", "Use",
           "SELECTIONS"]

#: autograd nodes that only select, copy or rearrange entries (their adjoint scatters/sums)
SELECTIONS = frozenset({
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "ExpandBackward0", "PermuteBackward0",
    "TransposeBackward0", "TransposeBackward1", "TBackward0", "UnsqueezeBackward0", "SqueezeBackward0",
    "SqueezeBackward1", "SqueezeBackward2", "SliceBackward0", "SelectBackward0", "IndexBackward0",
    "IndexSelectBackward0", "CloneBackward0", "RepeatBackward0", "ToCopyBackward0", "AliasBackward0",
    "ExpandAsBackward0", "FlattenBackward0", "SplitBackward0", "SplitWithSizesBackward0", "UnbindBackward0",
    "ChunkBackward0", "NarrowBackward0", "EmbeddingBackward0",
})
#: the nodes that add a selection of θ to a state, or place it into one
_PLACEMENTS = frozenset({"AddBackward0", "CatBackward0", "StackBackward0"})


def _parents(roots: List) -> Tuple[Dict[int, List[Tuple[object, int]]], Dict[int, object]]:
    """``{id(node): [(parent, input index)]}`` over the graph below ``roots`` (parents consume the
    node's output) and ``{id(node): node}``."""
    parents: Dict[int, List[Tuple[object, int]]] = {}
    nodes: Dict[int, object] = {}
    stack = [r for r in roots if r is not None]
    seen = set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        nodes[id(n)] = n
        for i, (child, _) in enumerate(n.next_functions):
            if child is None:
                continue
            parents.setdefault(id(child), []).append((n, i))
            nodes.setdefault(id(child), child)
            stack.append(child)
    return parents, nodes


def _fit(g: Optional[Tensor], node, i: int) -> Optional[Tensor]:
    """``g``, the gradient a node returns for its input ``i``, in the shape the next node expects
    (what the autograd engine does between nodes: reshape, or sum over broadcast dimensions)."""
    child, nr = node.next_functions[i]
    if g is None or child is None:
        return g
    shape = tuple(child._input_metadata[nr].shape) if hasattr(child, "_input_metadata") else tuple(g.shape)
    if tuple(g.shape) == shape:
        return g
    return g.reshape(shape) if g.numel() == torch.Size(shape).numel() else g.sum_to_size(shape)


class Use:
    """One use of a parameter in a call's graph: ``node`` combines a selection of it with a state
    (``kind`` ``"add"``: added or concatenated; ``"scale"``: multiplied elementwise; ``"output"``: the
    selection is an output of the call), through its input ``idx``; ``chain``: the selection nodes
    between ``node`` and the parameter, top first, each with the input index leading down."""

    __slots__ = ("node", "idx", "chain", "kind")

    def __init__(self, node, idx, chain, kind):
        self.node, self.idx, self.chain, self.kind = node, idx, chain, kind

    def down(self, g: Tensor, through_node: bool = True) -> Tensor:
        """The adjoint of the selections: ``g`` at ``node``'s output (``through_node``) or at its
        input ``idx`` (already in that input's shape, broadcast dimensions summed), summed onto the
        parameter's entries."""
        with torch.no_grad():
            if through_node:
                out = self.node(g)
                g = out[self.idx] if isinstance(out, tuple) else out
            g = _fit(g, self.node, self.idx)
            for n, i in reversed(self.chain):
                out = n(g)
                g = _fit(out[i] if isinstance(out, tuple) else out, n, i)
        return g

    def out_shape(self):
        meta = self.node._input_metadata[0]
        return meta.shape, meta.dtype, meta.device

    def state(self) -> Tensor:
        """The other operand of a ``"scale"`` use (the state the parameter multiplies)."""
        return self.node._saved_self if self.idx == 1 else self.node._saved_other


def trace_uses(outputs: List[Tensor], param: Tensor) -> Tuple[List[Use], Optional[str]]:
    """Every use of ``param`` in the graph of ``outputs`` (see :class:`Use`), or ``([], reason)``
    when one of them is neither a sum nor an elementwise product with a state (``reason`` names the
    operation); ``([], None)`` when the outputs do not depend on ``param``."""
    roots = [t.grad_fn for t in outputs if isinstance(t, Tensor) and t.grad_fn is not None]
    parents, nodes = _parents(roots)
    acc = next((n for n in nodes.values() if getattr(n, "variable", None) is param), None)
    if acc is None:
        return [], None
    root_ids = {id(r) for r in roots}
    uses: List[Use] = []
    for node, idx in parents.get(id(acc), []):
        chain = []
        while type(node).__name__ in SELECTIONS:
            ups = parents.get(id(node), [])
            if not ups and id(node) in root_ids:
                break  # the output is a selection of θ: a bias-only map with no state (as an embedding)
            if len(ups) != 1:
                return [], f"a rearranged copy of it is used {len(ups)} times"
            chain.append((node, idx))
            node, idx = ups[0]
        name = type(node).__name__
        if name in SELECTIONS:
            kind = "output"
        elif name in _PLACEMENTS and not (name == "AddBackward0" and float(getattr(node, "_saved_alpha", 1)) != 1.0):
            kind = "add"
        elif name == "MulBackward0":
            kind = "scale"
        else:
            return [], f"it enters through {name.replace('Backward0', '').replace('Backward1', '')} (not a sum)"
        uses.append(Use(node, idx, chain, kind))
    if any(u.kind == "scale" for u in uses):
        if any(u.kind != "scale" for u in uses):
            return [], "it is both added to a state and multiplied with one"
        if len({id(u.node) for u in uses}) != len(uses):
            return [], "it enters a product twice"
    return uses, None


def additive_uses(outputs: List[Tensor], param: Tensor) -> Tuple[Optional[Tensor], Optional[str]]:
    """``(u, None)`` with ``u`` (θ's shape) the number of times each entry of ``param`` is added to a
    state in the graph of ``outputs``; ``(None, reason)`` when ``param`` is not additive there
    (``reason`` names the operation), ``(None, None)`` when ``outputs`` do not depend on it."""
    uses, why = trace_uses(outputs, param)
    if why is not None or not uses:
        return None, why
    if uses[0].kind == "scale":
        return None, "it enters through Mul (not a sum)"
    return _count(uses, param)


def _count(uses: List[Use], param: Tensor) -> Tuple[Optional[Tensor], Optional[str]]:
    total = torch.zeros(param.shape, dtype=torch.float64, device=param.device)
    for u in uses:
        shape, dtype, device = u.out_shape()
        g = u.down(torch.ones(shape, dtype=dtype, device=device))
        if g is None or g.numel() != param.numel():
            return None, "its uses could not be counted"
        total += g.reshape(param.shape).to(torch.float64)
    if not bool((total == total.round()).all()) or bool((total < 0).any()):
        return None, "its selections are not 0/1"
    return total, None


def scale_state_sq(uses: List[Use], param: Tensor) -> Tensor:
    """``Σ x²`` over the uses of each entry of a parameter that multiplies states ``x``
    (``"scale"`` uses): the state statistic of a layer-scale ``y = γ ⊙ x``."""
    total = torch.zeros(param.shape, dtype=torch.float64, device=param.device)
    for u in uses:
        shape, _, _ = u.out_shape()
        x = u.state().detach()
        g = u.down(x.expand(shape))  # the product's adjoint on θ's side: x ⊙ x
        total += g.reshape(param.shape).to(torch.float64)
    return total


def scale_costate_sq(use: Use, grad_out: Tensor, param: Tensor) -> Tensor:
    """``Σ (∂J/∂y)²`` over the uses of each entry, from the gradient at the product's output."""
    g = use.down(grad_out.detach().pow(2), through_node=False)
    return g.reshape(param.shape).to(torch.float64)


def additive_step(grad: Tensor, uses_per_sample: Tensor, rho: float, delta: float) -> Tensor:
    r"""The maximiser of the augmented Hamiltonian of a bias-only unit:
    ``Δθ = −∇J / (ρ·u + δ)`` elementwise (``grad`` = ∇_θ J, ``uses_per_sample`` = u, ``rho`` = ρ,
    ``delta`` = δ > 0)."""
    return -grad / (rho * uses_per_sample.to(grad.dtype) + delta)


def scale_step(grad: Tensor, x_sq: Tensor, p_sq: Tensor, rho: float, delta: float) -> Tensor:
    r"""The maximiser of the augmented Hamiltonian of a layer-scale ``y = γ ⊙ x`` (the channel kind
    without normalisation or shift, per entry): ``Δγ = −∇J / (ρ(a + e) + δ)`` with ``a = Σx²/B``
    (``x_sq``) and ``e = Σp̂²/B`` (``p_sq``, the costate weight folded in)."""
    return -grad / (rho * (x_sq + p_sq).to(grad.dtype) + delta)
