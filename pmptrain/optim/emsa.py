r"""E-MSA and basic MSA as torch optimizers: configurations of the shell.

:class:`EMSA` assigns a closed-form rule to every module that has one (:mod:`pmptrain.modules`):
:class:`~pmptrain.optim.affine.AffineEMSARule` to ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.Embedding``
and GPT-2's ``Conv1D`` — jointly to modules that share a weight —,
:class:`~pmptrain.optim.blocks.GroupedEMSARule` to grouped/depthwise convolutions and
:class:`~pmptrain.optim.blocks.ChannelEMSARule` to the affine of normalisation layers; with
``solver="iterative"``, the iterative rule to every module with parameters. Everything else takes the
Adam/SGD fallback (with a warning naming the module and the reason; ``strict=True`` raises). :class:`MSA` is E-MSA with ``ρ = 0``.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from torch import nn
from torch.nn.utils import parametrize

from ..attention import tap_available
from ..modules import adapter_for, registration_hint, unsupported_reason
from .additive import AdditiveEMSARule
from .affine import AffineEMSARule
from .blocks import ChannelEMSARule, GroupedEMSARule
from .elementwise import FallbackRule
from .hyper import Choice
from .iterative import IterativeEMSARule
from .attention import MHAEMSARule
from .shell import PMPOptimizer, Unsupported, unwrap_model

__all__ = ["EMSA", "MSA", "controlled_block"]

#: below this ``lr`` (δ = 1/lr above 100) a closed-form E-MSA step with ρ > 0 is at most an SGD
#: step of size ``lr``: the value of an Adam habit (``lr=1e-3``), not of a proximal weight
LR_IMPLAUSIBLE = 1e-2


def controlled_block(module: nn.Module) -> nn.Module:
    """Mark ``module`` as one controlled block for the iterative E-MSA solver (returns it): its
    whole forward, activation and residual included, is the controlled function of every parameter
    inside it (see ``EMSA(blocks=...)``, which does the same by class or name). The closed form
    ignores the mark (it solves the affine modules inside)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"controlled_block: expected an nn.Module, got {type(module).__name__}")
    module._pmptrain_block = True
    return module


#: The keywords a setting fills (those the caller leaves at None).
SETTING_KEYS = ("lr", "rho", "rho_scale", "grad_decay", "stat_decay", "stat_every", "amortise", "stat_reduce")

#: E-MSA's settings (docs/algorithms.md, "Settings"): ``classic`` is the paper's E-MSA in mean units
#: (ρ 1, δ = 1/lr = 1), measured best per step on the MLP/CNN/ResNet classifier benches;
#: ``conv`` is the classic step with its statistics captured every 10th step, reduced over each
#: image's positions and the steps between bounded by their own gradient — measured 2–4× ahead of
#: classic per second to every baseline's final accuracy on the convolutional benches, ending 2.8
#: points above it on the ResNet bench and 0.46 below on the small CNN (docs/performance.md,
#: "Per second"); ``transformer`` puts ρ in units of each layer's rms costate (ρ 8, δ 1e-3) and
#: averages the linear term and the penalties over the recent batches (β 0.95), measured best on
#: the GPT bench and nanoGPT.
SETTINGS = {
    "classic": dict(lr=1.0, rho=1.0, rho_scale="none", grad_decay=0.0, stat_decay=0.0,
                    stat_every=1, amortise="kept", stat_reduce=False),
    "conv": dict(lr=1.0, rho=1.0, rho_scale="none", grad_decay=0.0, stat_decay=0.0,
                 stat_every=10, amortise="bounded", stat_reduce=True),
    "transformer": dict(lr=1e3, rho=8.0, rho_scale="costate", grad_decay=0.95, stat_decay=0.95,
                        stat_every=1, amortise="kept", stat_reduce=False),
}

#: Keywords whose explicit value (other than the one given here, their default) keeps
#: ``setting="auto"`` off ``conv``: their meaning is the exact, classic one.
_EXACT_KEYS = {"stat_every": None, "amortise": None, "stat_reduce": None, "stat_decay": None, "grad_decay": None,
               "eig_refresh": 1, "route": "auto", "costate": "auto", "penalty_units": "mean"}


def sequence_modules(model: nn.Module) -> List[str]:
    """The names of the modules that make ``model`` a token/attention model for ``setting="auto"``:
    ``nn.Embedding`` / ``nn.EmbeddingBag`` (subclasses included: token or position tables) and
    ``nn.MultiheadAttention``."""
    root = unwrap_model(model)[0] if isinstance(model, nn.Module) else None
    if root is None:
        return []
    kinds = (nn.Embedding, nn.EmbeddingBag, nn.MultiheadAttention)
    return [n or "(the model)" for n, m in root.named_modules() if isinstance(m, kinds)]


