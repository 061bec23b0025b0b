"""State and costate capture: thin hooks that turn each backward pass into curvature statistics.

For every registered module a forward hook attaches a small *pending record* — the call's input (the
state), and for the iterative solver the whole call — to the module's output as a tensor hook. When
the backward pass reaches that output, the hook hands the input and ``∂J/∂y`` (the costate up to the
factor ``−B``) to the module's :class:`ModuleStats`, which accumulates what the owning rule asked for
(:class:`CaptureSpec`), and drops the input. Nothing else: no mathematics beyond sums of rows.

Rules (they mirror what autograd does with ``.grad``):

* **Accumulation.** Statistics add up over every backward pass since the last :meth:`ModuleCapture.reset`
  (``optimizer.zero_grad()``) — and since the module's gradient was last reset by any other means
  (``model.zero_grad()``, ``p.grad = None``, an in-place zeroing), detected when the next backward
  reaches the module (under FSDP2, whose sharded ``.grad`` appears only when a synchronising pass
  reduce-scatters it, a missing gradient resets only after one was seen: passes under
  ``set_requires_gradient_sync(False)`` accumulate). The sample count ``B`` adds up too: a *sample* is a row of the first dimension
  of the module's first call that a backward pass reaches (so a module called k times per forward,
  or several forwards whose losses are summed into one backward, count one batch). A module whose
  rule needs no statistics this step (an amortised step) counts its samples only: distributed steps
  weight the ranks' gradients by them.
* **Forwards without a backward cost nothing.** A pending record lives only as long as the autograd
  graph that holds it: forwards in train mode that never get a backward (metrics, generation) are
  freed with their graphs; nothing is recorded in ``eval()`` mode, under ``torch.no_grad()``, while
  capture is paused, or when the output does not require grad.
* **One backward per call.** A second backward through the same recorded call (``retain_graph=True``)
  adds to ``.grad`` but not to the statistics (counted in :attr:`ModuleStats.repeated`, warned).
* **Compiled models.** Under ``torch.compile`` the forward hook does not attach a Python tensor
  hook (dynamo cannot trace one that keeps state: a graph break per module); it routes the output
  through :class:`_CostateTap`, an autograd function traced into the graph, whose backward hands
  (input, ``∂J/∂y``) to the same accumulation through the opaque custom operator
  ``pmptrain::record_costate`` (registered as effectful so that the compiled backward keeps it).
  The forward stays one graph and the statistics are the eager ones. A second backward through a
  compiled call (``retain_graph=True``) adds to the statistics there (not detected).
* **Lifetime.** :meth:`ModuleCapture.remove` removes every hook; a new capture that registers a module
  already hooked by another live capture removes the older capture (one optimizer per module).
  Hooks are inert in copies: ``copy.deepcopy(model)`` and pickling give a model without them.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ._profile import phase
from .symmetric import sym_gram

__all__ = ["CaptureSpec", "ModuleStats", "ModuleCapture"]

#: elements (rows × features) materialised at a time when folding a call into dense statistics: a
#: convolution's patch rows are built for a few samples at a time (16 MB in float32), not the batch
_CHUNK_ELEMENTS = 1 << 22
_OWNERS: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()
_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
#: slot (an int, a constant of compiled graphs) -> (weak reference to the capture, key): what the
#: compiled path's backward records into (:func:`_record`)
_SLOTS: "Dict[int, Tuple[weakref.ref, str]]" = {}
_next_slot = [0]


@dataclass(frozen=True)
class CaptureSpec:
    """What a rule needs from a module's calls.

    Attributes:
        states: ``"none"``; ``"rows"`` (keep the state rows); ``"dense"`` (sums ``Σxxᵀ``, ``Σx``);
            ``"auto"`` (rows while there are fewer rows than features, ``n``, then dense);
            ``"counts"`` (index counts of an embedding); ``"diag"`` (per-column ``Σx²``, ``Σx``).
        costates: ``"none"``; ``"sqnorm"`` (only ``Σ‖g‖²``); ``"rows"``; ``"dense"`` (``Σggᵀ``);
            ``"auto"`` (rows while fewer than ``m``, then dense); ``"diag"`` (per-column ``Σg²``).
            ``Σ‖g‖²`` is kept whenever this is not ``"none"``.
        calls: keep whole calls (inputs, keyword inputs, output gradient) for the iterative solver.
        in_dim / out_dim: ``n`` and ``m`` (thresholds of ``"auto"``; ``in_dim`` is the table size V
            for ``"counts"``).
        dtype: dtype of the statistics (float32 for half-precision activations).
        groups: with ``"dense"``, keep only the ``groups`` diagonal blocks (``groups × n/g × n/g``,
            resp. ``m``): the statistics of a grouped convolution.
        reduce: when rows are folded into dense sums, the rows of one entry of the leading (batch) dimension — a
            sequence's tokens, an image's output positions — are summed and divided by ``√L``
            (``L`` rows per entry) before the outer product (K-FAC-reduce, Eschenhagen et al. 2023;
            docs/algorithms.md, "Reduced statistics"); ``Σx``, ``Σ‖g‖²`` and the row count stay
            those of the rows.
    """

    states: str = "none"
    costates: str = "none"
    calls: bool = False
    in_dim: int = 0
    out_dim: int = 0
    dtype: torch.dtype = torch.float32
    groups: int = 1
    reduce: bool = False


class ModuleStats:
    """What the backward passes since the last reset contributed for one module, in this process.

    ``samples`` = B, ``rows`` = N (output rows), ``x_rows`` (kept state rows, list), ``xx`` = Σxxᵀ
    (folded; ``groups × n/g × n/g`` blocks for a grouped convolution), ``x_sum`` = Σx, ``x_sq`` =
    per-column Σx², ``counts`` (embedding), ``g_rows`` (kept output-gradient rows), ``gg`` = Σggᵀ
    (or its blocks), ``g_sq`` = Σ‖g‖², ``g_sq_cols`` = per-column Σg², ``calls`` =
    ``[(args, kwargs, grad)]``, ``repeated`` = costates that reached an already recorded call again. Gradients are raw ``∂J/∂y`` (loss-scaled under AMP):
    the costate is ``p̂ = −B·g``, formed by the rule.

    ``shared_g``: the output-gradient rows of *shared* calls — calls on an input without a batch
    dimension (a position embedding on ``arange(T)``), whose output every sample of the batch uses.
    Under several ranks every rank records the same rows with its part of the gradient, so the
    union's costate of such a row is the ranks' mean, not a further sample: these rows are kept
    unfolded until :meth:`unify_shared_` (the rule, before it reads the costate statistics) replaces
    them by that mean and folds them like the others (``shared_spec``: how). The same holds for
    the backward passes of one accumulation window (N micro-batches of ``loss/N``): each pass
    records the shared rows with its micro-batch's part of the gradient, and the union's costate is
    their mean over the passes (``shared_pass``: the pass of each row).

    ``shared_x``: for each piece of ``shared_g``, None for a call without a batch dimension, or the
    indices of an embedding called with a batch dimension of 1 (Hugging Face GPT-2's
    ``wpe(position_ids)``, ``position_ids`` of shape ``[1, T]``): such a call may be a shared table
    broadcast over the batch or an ordinary sample of a micro-batch of one, which its shape does not
    tell; it is treated as shared when every pass of the window called it on the same indices,
    and with several ranks every rank on the same indices too (:meth:`unify_shared_`), and folded
    as recorded otherwise.
    """

    __slots__ = ("samples", "rows", "x_rows", "xx", "x_sum", "x_sq", "counts", "g_rows", "gg", "g_sq",
                 "g_sq_cols", "calls", "repeated", "shared_g", "shared_spec", "shared_pass", "shared_x", "_task")

    def __init__(self):
        self.samples = 0
        self.rows = 0
        self.x_rows: List[Tensor] = []
        self.xx: Optional[Tensor] = None
        self.x_sum: Optional[Tensor] = None
        self.x_sq: Optional[Tensor] = None
        self.counts: Optional[Tensor] = None
        self.g_rows: List[Tensor] = []
        self.gg: Optional[Tensor] = None
        self.g_sq: Optional[Tensor] = None
        self.g_sq_cols: Optional[Tensor] = None
        self.calls: List[Tuple[Tuple, Dict, Tensor]] = []
        self.repeated = 0
        self.shared_g: List[Tensor] = []
        self.shared_spec: Optional[CaptureSpec] = None
        self.shared_pass: List[Any] = []
        self.shared_x: List[Optional[Tensor]] = []
        self._task = None

    @property
    def empty(self) -> bool:
        return self.samples == 0

    def state_rows(self, dtype) -> Optional[Tensor]:
        """The kept state rows (N×n) in ``dtype``, or None if they were folded."""
        if self.xx is not None or not self.x_rows:
            return None
        return _cat(self.x_rows).to(dtype)

    def costate_rows(self, dtype) -> Optional[Tensor]:
        """The kept output-gradient rows (N×m) in ``dtype``, or None if they were folded."""
        if self.gg is not None or not self.g_rows:
            return None
        return _cat(self.g_rows).to(dtype)

    def fold_states_(self, dtype) -> Optional[Tensor]:
        """Fold kept state rows into ``xx`` and return it (None if there is nothing)."""
        self.xx, self.x_rows = _fold(self.x_rows, self.xx, dtype), []
        return self.xx

    def unify_shared_(self, process_group=None, world: int = 1, scale: float = 1.0, agree: bool = False,
                      device=None) -> None:
        """Fold the rows of shared calls (``shared_g``) into the costate statistics, each replaced
        first by the union's costate, the mean of the copies every backward pass and rank recorded.

        Passes: the ``k``-th shared row piece of each of the ``P`` backward passes since the
        statistics were reset (micro-batches of ``loss/P``) is replaced by their mean ``ḡ_k`` (when
        every pass recorded the same pieces: the same shapes in the same order; otherwise they are
        folded as recorded). Ranks: ``ḡ ← Σ_r s_r·ḡ_r / (world·s)`` (one all-reduce of the rows;
        ``s = scale``, this rank's costate scale ``B_rank/S``). Each mean is folded once per copy
        recorded, so the statistics that the rule sums over the passes and ranks and divides by the
        union's ``B`` (``P·world`` copies of the shared samples) are those of one backward pass of
        one process on the union batch, whose costate is the sum of the micro-batches' gradients
        (the mean of the ranks'). Every rank calls it for the same modules (their shared calls are
        the model's structure); no-op without shared rows.

        Pieces of an embedding called with a batch dimension of 1 (``shared_x``) are shared when
        every pass called it on the same indices (a position table broadcast over every
        micro-batch: the union's one call) and, with several ranks, when every rank recorded the
        same pieces on the same indices — agreed by one all-gather of a few integers per step, which
        every rank runs for an embedding (``agree=True``, the rule's call for such a module,
        ``device`` for that all-gather), whatever it recorded; otherwise (a micro-batch of one
        sample: different indices) they are folded as recorded, as any sample's rows. With several
        ranks and ``agree=False`` they are folded as recorded."""
        maybe = [(task, gr, x) for task, gr, x in zip(self.shared_pass, self.shared_g, self.shared_x) if x is not None]
        if world > 1:
            merge = agree and _agreed_across_ranks(maybe, process_group, device)  # a collective on every rank
        else:
            merge = _same_in_every_pass(maybe)
        if not self.shared_g:
            return
        spec = self.shared_spec
        shared = [(task, gr) for task, gr, x in zip(self.shared_pass, self.shared_g, self.shared_x) if x is None]
        self.shared_g, self.shared_spec, self.shared_pass, self.shared_x = [], None, [], []
        if merge:
            shared += [(task, gr) for task, gr, _ in maybe]
        else:  # samples: folded as recorded
            for _, gr, _ in maybe:
                _add_costates(self, spec, gr)
        if not shared:
            return
        rows = [gr for _, gr in shared]
        dt = torch.promote_types(spec.dtype, rows[0].dtype) if rows[0].is_floating_point() else spec.dtype
        copies = 1
        pieces = _by_pass(shared)
        if len(pieces) > 1 and all(len(q) == len(pieces[0]) and all(a.shape == b.shape for a, b in zip(q, pieces[0]))
                                   for q in pieces):
            copies = len(pieces)
            rows = [torch.stack([r.to(dt) for r in same]).mean(0) for same in zip(*pieces)]
        if world > 1:
            from . import distributed as pdist

            flat = torch.cat([r.reshape(-1).to(dt) for r in rows]) * scale
            pdist.all_reduce_sum_([flat], process_group)
            flat = flat / (world * scale) if scale != 0.0 else flat * 0.0
            out, off = [], 0
            for r in rows:
                out.append(flat[off:off + r.numel()].reshape(r.shape))
                off += r.numel()
            rows = out
        for gr in rows:
            for _ in range(copies):
                _add_costates(self, spec, gr)

    def fold_costates_(self, dtype) -> Optional[Tensor]:
        """Fold kept output-gradient rows into ``gg`` and return it (None if there is nothing)."""
        self.gg, self.g_rows = _fold(self.g_rows, self.gg, dtype), []
        return self.gg


def _fold(rows: List[Tensor], acc: Optional[Tensor], dtype, groups: int = 1) -> Optional[Tensor]:
    """``acc + Σ rᵀr`` over ``rows`` (in ``dtype``); with ``groups > 1`` only the diagonal blocks
    (``groups × k × k`` for ``groups·k`` columns)."""
    for r in rows:
        r = r.to(dtype)
        if groups > 1:
            b = r.reshape(r.shape[0], groups, r.shape[1] // groups).transpose(0, 1)  # groups × N × k (N may be 0)
            blocks = torch.bmm(b.transpose(1, 2), b)
            acc = blocks if acc is None else acc.add_(blocks)
        else:
            acc = sym_gram(r, acc)  # block-triangular: (b+1)/(2b) of the flops (pmptrain.symmetric)
    return acc


def _reduce_rows(rows: Tensor, per_entry: int) -> Tensor:
    """``rows`` (``E·L × k``, entry-major) summed over each entry's ``L = per_entry`` rows and divided
    by ``√L`` (K-FAC-reduce): ``E × k``, whose outer products equal the rows' when an entry's rows
    are equal. ``per_entry = 1`` (or rows that are not whole entries): ``rows`` unchanged."""
    if per_entry <= 1 or rows.shape[0] % per_entry:
        return rows
    return rows.reshape(-1, per_entry, rows.shape[-1]).sum(1) * (1.0 / math.sqrt(per_entry))


def _by_pass(items: List[Tuple[Any, Any]]) -> List[List[Any]]:
    """The values of ``items`` (``(backward pass, value)``) grouped by their pass, in order."""
    by_pass: Dict[Any, List[Any]] = {}
    for task, v in items:
        by_pass.setdefault(id(task) if task is None else task, []).append(v)
    return list(by_pass.values())


def _calls_by_pass(pieces: List[Tuple[Any, Tensor, Tensor]]) -> List[List[Tensor]]:
    return _by_pass([(task, x) for task, _, x in pieces])


def _equal_passes(calls: List[List[Tensor]]) -> bool:
    return all(len(c) == len(calls[0]) and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(c, calls[0]))
               for c in calls)


def _same_in_every_pass(pieces: List[Tuple[Any, Tensor, Tensor]]) -> bool:
    """Whether ``pieces`` (``(pass, rows, indices)``) come from more than one backward pass and every
    pass recorded the same number of pieces, with equal indices piece by piece."""
    calls = _calls_by_pass(pieces)
    return len(calls) > 1 and _equal_passes(calls)


def _agreed_across_ranks(pieces: List[Tuple[Any, Tensor, Tensor]], process_group, device) -> bool:
    """Whether every rank recorded pieces (``(pass, rows, indices)``) of the same calls — the same
    number of passes and of pieces per pass, every pass on the same indices, and the same indices
    on every rank (compared by their count and three sums: ``Σx``, ``Σ(i+1)·x_i``, ``Σx²``). One
    all-gather of 7 integers; every rank calls it, with or without pieces."""
    from . import distributed as pdist

    calls = _calls_by_pass(pieces)
    ok = bool(calls) and _equal_passes(calls)
    sig = [int(ok), len(calls), len(calls[0]) if calls else 0, 0, 0, 0, 0]
    if ok:
        v = torch.cat([x.reshape(-1) for x in calls[0]]).to(torch.int64)
        w = torch.arange(1, v.numel() + 1, dtype=torch.int64, device=v.device)
        sig[3:] = [v.numel(), int(v.sum()), int((v * w).sum()), int((v * v).sum())]
    every = pdist.all_gather_ints(sig, process_group, device=device)
    return all(s == every[0] for s in every) and every[0][0] == 1


def _add_costates(st: ModuleStats, spec: CaptureSpec, gr: Tensor, per_entry: int = 1) -> None:
    """Add output-gradient rows ``gr`` (N×m) to the costate statistics of ``st`` as ``spec`` asks
    (``per_entry > 1``: K-FAC-reduce before a dense fold, :func:`_reduce_rows`)."""
    dt = torch.promote_types(spec.dtype, gr.dtype) if gr.is_floating_point() else spec.dtype
    gc = gr.to(dt)
    st.g_sq = _add(st.g_sq, torch.linalg.vector_norm(gc).square())
    if spec.costates == "diag":
        st.g_sq_cols = _add(st.g_sq_cols, gc.pow(2).sum(0))
    elif spec.costates == "dense" or (spec.costates == "auto" and st.rows >= spec.out_dim):
        blocks = [_reduce_rows(r, per_entry) for r in st.g_rows + [gc]]
        st.gg, st.g_rows = _fold(blocks, st.gg, dt, spec.groups), []
    elif spec.costates in ("rows", "auto"):
        st.g_rows.append(gr)


def _add(acc: Optional[Tensor], t: Tensor) -> Tensor:
    return t if acc is None else acc.add_(t)


def _cat(rows: List[Tensor]) -> Tensor:
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def _is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2's parameters and gradients)."""
    dt = getattr(getattr(torch.distributed, "tensor", None), "DTensor", None)
    return dt is not None and isinstance(t, dt)


def _detach(value):
    return value.detach() if isinstance(value, Tensor) else value


def _forget_compiled_code() -> None:
    """Make ``torch.compile`` retrace what it compiled before the hooks about to be added.

    Dynamo does not guard compiled code on module hooks (``skip_nnmodule_hook_guards``, on by
    default), and ``torch.compile(model)`` compiles one wrapper frame shared by every compiled
    module: code traced for another instance of the same class before any hook existed — a model
    compiled for another optimizer — would run this instance without its hooks and lose its
    statistics silently. Dropping dynamo's code caches (``torch._dynamo.reset_code_caches``, not
    its whole state) makes the next compiled call of every model retrace once, this one with
    its hooks. Nothing is done unless dynamo was imported already (nothing can have been
    compiled)."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:
        return
    _guard_module_hooks()
    reset = getattr(dynamo, "reset_code_caches", None) or dynamo.reset
    reset()


_hook_guards = [False]


def _guard_module_hooks() -> None:
    """Make dynamo guard compiled code on module hooks (``skip_nnmodule_hook_guards = False``, a
    global dynamo setting; once, and only if dynamo was imported). The compiled capture traces a
    module's hook into the graph, so code traced for an instance of a class *without* hooks (a model
    of the same class compiled for another optimizer) must not run this instance: without hook
    guards it would (dynamo does not guard an empty hook dict), and its statistics would be lost."""
    if _hook_guards[0]:
        return
    dynamo = sys.modules.get("torch._dynamo")
    config = getattr(dynamo, "config", None) if dynamo is not None else None
    if config is None:
        return
    if getattr(config, "skip_nnmodule_hook_guards", False):
        config.skip_nnmodule_hook_guards = False
    _hook_guards[0] = True


class _Inert:
    """What a capture hook becomes in a copy of the model (``copy.deepcopy``, pickling): nothing."""

    def __call__(self, *args, **kwargs):
        return None


def _record(slot: int, x: Tensor, grad: Tensor) -> None:
    """The backward half of the compiled path: hand (input, ∂J/∂y) of a recorded call to its capture."""
    ref = _SLOTS.get(slot)
    cap = ref[0]() if ref is not None else None
    if cap is None or cap.removed:
        return
    _guard_module_hooks()  # (a compiled model records: dynamo is imported; traces from now on guard hooks)
    with phase("capture"):
        cap._accumulate(ref[1], x, None, grad.detach())


def _register_record_op():
    """``pmptrain::record_costate(grad, x, slot)``: :func:`_record` as a custom operator that the
    compiled backward calls at run time (opaque to dynamo, AOTAutograd and inductor) and keeps
    (an effectful operator is not removed as dead code). None where this torch lacks either API:
    compiled models then take the eager hooks (a graph break per module)."""
    custom_op = getattr(torch.library, "custom_op", None)
    effectful = getattr(torch.library, "_register_effectful_op", None)
    effect = getattr(getattr(torch.library, "EffectType", None), "ORDERED", None)
    if custom_op is None or effectful is None or effect is None:
        return None
    try:
        @custom_op("pmptrain::record_costate", mutates_args=())
        def record_costate(grad: Tensor, x: Tensor, slot: int) -> None:
            _record(slot, x, grad)

        @record_costate.register_fake
        def _(grad, x, slot):
            return None

        op = torch.ops.pmptrain.record_costate.default
        effectful(op, effect)
    except Exception:  # noqa: BLE001 — an API that changed shape: the eager hooks still work
        return None
    return op


_RECORD_OP = _register_record_op()


class _CostateTap(torch.autograd.Function):
    """The compiled path's record of one call: the identity on the output ``y``, whose backward
    calls ``pmptrain::record_costate(∂J/∂y, x, slot)`` (x saved as autograd saves activations)."""

    @staticmethod
    def forward(ctx, y, x, slot):
        ctx.save_for_backward(x)
        ctx.slot = slot
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        _RECORD_OP(grad, x, ctx.slot)
        return grad, None, None


class _ForwardHook:
    """Forward hook of one module: attaches a :class:`_CostateHook` to the output (eager), or routes
    the output through :class:`_CostateTap` (while dynamo traces it, ``torch.compile``)."""

    __slots__ = ("capture", "key", "slot")

    def __init__(self, capture: "ModuleCapture", key: str):
        self.capture, self.key = capture, key
        self.slot = _next_slot[0]
        _next_slot[0] += 1
        _SLOTS[self.slot] = (weakref.ref(capture), key)

    def __call__(self, module, args, kwargs, output):
        cap = self.capture
        if not cap.recording(module):
            return None
        if not isinstance(output, Tensor) or not output.requires_grad:
            return None
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, Tensor):
            return None
        entry = cap._entries[self.key]
        call = None
        if entry.spec is not None and entry.spec.calls:
            call = (tuple(_detach(a) for a in args), {k: _detach(v) for k, v in kwargs.items()})
        elif _RECORD_OP is not None and torch.compiler.is_compiling():
            return _CostateTap.apply(output, x.detach(), self.slot)
        output.register_hook(_CostateHook(cap, self.key, x.detach(), call))
        return None

    def __reduce__(self):
        return (_Inert, ())


class _TapHook:
    """The forward pre-hook or hook of a tap (:meth:`ModuleCapture.add_tap`); inert in copies."""

    __slots__ = ("tap", "which")

    def __init__(self, tap, which: str):
        self.tap, self.which = tap, which

    def __call__(self, *args):
        return getattr(self.tap, self.which)(*args)

    def __reduce__(self):
        return (_Inert, ())


class _ObserverHook:
    """Forward hook of an observed module (:meth:`ModuleCapture.observe`)."""

    __slots__ = ("capture", "observer")

    def __init__(self, capture: "ModuleCapture", observer):
        self.capture, self.observer = capture, observer

    def __call__(self, module, args, kwargs, output):
        cap = self.capture
        if not cap.recording(module):
            return None
        self.observer(module, args, kwargs, output)
        return None

    def __reduce__(self):
        return (_Inert, ())


class _RootHook:
    """Forward pre-hook of the optimizer's root module: notes a zero-size batch (the first tensor
    input has no entries along dimension 0)."""

    __slots__ = ("capture",)

    def __init__(self, capture: "ModuleCapture"):
        self.capture = capture

    def __call__(self, module, args, kwargs):
        cap = self.capture
        if not cap.recording(module):
            return None
        cap.root_trained = True
        for v in list(args) + list(kwargs.values()):
            if isinstance(v, Tensor):
                if v.dim() > 0 and v.shape[0] == 0:
                    cap.root_empty = True
                return None
        return None

    def __reduce__(self):
        return (_Inert, ())


class _RootLossHook:
    """Forward hook of the optimizer's root module: adds the loss the root returns — a 0-dim
    floating tensor under autograd, or the ``loss`` attribute of its output (Hugging Face's
    ``ModelOutput``) — to ``capture.root_loss`` (detached; the predicted-gain guard of the step
    compares the step's first-order gain with it)."""

    __slots__ = ("capture",)

    def __init__(self, capture: "ModuleCapture"):
        self.capture = capture

    def __call__(self, module, args, kwargs, output):
        cap = self.capture
        if not cap.recording(module):
            return None
        loss = output if isinstance(output, Tensor) else getattr(output, "loss", None)
        if isinstance(loss, Tensor) and loss.dim() == 0 and loss.is_floating_point() and loss.requires_grad:
            loss = loss.detach()
            cap.root_loss = loss if cap.root_loss is None else cap.root_loss + loss
        return None

    def __reduce__(self):
        return (_Inert, ())


class _CostateHook:
    """Tensor hook on a module output: hands (input, ∂J/∂y) to the statistics once, then lets go of
    the input."""

    __slots__ = ("capture", "key", "x", "call")

    def __init__(self, capture, key, x, call):
        self.capture, self.key, self.x, self.call = capture, key, x, call

    def __call__(self, grad: Tensor):
        cap = self.capture
        if cap.removed:
            return None
        if self.x is None:
            cap._repeated(self.key)
            return None
        x, call = self.x, self.call
        self.x = self.call = None
        cap._backward_runs()
        with phase("capture"):
            cap._accumulate(self.key, x, call, grad.detach())
        return None

    def __reduce__(self):
        return (_Inert, ())


class FunctionTap:
    """Base of a forward pre-hook / hook pair that holds a ``TorchFunctionMode`` open while its
    module's recorded forward runs, so that the functional calls inside it can be recorded
    (:mod:`pmptrain.attention`, :mod:`pmptrain.taps`). Subclasses implement :meth:`mode` (a fresh
    mode) and may narrow :meth:`active`; modes nest (one per pending forward)."""

    def __init__(self, capture: "ModuleCapture"):
        self.capture_ref = weakref.ref(capture)
        self._modes: List[Optional[object]] = []

    def mode(self):
        raise NotImplementedError

    def active(self, cap: "ModuleCapture", module: nn.Module) -> bool:
        """Whether this forward is tapped: the capture records it (:meth:`ModuleCapture.recording`)."""
        return cap.recording(module)

    def pre(self, module, args, kwargs):
        cap = self.capture_ref()
        mode = self.mode() if cap is not None and self.active(cap, module) else None
        if mode is not None:
            mode.__enter__()
        self._modes.append(mode)
        return None

    def post(self, module, args, kwargs, output):
        mode = self._modes.pop() if self._modes else None
        if mode is not None:
            mode.__exit__(None, None, None)
        return None


class _Entry:
    __slots__ = ("module", "adapter", "spec", "sentinel", "stats", "token", "counter", "grad_seen")

    def __init__(self, module, adapter, spec, sentinel, counter=None):
        self.module, self.adapter, self.spec, self.sentinel = module, adapter, spec, sentinel
        self.counter = counter if counter is not None else adapter  # counts the samples of a call
        self.stats = ModuleStats()
        self.token = None  # (weakref to the sentinel's .grad, its version) after the last backward
        self.grad_seen = False  # a backward pass accumulated into the sentinel's .grad since the last reset


class ModuleCapture:
    """Hooks on a set of named modules, accumulating :class:`ModuleStats` per module."""

    def __init__(self):
        self._entries: Dict[str, _Entry] = {}
        self._observers: Dict[str, object] = {}
        self._handles = []
        self._taps = []
        self._sentinel_keys: Dict[int, List[str]] = {}
        self._sharded_sentinels: List[Tuple[Tensor, List[str]]] = []  # FSDP2's (DTensor) sentinels, their keys
        self._paused = False
        self.removed = False
        self.removed_reason: Optional[str] = None
        self._warned_repeat = False
        self.root_empty = False  # a training forward of the watched root had a zero-size batch
        self.root_trained = False  # a training forward of the watched root ran under autograd
        self.root_loss: Optional[Tensor] = None  # Σ of the losses the watched root returned (_RootLossHook)
        self._grad_sq: Dict[int, Tensor] = {}  # ‖∇J_p‖² at the end of the last backward pass (watch_grads)
        self._grad_watched: Dict[int, weakref.ref] = {}  # id → (weak reference to) a parameter watch_grads records
        self._grad_sq_task = None  # the backward pass (graph task id) whose record is queued
        self.record_grad_sq = True  # the optimizer turns it off when no unit uses the record

    def watch_root(self, root: nn.Module, losses: bool = False) -> None:
        """Record whether a training forward pass of ``root`` (under autograd) received a
        zero-size batch: its first tensor input has no entries along dimension 0. This tells an
        empty batch apart from a zero gradient when no module is recorded (every parameter on a
        parameter rule)."""
        self._handles.append(root.register_forward_pre_hook(_RootHook(self), with_kwargs=True))
        if losses:  # the loss the root returns, for E-MSA's predicted-gain guard (:class:`_RootLossHook`)
            self._handles.append(root.register_forward_hook(_RootLossHook(self), with_kwargs=True))
        _forget_compiled_code()

    def watch_grads(self, params) -> None:
        """Record ``‖∇J_p‖²`` of each parameter at the end of every backward pass that accumulates
        into it (a device scalar: no host read), so that a later uniform rescaling of ``.grad`` —
        ``clip_grad_norm_``, GradScaler's unscaling — can be measured against it
        (:meth:`grad_sq`; used by ``rho_scale="costate"``, whose costates must carry the same
        scale as the gradient).

        The record is taken by an autograd-engine final callback that runs after every callback
        the backward pass queued itself — DDP's ``finalize_backward`` (which writes the averaged
        buckets into ``.grad``) and FSDP2's root post-backward callback (which reduce-scatters and
        assigns the sharded gradients) —, so that under those wrappers it is the norm of the
        gradient averaged over the ranks (of this rank's shard under FSDP2: :meth:`grad_sq`).
        A plain parameter's post-accumulate-grad hook, and every costate hook (FSDP2's sharded
        parameters are not in the autograd graph), note that a backward pass runs
        (:meth:`_backward_runs`). The same callback notes the sharded gradients FSDP2 assigned
        (:meth:`_reset_if_gradient_was_reset`)."""
        for p in params:
            lazy = isinstance(p, nn.parameter.UninitializedParameter)  # watched when the optimizer partitions again
            known = self._grad_watched.get(id(p))
            if not p.requires_grad or lazy or (known is not None and known() is p):
                continue
            self._grad_watched[id(p)] = weakref.ref(p)
            if not _is_dtensor(p) and hasattr(p, "register_post_accumulate_grad_hook"):
                self._handles.append(p.register_post_accumulate_grad_hook(self._grad_accumulated))

    def _grad_accumulated(self, p: Tensor) -> None:
        self._backward_runs()

    def _backward_runs(self) -> None:
        """Called by hooks during a backward pass: queue :meth:`_after_backward` once per pass.

        Final callbacks run in the order they were queued, and a callback queued by a callback
        runs after those already queued. Every callback that a hook of this pass queued (DDP's
        reducer queues ``finalize_backward`` from the hook of the last bucket's last gradient,
        FSDP2 its root callback from the pre-backward hook) is in the queue when
        :meth:`_queue_record` runs, so the record it queues runs after all of them."""
        if self._paused or self.removed or not (self.record_grad_sq or self._sharded_sentinels):
            return
        task = _graph_task_id() if _graph_task_id is not None else True
        if task == self._grad_sq_task:
            return
        self._grad_sq_task = task
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self._queue_record)
        except RuntimeError:  # not inside a backward pass (cannot happen from a backward hook)
            self._after_backward()

    def _queue_record(self) -> None:
        torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)

    def _after_backward(self) -> None:
        """At the end of a backward pass: the token of every sharded sentinel's gradient, and
        ``‖.grad‖²`` of every watched parameter that has a gradient (this rank's shard of a
        ``DTensor`` gradient)."""
        self._grad_sq_task = None
        if self.removed:
            return
        for sentinel, keys in self._sharded_sentinels:
            g = sentinel.grad
            if g is not None:
                token = (weakref.ref(g), g._version)
                for k in keys:
                    self._entries[k].token = token
        if not self.record_grad_sq:
            return
        for key, ref in self._grad_watched.items():
            p = ref()
            g = p.grad if p is not None else None
            if g is None or g.is_sparse:
                continue
            g = g.detach()
            if _is_dtensor(g):
                g = g.to_local()
            self._grad_sq[key] = (g.abs().square() if g.is_complex() else g.square()).sum()

    def grad_sq(self, p: Tensor) -> Optional[Tensor]:
        """``‖∇J_p‖²`` as it was at the end of the last backward pass (None: not recorded since the
        last :meth:`reset`); for a ``DTensor`` (FSDP2), the square norm of this rank's shard."""
        return self._grad_sq.get(id(p))

    def recording(self, module: nn.Module) -> bool:
        """Whether a forward of ``module`` now is recorded: capture live and not paused, the module
        in training mode, autograd enabled (the one gate of every forward hook)."""
        return not (self._paused or self.removed) and module.training and torch.is_grad_enabled()

    # ------------------------------------------------------------------ registration
    def add(self, key: str, module: nn.Module, adapter, spec: CaptureSpec, sentinel: Optional[Tensor],
            counter=None, hook: bool = True) -> None:
        """Start recording ``module`` under ``key`` for ``spec`` (``adapter``: its
        :class:`~pmptrain.modules.AffineAdapter` or None; ``sentinel``: the parameter whose ``.grad``
        tells when the module's gradient was reset; ``counter``: the adapter whose ``batch_size``
        counts a call's samples when ``adapter`` is None — a module a rule takes without an
        adapter, such as the iterative solver's, still counts tokens for a row-wise layer; default
        ``adapter``, and the leading dimension without either). No-op if ``key`` is recorded already."""
        if key in self._entries:
            return
        owner_ref = _OWNERS.get(module)
        owner = owner_ref() if owner_ref is not None else None
        if owner is not None and owner is not self and not owner.removed:
            owner.remove(
                f"another pmptrain optimizer registered its hooks on module {key!r} of the same "
                "model; this optimizer's hooks were removed (one optimizer per module)"
            )
        _OWNERS[module] = weakref.ref(self)
        _forget_compiled_code()
        self._entries[key] = _Entry(module, adapter, spec, sentinel, counter)
        if hook:  # else the records come from a tap (:meth:`add_tap`)
            self._handles.append(module.register_forward_hook(_ForwardHook(self, key), with_kwargs=True))
        if sentinel is not None:
            keys = self._sentinel_keys.setdefault(id(sentinel), [])
            if not keys and _is_dtensor(sentinel):  # not in the autograd graph: tokens at the end of a pass
                self._sharded_sentinels.append((sentinel, keys))
            elif not keys:
                self._handles.append(sentinel.register_post_accumulate_grad_hook(self._make_token_hook(keys)))
            keys.append(key)

    def add_tap(self, module: nn.Module, tap) -> None:
        """Register ``tap.pre`` / ``tap.post`` as the forward pre-hook and hook of ``module`` (the
        post hook runs even when the forward raises): a tap records calls a module's forward makes
        internally into entries added with ``hook=False`` (:mod:`pmptrain.attention`)."""
        if any(t is tap for t in self._taps):
            return
        self._taps.append(tap)
        self._handles.append(module.register_forward_pre_hook(_TapHook(tap, "pre"), with_kwargs=True))
        self._handles.append(module.register_forward_hook(_TapHook(tap, "post"), with_kwargs=True, always_call=True))

    def _make_token_hook(self, keys: List[str]):
        entries = self._entries

        def hook(param: Tensor) -> None:
            g = param.grad
            token = (weakref.ref(g), g._version) if g is not None else None
            for k in keys:
                entries[k].token = token
                entries[k].grad_seen = True

        return hook

    def keys(self):
        return self._entries.keys()

    def observe(self, key: str, module: nn.Module, observer) -> None:
        """Call ``observer(module, args, kwargs, output)`` after every training forward of ``module``
        under autograd (while not paused): a rule that reads what it needs from the call itself (the
        additive rule reads its parameters' uses from the call's autograd graph). It is kept as
        :meth:`observation` ``(key)``; removed with the capture. No-op if ``key`` is observed already."""
        if key in self._observers:
            return
        self._observers[key] = observer
        self._handles.append(module.register_forward_hook(_ObserverHook(self, observer), with_kwargs=True))

    def observation(self, key: str):
        """The observer registered under ``key`` (None if none)."""
        return self._observers.get(key)

    # ------------------------------------------------------------------ accumulation
    def _reset_if_gradient_was_reset(self, entry: _Entry) -> None:
        st = entry.stats
        if st.empty or entry.sentinel is None:
            return
        g = entry.sentinel.grad
        if g is None:
            # FSDP2 assigns a sharded parameter's gradient only when a backward pass that synchronises
            # reduce-scatters it: without a gradient seen since the last reset (no token), the
            # statistics are those of passes that accumulated without synchronising (no_sync)
            if entry.token is not None or not _is_dtensor(entry.sentinel):
                entry.stats = ModuleStats()
            return
        token = entry.token
        if token is not None and token[0]() is g and token[1] == g._version:
            return
        if not bool(g.any()):  # zeroed in place (rare path: a changed gradient)
            entry.stats = ModuleStats()

    def _accumulate(self, key: str, x: Tensor, call, g: Tensor) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        task = _graph_task_id() if _graph_task_id is not None else object()
        new_pass = task != entry.stats._task
        if new_pass:
            self._reset_if_gradient_was_reset(entry)
        st, spec, adapter, module = entry.stats, entry.spec, entry.adapter, entry.module
        if new_pass:
            st._task = task
            counter = entry.counter
            st.samples += counter.batch_size(module, x) if counter is not None else (x.shape[0] if x.dim() > 0 else 1)
        if spec is None:  # inactive this step (an amortised step): the sample count only
            return
        if spec.calls:
            args, kwargs = call
            st.calls.append((args, kwargs, g))
            st.rows += g.shape[0] if g.dim() > 0 else 1
            return
        # slices of whole entries of the leading dimension, at most ~_CHUNK_ELEMENTS row entries each
        lead = x.shape[0] if adapter.batched(module, x) else 1
        rows_per_entry = max(1, g.numel() // max(1, spec.out_dim * lead))
        step = max(1, _CHUNK_ELEMENTS // (rows_per_entry * max(1, spec.in_dim, spec.out_dim)))
        if step >= lead or (spec.states not in ("dense", "auto", "diag")
                            and spec.costates not in ("dense", "auto", "diag")):
            slices = [(x, g)]
        else:
            slices = [(x[i : i + step], g[i : i + step]) for i in range(0, lead, step)]
        per_entry = rows_per_entry if spec.reduce and adapter.batched(module, x) else 1
        # a call without a batch dimension: its output is every sample's (ModuleStats.shared_g); an
        # embedding's call with a batch dimension of 1 may be one too (decided in unify_shared_)
        index = getattr(adapter, "index_input", False)
        shared = x.dim() <= 1 if index else not adapter.batched(module, x)
        if index and not shared and x.dim() >= 2 and x.shape[0] == 1 and per_entry == 1:
            shared = x
        for xs, gs in slices:
            self._add_rows(st, spec, adapter, module, xs, gs, per_entry, shared)

    @staticmethod
    def _add_rows(st: ModuleStats, spec: CaptureSpec, adapter, module, x: Tensor, g: Tensor, per_entry: int = 1,
                  shared=False) -> None:
        """Add a call's rows to ``st``. ``shared``: True for a call without a batch dimension, the
        call's indices for an embedding called with a batch dimension of 1 (both kept as
        ``shared_g`` until :meth:`ModuleStats.unify_shared_`), False otherwise."""
        # wider activations than the spec's dtype (``model.double()`` after the optimizer was built):
        # the statistics follow them, as the rules' solves follow the parameters' dtype
        dt = torch.promote_types(spec.dtype, g.dtype) if g.is_floating_point() else spec.dtype
        gr = adapter.output_rows(module, g)
        st.rows += gr.shape[0]
        if spec.states == "counts":
            idx = adapter.input_rows(module, x).reshape(-1)
            if st.counts is None:
                st.counts = torch.zeros(spec.in_dim, dtype=dt, device=idx.device)
            # not torch.bincount: on a GPU it reads max(idx) to the host to size its output
            st.counts.index_add_(0, idx, torch.ones((), dtype=dt, device=idx.device).expand(idx.shape[0]))
        elif spec.states != "none":
            dense = spec.states == "dense" or (spec.states == "auto" and st.rows >= spec.in_dim)
            gram = getattr(adapter, "input_gram", None)
            gram = gram(module, x, dt) if gram is not None and dense and per_entry == 1 and spec.groups == 1 else None
            if gram is not None:  # XᵀX and Σx without the rows (a stride-1 convolution: ConvAdapter.input_gram)
                st.x_sum = _add(st.x_sum, gram[1])
                st.xx, st.x_rows = _fold(st.x_rows, _add(st.xx, gram[0]), dt), []
            else:
                xr = adapter.input_rows(module, x)
                st.x_sum = _add(st.x_sum, xr.sum(0, dtype=dt))
                if spec.states == "diag":
                    st.x_sq = _add(st.x_sq, xr.to(dt).pow(2).sum(0))
                elif dense:
                    blocks = [_reduce_rows(r, per_entry) for r in st.x_rows + [xr]]
                    st.xx, st.x_rows = _fold(blocks, st.xx, dt, spec.groups), []
                else:
                    st.x_rows.append(xr)
        if spec.costates != "none":
            if shared is not False:  # folded by ModuleStats.unify_shared_ once the ranks' rows are averaged
                st.shared_g.append(gr)
                st.shared_pass.append(st._task)
                st.shared_x.append(None if shared is True else shared.detach().clone())
                st.shared_spec = spec
            else:
                _add_costates(st, spec, gr, per_entry)

    def _repeated(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.stats.repeated += 1
        if not self._warned_repeat:
            self._warned_repeat = True
            warnings.warn(
                f"a second backward pass reached the recorded forward call of module {key!r} "
                "(retain_graph=True): its gradient adds to .grad, but the curvature statistics keep "
                "the first backward pass only",
                stacklevel=2,
            )

    # ------------------------------------------------------------------ consumption
    def pop(self, key: str) -> ModuleStats:
        """The statistics of ``key`` since the last reset; starts a new accumulation."""
        entry = self._entries[key]
        st, entry.stats = entry.stats, ModuleStats()
        return st

    def snapshot(self) -> Dict[str, ModuleStats]:
        """The statistics of every module as they are now, for :meth:`restore` (the optimizer
        proposes a step a second time, on its careful path, after the fast one failed its check)."""
        return {k: e.stats for k, e in self._entries.items()}

    def restore(self, snapshot: Dict[str, ModuleStats]) -> None:
        """Put back the statistics of :meth:`snapshot` (those popped since, possibly folded)."""
        for k, st in snapshot.items():
            if k in self._entries:
                self._entries[k].stats = st

    def peek(self, key: str) -> ModuleStats:
        return self._entries[key].stats

    def has_data(self) -> bool:
        return any(not e.stats.empty for e in self._entries.values())

    def silent_keys(self) -> List[str]:
        """The recorded modules that went silent since the last reset: a training forward of the
        watched root ran under autograd (or another module recorded: a submodule was called on
        its own) and a backward pass accumulated into the module's sentinel
        parameter, yet the module's own forward hook recorded nothing, although the module is in
        training mode. Its parameters were then used without calling the module — a parent read
        them directly (``nn.MultiheadAttention``'s ``out_proj``, a fused kernel) — which is the
        model's structure, not the user's doing (eval mode, ``no_grad`` and ``torch.compile`` leave
        ``root_trained`` unset or the module untrained)."""
        if not self.root_trained and all(e.stats.empty for e in self._entries.values()):
            return []  # no training forward seen (a forward of a submodule alone counts once one recorded)
        return [k for k, e in self._entries.items()
                if e.grad_seen and e.stats.empty and e.module.training]

    def saw_empty_pass(self) -> bool:
        """Whether, since the last reset, the watched root received a zero-size batch or a
        recording module's backward pass carried no rows (``ModuleStats.rows == 0`` after a pass)."""
        return self.root_empty or any(e.spec is not None and e.stats._task is not None and e.stats.rows == 0
                                      for e in self._entries.values())

    def reset(self) -> None:
        """Drop every accumulated statistic (``optimizer.zero_grad()``). Pending records of
        forwards whose backward has not run yet still count when it runs, as their gradients do."""
        for e in self._entries.values():
            e.stats = ModuleStats()
            e.grad_seen = False
            e.token = None
        for o in self._observers.values():
            reset = getattr(o, "reset", None)
            if reset is not None:
                reset()
        self.root_empty = self.root_trained = False
        self.root_loss = None
        self._grad_sq.clear()
        self._grad_sq_task = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Record nothing inside the block (used while the optimizer re-evaluates modules)."""
        old, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = old

    def remove(self, reason: str = "the optimizer was detached from its model") -> None:
        """Remove every hook and drop the statistics; the modules are left as they were."""
        if self.removed:
            return
        self.removed, self.removed_reason = True, reason
        for slot in [k for k, (ref, _) in _SLOTS.items() if ref() is self or ref() is None]:
            del _SLOTS[slot]
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._grad_watched.clear()
        self._sharded_sentinels.clear()
        for key, e in self._entries.items():
            ref = _OWNERS.get(e.module)
            if ref is not None and ref() is self:
                del _OWNERS[e.module]
            e.stats = ModuleStats()