def conv_modules(model: nn.Module) -> List[str]:
    """The names of the modules that make ``model`` convolutional for ``setting="auto"``:
    ``nn.Conv1d/2d/3d`` (subclasses included) with a trainable parameter of their own."""
    root = unwrap_model(model)[0] if isinstance(model, nn.Module) else None
    if root is None:
        return []
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return [n or "(the model)" for n, m in root.named_modules()
            if isinstance(m, kinds) and any(p.requires_grad for p in m.parameters(recurse=False))]


def choose_setting(setting: str, model: nn.Module, given: Dict[str, Any],
                   solver: str = "closed") -> Tuple[str, str, Dict[str, Any]]:
    """``(name, why, values)``: the setting that fills the keywords of :data:`SETTING_KEYS` left at
    None in ``given``. ``"auto"``: ``classic`` when any of ``lr``, ``rho``, ``rho_scale`` is given
    (their meaning is the classic one; the rest keep the classic values) or with the iterative
    solver; else ``transformer`` for a model with token embeddings or attention
    (:func:`sequence_modules`); else ``conv`` for a model with trainable convolutions
    (:func:`conv_modules`) unless a curvature keyword is given (:data:`_EXACT_KEYS`:
    ``stat_every``, ``amortise``, ``stat_reduce``, ``stat_decay``, ``grad_decay``, or
    ``eig_refresh``, ``route``, ``costate``, ``penalty_units`` away from their defaults) — then
    ``classic``, their meaning before ``conv`` existed; ``classic`` otherwise. An explicit setting name fills only
    what is not given."""
    setting = Choice(("auto", *SETTINGS)).check("setting", setting)
    if setting == "auto":
        core = [k for k in ("lr", "rho", "rho_scale") if given.get(k) is not None]
        if solver == "iterative":
            setting, why = "classic", "auto: solver='iterative'"
        elif core:
            setting, why = "classic", f"auto: {', '.join(core)} given"
        else:
            found = sequence_modules(model)
            convs = [] if found else conv_modules(model)
            exact = [k for k, off in _EXACT_KEYS.items() if given.get(k) is not None and given.get(k) != off]
            if found:
                more = f" and {len(found) - 1} more" if len(found) > 1 else ""
                setting, why = "transformer", f"auto: token embeddings or attention ({found[0]}{more})"
            elif convs and exact:
                setting, why = "classic", f"auto: convolutions, but {', '.join(exact)} given"
            elif convs:
                more = f" and {len(convs) - 1} more" if len(convs) > 1 else ""
                setting, why = "conv", f"auto: convolutions ({convs[0]}{more})"
            else:
                setting, why = "classic", "auto: no token embedding, attention or convolution module"
    else:
        why = "given"
    values = {k: (given[k] if given.get(k) is not None else SETTINGS[setting][k]) for k in SETTING_KEYS}
    return setting, why, values


def _check_blocks(blocks, model, solver):
    """``(types, names)`` of ``EMSA(blocks=...)``, each entry checked."""
    if isinstance(blocks, (str, type)):
        blocks = (blocks,)
    try:
        entries = list(blocks)
    except TypeError:
        raise TypeError(f"invalid blocks={blocks!r}: must be a list of module classes and/or module names") from None
    if entries and solver != "iterative":
        raise ValueError(
            f"invalid blocks={blocks!r} with solver={solver!r}: a block is a controlled function of the iterative "
            "solver (the closed form maximises the affine modules inside it); use solver='iterative'")
    root = unwrap_model(model)[0] if isinstance(model, nn.Module) else None
    named = dict(root.named_modules()) if root is not None else {}
    types, names = [], set()
    for b in entries:
        if isinstance(b, type) and issubclass(b, nn.Module):
            if root is not None and not any(isinstance(m, b) for m in named.values()):
                raise ValueError(f"invalid blocks: no module of the model is a {b.__name__}")
            types.append(b)
        elif isinstance(b, str):
            if root is not None and b not in named:
                raise ValueError(f"invalid blocks: module {b!r} does not exist in the model")
            if b == "":
                raise ValueError("invalid blocks: '' is the whole model, not a block (name its submodules)")
            names.add(b)
        else:
            raise TypeError(f"invalid blocks entry {b!r}: must be an nn.Module subclass or a module name")
    return tuple(types), names


def _outside_stacklevel() -> int:
    """The ``stacklevel`` of the first caller outside pmptrain and torch.optim (the user's line)."""
    import os
    import sys

    inside = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
              os.path.dirname(os.path.abspath(sys.modules["torch.optim"].__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


class EMSA(PMPOptimizer):
    r"""Extended method of successive approximations (Li, Chen, Tai & E, JMLR 2018) as a torch optimizer.

    For each controlled module (or tied group of modules) ``t`` and each step,

    .. math::

        θ_t ← \arg\max_θ\ ⟨−∇_θ J, θ − θ_k⟩ − \tfrac{ρ}{2}\overline{‖f_t(x,θ)−f_t(x,θ_k)‖²}
              − \tfrac{ρ}{2}\overline{‖∇_x p̂·f_t(x,θ) − ∇_x p̂·f_t(x,θ_k)‖²}
              − \tfrac{δ}{2}‖θ−θ_k‖²,\qquad δ = 1/\mathrm{lr},

    where ``∇J`` is the parameter's ``.grad`` when ``step()`` runs (after clipping, accumulation or
    any other edit, unscaled under GradScaler) and the means run over the samples of every backward
    pass since the last ``zero_grad()``. The maximiser is exact for affine modules
    for every standard parameterised layer (docs/algorithms.md §2); all other parameters take the
    fallback step.
    Decoupled weight decay ``θ ← (1 − η·wd)θ`` with ``η = fallback_lr·lr/base_lr`` applies to
    every parameter of a group with ``weight_decay > 0`` (docs/algorithms.md, "Weight decay").

    Args:
        model: the ``nn.Module`` to train (or a ``DistributedDataParallel`` / ``torch.compile``
            wrapper). Hooks are registered on it; remove them with :meth:`detach` (or use the
            optimizer as a context manager); they also go when the optimizer is garbage-collected.
        params: optional parameters or param-group dicts (default: every trainable parameter, one
            group). Every key below may be set per group; weight and bias of one module may sit in
            different groups (``rho``, ``route``, ``costate``, ``stat_decay`` … of a module come from
            its weight's group; ``lr`` and ``weight_decay`` are per parameter).
        setting: which values ``lr``, ``rho``, ``rho_scale``, ``grad_decay``, ``stat_decay``,
            ``stat_every``, ``amortise`` and ``stat_reduce`` take when left at None
            (:data:`SETTINGS`; docs/algorithms.md, "Settings"): ``"classic"`` (ρ 1, lr 1, ρ as
            given, no averaging, statistics every step: the paper's E-MSA, best per step on the
            classifier benches), ``"conv"`` (classic with ``stat_every=10``,
            ``amortise="bounded"``, ``stat_reduce=True``: ahead per second on the convolutional
            benches), ``"transformer"`` (ρ 8 × each layer's rms costate, lr 1e3, gradient and
            statistics averaged with β 0.95: best on the GPT bench and nanoGPT) or ``"auto"``
            (default): ``classic`` if any of ``lr``, ``rho``, ``rho_scale`` is given or
            ``solver="iterative"``; else ``transformer`` for a model with token embeddings or
            attention (``nn.Embedding``, ``nn.EmbeddingBag``, ``nn.MultiheadAttention``, subclasses
            included); else ``conv`` for a model with trainable ``nn.Conv1d/2d/3d`` unless a
            curvature keyword is given (``stat_every``, ``amortise``, ``stat_reduce``,
            ``stat_decay``, ``grad_decay``, or ``eig_refresh``, ``route``, ``costate``,
            ``penalty_units`` away from their defaults: then ``classic``); ``classic`` otherwise. :meth:`rule_table`
            prints the choice and why on its first line.
        lr: proximal step size, ``δ = 1/lr`` (default: the setting's, 1.0 or 1e3). With ``rho=0`` the update is exactly
            ``θ ← θ − lr·∇J`` (SGD). Schedulers change it: with ``s = lr/base_lr`` (``base_lr``:
            the group's ``lr`` at creation) ρ becomes ``ρ/s`` too, so every closed-form step is
            exactly ``s`` times its value at ``base_lr``; the fallback steps scale with ``s``, so
            ``lr = 0`` freezes the whole model.
        rho: 0 ≤ ρ ≤ 2**64, weight of the feasibility penalties (default: the setting's, 1.0 or 8.0); the bound (and
            ``lr`` = 0 or in [2**-64, 2**64]) keeps ρ·C, ρ² and δ = 1/lr finite in float32.
        rho_scale: ``"none"`` (classic: ρ as given, as in the paper) or ``"costate"`` (transformer): ρ in units
            of each unit's root-mean-square costate entry, ``ρ_t = ρ·r_t``
            (:func:`pmptrain.hamiltonian.costate_rms`) — the penalties then keep pace with the
            Hamiltonian's linear term in every layer (the transformer setting).
        route: ``"auto"`` (default) | ``"primal"`` | ``"gram"`` — how each side's statistic is kept
            and solved (all exact; auto uses the N×N Gram form on a side with fewer rows N than
            features).
        costate: how the costate penalty ``ρC_p`` enters. ``"exact"``; ``"isotropic"`` replaces
            ``ρC_p`` by ``ρ·tr(C_p)/m·I`` (one SPD solve; exact when C_p is isotropic);
            ``"auto"`` (default) uses ``"isotropic"`` when a side is in Gram form (wide Linear
            layers, where C_p is measured to be tiny) and ``"exact"`` otherwise.
        stat_decay: β ∈ [0, 1): running averages ``C ← βC + (1−β)C_batch`` (default: the setting's,
            0 — this step's backward passes only — or 0.95). β > 0 forces the primal route and the exact costate.
        eig_refresh: recompute the eigenbases every k steps when ``stat_decay > 0`` (default 1).
        grad_decay: β_S ∈ [0, 1): the linear term of every closed-form unit is the running average
            of the gradient, ``S̄ ← β_S S̄ + (1−β_S)∇J`` (initialised at the first gradient; Adam's
            first moment), instead of this step's ``∇J`` (default: the setting's, 0 or 0.95). Use it with ``stat_decay``
            (the same β): then the step maximises the augmented Hamiltonian of the exponentially
            weighted mixture of the recent batches; alone, a direction the current batch does
            not excite is divided by δ only (docs/algorithms.md, "Averaged steps").
        stat_every: K ≥ 1 — capture the statistics only on every K-th step (default: the
            setting's, 1 — every step — or 10 for ``conv``).
            The steps in between solve the same closed form with the statistics and eigenbases of
            the last capture and their own ``.grad`` (amortised curvature, K-FAC's factor interval):
            no capture cost and no eigendecomposition on those steps, at an accuracy cost measured in
            docs/performance.md. Applies to the matrix rule (Linear, convolutions, embeddings,
            Conv1D, ties) on the primal route (more rows than features: convolutions, transformer
            layers); a layer the step solves in Gram form (fewer rows than features, e.g. an MLP at
            batch 128) is cheap already and is solved exactly every step. Not with
            ``costate="isotropic"``.
        amortise: the steps between two refreshes of ``stat_every = K > 1``: ``"kept"`` (the kept
            statistics' closed form as it is; the default except under ``conv``) or ``"bounded"``
            (``conv``'s) — in the kept eigenbases
            ``V``, ``U``, each curvature ``μ_i + λ_j`` is raised to ``2√k·|(VᵀSU)_ij|`` (``k =
            ρ_p/ρ_x``), the lower bound that this step's own gradient puts on its batch's curvature
            (Cauchy–Schwarz), so a direction the refresh batch did not excite is not stepped by
            ``lr·S``: each entry of the step in the kept basis is at most ``1/(2√k ρ)``. One
            elementwise pass; nothing is captured (docs/algorithms.md, "Amortised curvature"). Or
            ``"rescaled"``: ``"bounded"`` with each side's kept eigenvalues scaled by the ratio of this
            step's trace to the kept one (``tr C_x``, ``tr C_p``, from ``Σ‖x‖²`` and ``Σ‖p̂‖²``
            captured between refreshes — one elementwise pass per side), and ``rho_scale="costate"``'s
            rms costate from this step: the kept curvature follows the scale of the states and
            costates, which moves by orders of magnitude early in training (a unit of one Linear or
            convolution; embeddings and ties stay ``"bounded"``; not with ``stat_reduce``).
        stat_reduce: K-FAC-reduce statistics (Eschenhagen et al. 2023; default: the setting's,
            False, True for ``conv``): the state
            and costate rows of one entry of the batch dimension (a sequence's tokens, an image's
            output positions; ``L`` rows) are summed and divided by ``√L`` before the outer
            product, so ``C_x``, ``C_p`` cost ``L``× fewer flops. Exact when an entry's rows are
            equal, an approximation otherwise (docs/algorithms.md, "Reduced statistics"); the
            matrix rule, on the sides folded into dense statistics (more rows than features, or
            ``route="primal"``); a side in Gram form keeps its rows and stays exact.
        eig_floor: lower clamp of eigenvalues (default 0.0); eig_float64: eigensolves in float64
            (default False).
        max_step: τ > 0 or None — the trust region of every closed-form unit (module or tie, weight
            and bias together): ``‖Δθ‖ ≤ τ·s·max(‖θ‖, ‖θ‖₀)`` with ``s = lr/base_lr`` and ``‖θ‖₀²`` the
            unit's number of output rows, enforced by shortening the maximiser along itself (still
            an ascent step of H̃; :mod:`pmptrain.trust`, docs/algorithms.md §5). Default 0.1; None
            turns it off (the 0.1.x step). Not applied with ρ = 0 or ``solver="iterative"``. An
            ``lr`` below 1e-2 with the closed form warns once (δ = 1/lr: not an Adam learning rate).
        max_gain: κ > 0 or None — the predicted-gain guard of the whole step: when the loss ``J`` of
            the gradient is known (``step(closure)``, or the model returned it: a 0-dim tensor or
            Hugging Face's ``output.loss``) and the step's first-order gain
            ``G = Σ⟨−∇J, Δθ⟩`` exceeds ``κ·J``, every update is shortened along itself by ``κJ/G``
            (for a loss bounded below by 0 the units' summed steps would otherwise be predicted to
            overshoot it; :func:`pmptrain.trust.gain_factor`, docs/algorithms.md §5). The factor is
            ``opt.last_step["gain_scale"]``. Default 0.5; None turns it off. One process only.
        fallback: ``"adam"`` (default) or ``"sgd"`` for parameters without a maximiser.
        fallback_lr: step size of the fallback (default 1e-3), scaled by ``lr/base_lr``.
        betas, eps: Adam fallback coefficients (default (0.9, 0.999), 1e-8).
        momentum: SGD fallback momentum (default 0.9).
        weight_decay: decoupled weight decay λ ≥ 0 (default 0).
        solver: ``"closed"`` (default) or ``"iterative"`` — ``inner_steps`` iterations of
            ``inner_optimizer`` (``"lbfgs"``, ``"adam"``, ``"sgd"``) with step ``inner_lr`` on the
            augmented Hamiltonian of *every* module with parameters (defaults 10, 1.0, ``"lbfgs"``;
            L-BFGS runs at most ``inner_steps`` iterations, scipy L-BFGS-B's ``maxiter``).
        inner_max_eval: at most this many evaluations of the inner objective by L-BFGS, line-search
            evaluations included (default None: torch's ``1.25·inner_steps``; scipy's L-BFGS-B
            allows 15 000, so its 10 iterations are never cut short by evaluations).
        rho_state, rho_costate: ρ_x and ρ_p ≥ 0, the weights of the state and the costate penalty
            (default None: both ``rho``). The closed form needs ρ_x > 0 whenever ρ_p > 0.
        penalty_units: ``"mean"`` (default: each penalty is a mean over the B samples of the step)
            or ``"sum"`` (a sum over them, as in the reference code of Li et al.: in mean units the
            state weight is ρ_x·B and the costate weight ρ_p/B, B counted as in the Note below).
            ``"sum"`` needs the statistics of the step itself (``stat_decay=0``, ``stat_every=1``).
        proximal: True (default): the proximal term with δ = 1/lr; False: δ = 0, no proximal term,
            as in the reference (``solver="iterative"`` with ``inner_optimizer="lbfgs"`` only: the
            line search bounds the inner steps; ``lr`` then only scales the penalties under a
            schedule, ``ρ/s``, and ``lr = 0`` still freezes).
        l2: λ ≥ 0, an L2 regulariser ``−(λ/2)‖θ‖²`` inside H of every controlled unit (default 0;
            ``solver="iterative"`` only; exact, not linearised, and not scaled by schedules). Do not
            also add it to the loss you backward (its gradient would then count twice); report the
            regularised objective with :meth:`l2_penalty`. Not weight decay (which is decoupled).
        perturb_init: a ≥ 0: the inner solver starts from ``θ_k + a·U(−1, 1)`` instead of θ_k
            (default 0; ``solver="iterative"`` only) — the reference's sin toy uses 0.005, which
            breaks the symmetry of zero-initialised blocks with a repeated input.
        perturb_seed: seed of those draws (default 0); each unit's draw at its k-th step depends on
            the seed, the unit's name and k only, so runs are reproducible and resume identically.
        blocks: controlled blocks for ``solver="iterative"``: module classes (every instance) and/or
            module names (``model.named_modules()``). A block is one unit: its controlled function
            ``f_t(x, θ)`` is the whole module — activation, residual and submodules included —, θ
            every parameter inside it, and its submodules get no unit of their own (the outermost
            block wins). Modules marked with :func:`pmptrain.controlled_block` are blocks too. E.g.
            ``blocks=(TanhResidualBlock,)`` maximises ``x + 0.25·tanh(xK + b)`` as a whole, as the
            reference code does, instead of the ``nn.Linear`` inside it.
        exclude: names of modules (``model.named_modules()``) that take the fallback step.
        strict: raise instead of warning when any parameter would take the fallback step, whatever
            the reason (modules listed in ``exclude`` are the accepted exceptions).
        process_group: ``torch.distributed`` group for unwrapped models (default: the world group
            when torch.distributed is initialised). Every rank applies the update a single process
            would compute on the union of the ranks' batches: the optimizer averages the gradients
            weighted by the ranks' batch sizes (under DDP, which averages uniformly, unequal sizes
            raise); ranks that ran different modules raise the same ``RuntimeError`` on every rank.
        grad_scaler: the GradScaler in use, when something other than ``scaler.step(opt)`` calls
            ``step()`` (default None: the scaler is found from ``scaler.step``; its loss scale is
            removed from the captured costates).
        shard_solves: with several ranks (default True), each module's solve runs on one owner rank,
            chosen by a deterministic greedy balance of the solves' estimated costs, and the owners'
            updates and state records are broadcast to every rank: the same weights bit for bit on
            every rank, the same update as solving everywhere, solve time per rank ≈ 1/world
            (:mod:`pmptrain.optim.solve_shard`). False: every rank solves every module (one
            ``all_gather_object`` and a few broadcasts per step fewer). No effect in one process.
        shard_statistics: under FSDP2 (default True), the statistics a module unit keeps between
            steps (``C_x``, ``C_p`` and their eigenbases, with ``stat_decay``/``stat_every``) are
            stored as ``DTensor`` row shards, 1/world of them per rank, and all-gathered for each
            step (in the step's one batched all-gather of the sharded tensors); False: every rank keeps them whole
            (more memory, no all-gather). No effect without FSDP2.

    Note:
        A sample is a token (a row of a ``[..., d]`` input) for row-wise layers (Linear, Conv1D,
        Embedding, LayerNorm, RMSNorm) and an entry of the batch dimension for convolutions and
        batch/group norms, counted in a module's first call of a backward pass. ``p̂ = −B·∂J/∂y`` with
        ``B`` summed over the backward passes since ``zero_grad()``, so N micro-batches of ``loss/N``
        give the update of one step on their union, and a fixed set of tokens gives the same step
        however it is split into sequences (docs/algorithms.md, "What a sample is").
    """

    def __init__(
        self,
        model: nn.Module,
        params: Optional[Iterable] = None,
        *,
        setting: str = "auto",
        lr: Optional[float] = None,
        rho: Optional[float] = None,
        rho_scale: Optional[str] = None,
        route: str = "auto",
        costate: str = "auto",
        stat_decay: Optional[float] = None,
        grad_decay: Optional[float] = None,
        stat_every: Optional[int] = None,
        amortise: Optional[str] = None,
        stat_reduce: Optional[bool] = None,
        eig_refresh: int = 1,
        eig_floor: float = 0.0,
        eig_float64: bool = False,
        max_step: Optional[float] = 0.1,
        max_gain: Optional[float] = 0.5,
        fallback: str = "adam",
        fallback_lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        solver: str = "closed",
        inner_steps: int = 10,
        inner_lr: float = 1.0,
        inner_optimizer: str = "lbfgs",
        inner_max_eval: Optional[int] = None,
        rho_state: Optional[float] = None,
        rho_costate: Optional[float] = None,
        penalty_units: str = "mean",
        proximal: bool = True,
        l2: float = 0.0,
        perturb_init: float = 0.0,
        perturb_seed: int = 0,
        blocks: Sequence = (),
        exclude: Sequence[str] = (),
        strict: bool = False,
        process_group=None,
        grad_scaler=None,
        shard_solves: bool = True,
        shard_statistics: bool = True,
    ):
        self.solver = Choice(("closed", "iterative")).check("solver", solver)
        params, given = self._positional_lr(params, {"lr": lr})
        lr = given["lr"]
        self.setting, self.setting_reason, values = choose_setting(
            setting, model, dict(lr=lr, rho=rho, rho_scale=rho_scale, grad_decay=grad_decay, stat_decay=stat_decay,
                                 stat_every=stat_every, amortise=amortise, stat_reduce=stat_reduce,
                                 eig_refresh=eig_refresh, route=route, costate=costate, penalty_units=penalty_units),
            self.solver)
        lr, rho, rho_scale, grad_decay, stat_decay, stat_every, amortise, stat_reduce = (
            values[k] for k in SETTING_KEYS)
        if max_gain is not None and not (isinstance(max_gain, (int, float)) and 0 < float(max_gain) < float("inf")):
            raise ValueError(f"invalid max_gain={max_gain!r}: must be a finite number > 0, or None")
        self.max_gain = None if max_gain is None else float(max_gain)
        self._block_types, self._block_names = _check_blocks(blocks, model, self.solver)
        self._by_kind = {"matrix": AffineEMSARule(), "grouped": GroupedEMSARule(), "channel": ChannelEMSARule()}
        self._mha = MHAEMSARule()
        self._iterative = IterativeEMSARule()
        self._fallback = FallbackRule()
        self._additive = AdditiveEMSARule(self._fallback, strict=strict)
        defaults = dict(
            lr=lr, rho=rho, rho_scale=rho_scale, route=route, costate=costate, stat_decay=stat_decay,
            grad_decay=grad_decay, stat_every=stat_every, amortise=amortise, stat_reduce=stat_reduce,
            eig_refresh=eig_refresh,
            eig_floor=eig_floor, eig_float64=eig_float64, max_step=max_step, fallback=fallback, fallback_lr=fallback_lr,
            betas=betas, eps=eps, momentum=momentum, weight_decay=weight_decay, inner_steps=inner_steps,
            inner_lr=inner_lr, inner_optimizer=inner_optimizer, inner_max_eval=inner_max_eval,
            rho_state=rho_state, rho_costate=rho_costate,
            penalty_units=penalty_units, proximal=proximal, l2=l2, perturb_init=perturb_init,
            perturb_seed=perturb_seed,
        )
        super().__init__(model, params, defaults,
                         [*self._by_kind.values(), self._mha, self._iterative, self._fallback, self._additive],
                         strict=strict, exclude=exclude, process_group=process_group, grad_scaler=grad_scaler,
                         shard_solves=shard_solves, shard_statistics=shard_statistics)

    #: What the bench's schema types ``stat_every``, ``amortise`` and ``stat_reduce`` by (their
    #: values in the classic setting): the setting fills them when left at None.
    OPTION_DEFAULTS = {k: SETTINGS["classic"][k] for k in ("stat_every", "amortise", "stat_reduce")}

    def _table_note(self) -> Optional[str]:
        values = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in SETTINGS[self.setting].items())
        return f"setting: {self.setting} ({self.setting_reason}; its defaults: {values})"

    @classmethod
    def paper(cls, model: nn.Module, params: Optional[Iterable] = None, **overrides) -> "EMSA":
        r"""The E-MSA of the reference code of Li, Chen, Tai & E (``LiQianxiao/MaxPrinciple-DeepLearning``,
        msalib/train.py, msalib/layers.py, config.yml): per controlled unit, L-BFGS (at most 10
        iterations, scipy's ``maxiter=10``) on

        .. math::

            H(θ) − \tfrac{ρ}{2}Σ_s‖f(x_s,θ) − x_{s+1}‖² − \tfrac{ρ}{2}Σ_s‖∇_x H_s(θ) − p_s‖²,
            \quad H(θ) = Σ_s p_s·f(x_s, θ) − λ·\tfrac12‖θ‖²,

        penalties summed over the batch (``penalty_units="sum"``), no proximal term
        (``proximal=False``), ``λ = l2 = 1e-3``, ρ = 1 (the toy's ``config.yml``; its MNIST run uses
        ``rho=0.03``), the inner start θ_k (``perturb_init=0``; the toy uses 0.005). Every keyword
        of :class:`EMSA` may be overridden; pass ``blocks=`` to make whole residual blocks the
        controlled functions, as the reference's ``ResidualDense`` layers are. The preset's values
        are :attr:`PAPER`. Report the regularised objective with :meth:`l2_penalty`.
        """
        kwargs = dict(cls.PAPER, max_gain=None)  # the reference has no predicted-gain guard
        kwargs.update(overrides)
        return cls(model, params, **kwargs)

    #: The reference configuration of :meth:`paper`.
    PAPER = dict(solver="iterative", inner_optimizer="lbfgs", inner_steps=10, inner_lr=1.0, lr=1.0, rho=1.0,
                 penalty_units="sum", proximal=False, l2=1e-3, perturb_init=0.0)

    def l2_penalty(self) -> float:
        """``Σ_groups (λ/2)‖θ‖²`` over the parameters of every group with ``l2 = λ > 0``: what the
        reference adds to the data loss when it reports the training loss."""
        total = 0.0
        for g in self.param_groups:
            lam = float(g.get("l2", 0.0))
            if lam > 0.0:
                total += 0.5 * lam * sum(float(p.detach().double().pow(2).sum()) for p in g["params"])
        return total

    def _is_block(self, name, module):
        if self.solver == "closed" and isinstance(module, nn.MultiheadAttention) and tap_available():
            return True  # one unit: its four projections (pmptrain.optim.attention)
        return (name in self._block_names or bool(getattr(module, "_pmptrain_block", False))
                or (bool(self._block_types) and isinstance(module, self._block_types))) \
            and self.solver == "iterative"

    def _warn_implausible_lr(self, group):
        """Warn once if a closed-form group's ``lr`` is below :data:`LR_IMPLAUSIBLE` with ρ > 0."""
        try:
            lr, rho = float(group.get("lr", 1.0)), float(group.get("rho", 0.0))
        except (TypeError, ValueError):
            return  # the group's checks name the bad value
        if self.solver != "closed" or rho == 0.0 or not 0.0 < lr < LR_IMPLAUSIBLE or \
                self.__dict__.get("_lr_warned", False):
            return
        self._lr_warned = True
        warnings.warn(
            f"EMSA(lr={lr:g}): lr is E-MSA's proximal step size, δ = 1/lr = {1.0 / lr:g}, not an Adam learning "
            f"rate; at this lr each closed-form step is at most an SGD step of size {lr:g}, so the model barely "
            "moves. E-MSA's lr is of order 1 (the default, 1.0) or larger (docs/algorithms.md, \"The units of ρ, "
            "and schedules\").", UserWarning, stacklevel=_outside_stacklevel())

    def _validate_group(self, group):
        self._warn_implausible_lr(group)
        if self.solver == "iterative" and group.get("rho_scale", "none") != "none":
            raise ValueError(
                f"invalid rho_scale={group['rho_scale']!r} with solver='iterative': the costate scale "
                "is a closed-form option (use rho_scale='none')"
            )
        if self.solver == "closed":
            for key, off, why in (("proximal", True, "without a proximal term"),
                                  ("l2", 0.0, "with an L2 term inside H"),
                                  ("perturb_init", 0.0, "with a perturbed inner start")):
                if key in group and group[key] != off:
                    raise ValueError(
                        f"invalid {key}={group[key]!r} with solver='closed': maximising {why} is an option "
                        "of the iterative solver (solver='iterative'); for the closed form add an L2 term "
                        "to the loss instead")
            rho = float(group.get("rho", 0.0))
            rx = group.get("rho_state")
            rp = group.get("rho_costate")
            rx = rho if rx is None else float(rx)
            rp = rho if rp is None else float(rp)
            if rx == 0.0 and rp > 0.0:
                raise ValueError(
                    f"invalid rho_state=0 with a costate weight {rp!r} > 0: the closed form needs a state "
                    "penalty whenever it has a costate penalty (use solver='iterative')")
        elif not group.get("proximal", True) and group.get("inner_optimizer") != "lbfgs":
            raise ValueError(
                f"invalid proximal=False with inner_optimizer={group.get('inner_optimizer')!r}: without a "
                "proximal term only L-BFGS's line search keeps the inner steps bounded (use 'lbfgs')")
        if group.get("penalty_units") == "sum":
            for key, off in (("stat_decay", 0.0), ("stat_every", 1)):
                if float(group.get(key, off)) != off:
                    raise ValueError(
                        f"invalid {key}={group[key]!r} with penalty_units='sum': sums over the batch need "
                        "the statistics of the step itself (stat_decay=0, stat_every=1)")
        if group.get("amortise") == "rescaled" and group.get("stat_reduce"):
            raise ValueError(
                "invalid amortise='rescaled' with stat_reduce=True: the steps between refreshes compare "
                "this step's row traces with the kept statistics', which are of reduced rows "
                "(use amortise='bounded')")
        for key, off, what in (("stat_decay", 0.0, "running averages"), ("stat_every", 1, "amortised statistics")):
            if group.get("costate") == "isotropic" and float(group.get(key, off)) > off:
                raise ValueError(
                    f"invalid {key} with costate='isotropic': {what} apply to the exact "
                    "primal solve (use costate='exact' or 'auto')"
                )

    def _module_rule(self, name, module):
        if self.solver == "iterative":
            return self._iterative
        if isinstance(module, nn.MultiheadAttention) and self._is_block(name, module):
            return self._mha
        adapter = adapter_for(module)
        if adapter is not None:
            return self._by_kind[adapter.kind]
        if _additive_candidate(module):
            return self._additive  # its direct parameters: additive ones are recognised at the first forward
        return Unsupported(unsupported_reason(module) or (
            f"pmptrain has no closed form for {type(module).__name__} modules and did not recognise what it "
            "computes (if it is affine in its parameters, give it one with pmptrain.register_module_type)"),
            hint=registration_hint(module))

    def _param_rule(self, name, param):
        return self._fallback, {}


def _additive_candidate(module: nn.Module) -> bool:
    """A module without an adapter whose own parameters :class:`AdditiveEMSARule` examines at the
    first forward: one with child modules and floating-point parameters of its own (ViT's
    embeddings, CLIP's vision embeddings, ConvNeXt's layers with their layer-scale), a module that
    reads its parameters by an integer index buffer (Swin's relative-position bias), or an
    ``nn.Embedding`` subclass with its own forward (learned position tables: Whisper's, BART's).
    Other leaf modules without a rule fall back at construction."""
    if isinstance(module, nn.MultiheadAttention):
        return False  # its matrices enter through products (its own rule, or the fallback without the tap)
    held = {id(p) for c in module.children() for p in c.parameters()}
    # a parameter the module holds only as an alias of a descendant's (HF BERT's cls.predictions.bias is
    # decoder.bias) is the descendant's: not the module's own use
    own = [p for p in module.parameters(recurse=False) if id(p) not in held]
    if not own or not all(p.is_floating_point() for p in own):
        return False
    if isinstance(module, nn.Embedding):
        return not module.sparse and module.max_norm is None
    if unsupported_reason(module) is not None or isinstance(module, parametrize.ParametrizationList):
        return False  # a parametrization's parameters enter through its own (nonlinear) map
    indexed = any(not b.is_floating_point() and not b.is_complex() for b in module.buffers(recurse=False))
    return indexed or next(module.children(), None) is not None


class MSA(EMSA):
    r"""Basic method of successive approximations: :class:`EMSA` with ``ρ = 0``.

    The maximiser of ``⟨−∇J, θ − θ_k⟩ − (δ/2)‖θ − θ_k‖²`` is ``θ_k − lr·∇J``: an SGD step of size
    ``lr`` (no states are captured). Kept to show why E-MSA exists: without the feasibility penalties
    the layer-wise maximisation ignores how a new θ moves later states, and it diverges for large
    steps (``δ ≤ 1``).
    """

    def __init__(self, model: nn.Module, params: Optional[Iterable] = None, *, lr: float = 0.1, **kwargs):
        if "rho" in kwargs:
            raise TypeError("MSA has no rho (it is EMSA with rho=0); use EMSA")
        kwargs.setdefault("max_step", None)  # MSA shows the unguarded step (see the class docstring)
        kwargs.setdefault("max_gain", None)
        super().__init__(model, params, lr=lr, rho=0.0, **kwargs)

    def _validate_group(self, group):
        super()._validate_group(group)
        if float(group.get("rho", 0.0)) != 0.0:
            raise ValueError(f"invalid rho={group['rho']!r}: MSA requires rho=0 (use EMSA)")
