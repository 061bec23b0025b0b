"""Optimizers of ``pmptrain bench`` by name, with documented defaults and tuning grids.

Every entry is an :class:`OptimizerSpec`: a builder ``build(model, **overrides) -> optimizer``,
whether (and onto which grid) the model must be discretised first, the name and default value of
its *step-size hyper-parameter* (what ``--lr`` sets and ``--tune lr`` sweeps — the learning rate
for gradient methods, ``ρ`` for discrete MSA, ``γ`` for Bop), and a small tuning grid.

=================  ==============  ===========================  =========  ====================
name               weights         optimizer (defaults)         ``--lr``   ``--tune lr`` grid
=================  ==============  ===========================  =========  ====================
sgd                float           SGD, momentum 0.9            lr 0.05    0.01, 0.03, 0.1
adam               float           Adam                         lr 1e-3    3e-4, 1e-3, 3e-3
adamw              float           AdamW, betas (0.9, 0.95),    lr 1e-3    3e-4, 1e-3, 3e-3
                                   decay 0.1 on ≥2-D parameters
adagrad            float           Adagrad (torch's defaults:   lr 0.01    3e-3, 0.01, 0.03
                                   accumulator 0, eps 1e-10)
muon               float           Muon (hidden matrices) +     lr 0.02    0.005, 0.02, 0.05
                                   AdamW 1e-3 (the rest);
                                   ns_dtype=float32: Newton–
                                   Schulz in float32
soap               float           SOAP                         lr 3e-3    1e-3, 3e-3, 1e-2
msa                float           MSA (basic, ρ = 0)           lr 0.1     0.03, 0.1, 0.3
emsa               float           EMSA closed form, ρ = 1      lr 1.0     0.3, 1.0, 3.0
                                   (weight_decay: decay groups)
emsa-transformer   float           EMSA's transformer setting:  lr 1e3     1e2, 1e3, 1e4
                                   ρ = 8 × rms costate,
                                   gradient and statistics
                                   averaged (β 0.95)
emsa-costate       float           EMSA, ρ = 5 × rms costate    lr 1e3     1e2, 1e3, 1e4
                                   (rho_scale="costate")
emsa-bounded-…     float           emsa-bounded-reduce: emsa    lr 1.0     0.3, 1.0, 3.0
                                   with stat_every=10,
                                   amortise="bounded",
                                   stat_reduce (the conv
                                   setting; issue 17)
emsa-iterative     float           EMSA solver="iterative"      lr 1.0     0.3, 1.0, 3.0
                                   (10 L-BFGS inner iterations)
emsa-paper         float           EMSA.paper: the reference    ρ 1.0      0.3, 1.0, 3.0
                                   code's E-MSA (whole residual
                                   blocks, sums, δ = 0, L2 1e-3)
binary-msa         {−1, +1}        DiscreteMSA's defaults:      ρ 0.95     0.5, 0.8, 0.95
                                   decay 0.999, γ 0.95/epoch
binary-msa-paper   {−1, +1}        DiscreteMSA, ρ 0.5, constant ρ 0.5      0.2, 0.35, 0.5
                                   decay 0.999 (before 0.2)
ternary-msa        {−1, 0, +1}     DiscreteMSA, decay 0.999,    ρ 0.95     0.5, 0.8, 0.95
                                   relative λ 0.2
ternary-msa-paper  {−1, 0, +1}     DiscreteMSA, Li & Hao, λ 1e-7 ρ 0.5     0.2, 0.35, 0.5
kbit-msa           2-bit uniform   DiscreteMSA, decay 0.999     ρ 0.5      0.2, 0.35, 0.5
binaryconnect      {−1, +1}        BinaryConnect (Adam on       lr 1e-3    1e-3, 3e-3, 1e-2
                                   latents 0.05·W: its defaults)
twn                {−1, 0, +1}     TWN (its defaults)           lr 1e-3    1e-3, 3e-3, 1e-2
bop                {−1, +1}        Bop, threshold 1e-8          lr = γ 1e-3  1e-4, 1e-3, 1e-2
=================  ==============  ===========================  =========  ====================

binary-msa runs DiscreteMSA's defaults (one source of defaults), the recommended ρ = 0.95 with γ =
0.95: on the BatchNorm MLP 784-1024-1024-10 ρ = 0.95 measured 2.4 points better than Li & Hao's 0.5
(docs/performance.md); on the short default benches it measured 0.5–1.1 points lower in the median
with a smaller seed spread (docs/benchmarks.md, "Binary MSA's defaults since 0.2").
binary-msa-paper is the previous entry (ρ 0.5, constant decay), which reproduces the earlier
tables. ternary-msa uses ρ = 0.95 with the relative λ
0.2, the only setting measured to reach ≤ 10 % non-zero weights near binary accuracy.

emsa-transformer is EMSA's transformer setting (``EMSA(model, setting="transformer")``, what
``EMSA(model)`` takes on models with token embeddings or attention; docs/algorithms.md, "Settings"):
ρ measured in each layer's rms costate, a negligible proximal term, and the linear term and the
penalties averaged over the recent batches. emsa-costate is the same without the averaging (ρ 5,
the transformer setting before averaging existed). On the MLP benches the paper default ``emsa`` (the classic
setting) is better.
emsa-costate-bounded (lr 1e3, grid 1e2, 1e3, 1e4) is emsa-costate with
amortised curvature: statistics captured every 10th step (``stat_every=10``), the steps in between
solved in the kept eigenbases with each curvature raised to the bound of the step's own gradient
(``amortise="bounded"``; docs/algorithms.md, "Amortised curvature").
emsa-transformer-bounded (lr 1e2, grid 30, 1e2, 3e2) is emsa-transformer with that amortisation
(``stat_every=10, amortise="bounded"``; the first 20 steps, younger than the averages' time
constant, refresh every step) and a 10× stronger proximal term (lr 1e2): on the GPT bench with the
default clipping ahead of emsa-transformer per step on every seed (2.386, 2.384, 2.402 against
2.415, 2.427, 2.427; AdamW 2.446, 2.435, 2.450) at ≈ 0.47× its mean step time; without clipping it
spikes after step 20, so it is not the transformer setting (docs/performance.md, "Per second on the
GPT bench").

Fallback: parameters without a maximiser / rule (for the discrete optimizers: biases, BatchNorm
affine, the full-precision first and last layers of a mixed-precision model) are trained by the optimizer's own fallback (Adam with
lr 1e-3 for every PMP optimizer and discrete baseline).

BinaryConnect and TWN run with their classes' defaults (one source of defaults): latents start at
``latent_scale = 0.05`` times the codes ±1 of :func:`pmptrain.quant.discretize_` (at the clipping
bound ±1 a weight needs ~1000 Adam steps of 1e-3 to flip, so nothing would train in a short run).
note: Bop's γ (its ``lr``) = 1e-3 departs from the class default 1e-4 (the paper's and larq's, for
long CIFAR-10 schedules): with 1e-4 the gradient EMA needs ~10⁴ steps to build up.

Per-epoch shrinking of ``1 − decay`` by ``gamma`` (docs/discrete.md; the bench key of the discrete
MSA optimizers is ``gamma``) is handed to ``DiscreteMSA`` as ``decay_gamma``; the runner calls
``end_epoch()`` after every epoch, before the checkpoint.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

import torch
from torch import nn

from ..optim.emsa import EMSA
from .schema import ConfigError

__all__ = ["OptimizerSpec", "OPTIMIZERS", "get_spec", "build_optimizer", "optimizer_names",
           "UnknownOptimizerError", "decay_groups", "check_fsdp"]


class UnknownOptimizerError(ConfigError):
    """An optimizer name that is not in :data:`OPTIMIZERS` (a :class:`~pmptrain.bench.schema.ConfigError`,
    hence a ``ValueError``: the CLI exits with status 2)."""


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """One benchmark optimizer.

    Attributes:
        name: registry name.
        builder: ``builder(model, **kwargs) -> torch.optim.Optimizer``; ``kwargs`` are
            ``defaults`` updated with the user's overrides.
        defaults: documented default keyword arguments (including the step-size hyper-parameter).
        lr_key: the keyword that ``--lr`` sets and ``--tune lr`` sweeps (``"lr"``, ``"rho"``,
            ``"gamma"``).
        tune_grid: the values ``--tune lr`` tries.
        levels: ``None`` for full-precision models, else the grid passed to
            ``discretize_(model, levels=...)`` before the optimizer is built.
        takes_wrapper: hand a ``DistributedDataParallel`` wrapper to the builder (PMP optimizers,
            which unwrap it themselves) instead of the bare module.
        description: one line for ``--help`` and the results.
        forwards_to: name of the :mod:`pmptrain.optim` class a builder's ``**kwargs`` go to
            (``"EMSA"``, …), so that :meth:`options` can list them; ``""`` when the builder's own
            signature lists every keyword.
        no_fsdp: why the optimizer cannot train FSDP2's sharded (``DTensor``) parameters, which
            the benches' ``--fsdp`` refuses up front (:func:`check_fsdp`); ``""`` when it can
            (``tests/test_fsdp.py`` checks each such baseline against one process).
    """

    name: str
    builder: Callable[..., torch.optim.Optimizer]
    defaults: Dict[str, Any]
    lr_key: str
    tune_grid: Tuple[float, ...]
    levels: Union[None, str, int] = None
    takes_wrapper: bool = False
    description: str = ""
    forwards_to: str = ""
    no_fsdp: str = ""

    def _signatures(self) -> List[Callable]:
        """The callables whose keywords :meth:`build` accepts, in order: the builder and, for
        ``**kwargs`` builders, the ``__init__`` of :attr:`forwards_to` and of its bases."""
        targets = [self.builder]
        if self.forwards_to:
            from .. import optim

            cls = getattr(optim, self.forwards_to)
            targets += [c.__init__ for c in cls.__mro__ if "__init__" in vars(c) and c is not object]
        return targets

    def options(self) -> Dict[str, Any]:
        """Every keyword :meth:`build` accepts, with its default (``inspect.Parameter.empty`` when
        it has none): the builder's keywords and, for ``**kwargs`` builders, those of
        :attr:`forwards_to` and the classes it forwards to in turn. Objects that a configuration
        cannot hold (``process_group``, ``grad_scaler``) are left out."""
        out: Dict[str, Any] = {}
        for fn in self._signatures():
            params = list(inspect.signature(fn).parameters.values())
            for prm in params:
                if prm.kind in (prm.VAR_KEYWORD, prm.VAR_POSITIONAL) or prm.name in _NOT_OPTIONS:
                    continue
                out.setdefault(prm.name, prm.default)
            if not any(prm.kind is prm.VAR_KEYWORD for prm in params):
                break
        if self.forwards_to:  # keywords a setting fills (default None): their type, for the schema
            from .. import optim

            for k, v in getattr(getattr(optim, self.forwards_to), "OPTION_DEFAULTS", {}).items():
                if out.get(k) is None:
                    out[k] = v
        for k, v in self.defaults.items():
            out[k] = v
        return out

    def nullable(self) -> set:
        """The keywords of :meth:`options` whose annotation admits None (``Optional[X]``: e.g.
        ``EMSA(max_step=None)`` turns the trust region off), so a configuration may give ``null``
        for them although their default is not None."""
        import typing

        out = set()
        for fn in self._signatures():
            try:
                hints = typing.get_type_hints(fn)
            except Exception:  # an annotation that does not resolve: judged by its text
                hints = {k: str(v.annotation) for k, v in inspect.signature(fn).parameters.items()}
            for name, ann in hints.items():
                text = ann if isinstance(ann, str) else None
                if (text is not None and ("Optional[" in text or "None" in text)) or (
                        text is None and type(None) in typing.get_args(ann)):
                    out.add(name)
            if not any(prm.kind is prm.VAR_KEYWORD for prm in inspect.signature(fn).parameters.values()):
                break  # where options() stops: the keywords further on are not the entry's
        return out

    @property
    def default_lr(self) -> float:
        """Default value of the step-size hyper-parameter ``lr_key``."""
        return self.defaults[self.lr_key]

    @property
    def discrete(self) -> bool:
        """Whether the model must be discretised before the optimizer is built."""
        return self.levels is not None

    def build(self, model: nn.Module, **overrides) -> torch.optim.Optimizer:
        """Build the optimizer for ``model`` with ``defaults`` updated by ``overrides``."""
        kwargs = dict(self.defaults)
        kwargs.update(overrides)
        return self.builder(model, **kwargs)


#: Builder/constructor parameters that are not options of a configuration.
_NOT_OPTIONS = frozenset({"self", "model", "params", "process_group", "grad_scaler"})


def _params(model: nn.Module):
    return [p for p in model.parameters() if p.requires_grad]


def _sgd(model, lr, momentum=0.9, weight_decay=0.0, nesterov=False):
    return torch.optim.SGD(_params(model), lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov)


def _adam(model, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    return torch.optim.Adam(_params(model), lr=lr, betas=tuple(betas), eps=eps,
                            weight_decay=weight_decay)


def _adagrad(model, lr, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10):
    return torch.optim.Adagrad(_params(model), lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                               initial_accumulator_value=initial_accumulator_value, eps=eps)


def decay_groups(model: nn.Module, weight_decay: float):
    """nanoGPT's / Hugging Face's grouping: ``weight_decay`` on every parameter with two or more
    dimensions (weight matrices, conv kernels, embeddings), none on biases and norm parameters."""
    unwrapped = getattr(model, "module", model)
    seen, decay, no_decay = set(), [], []
    for p in unwrapped.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _adamw(model, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
    return torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps)


def _emsa(model, weight_decay=0.0, **kw):
    from ..optim import EMSA

    if "betas" in kw:
        kw["betas"] = tuple(kw["betas"])
    params = decay_groups(model, weight_decay) if weight_decay else None
    return EMSA(model, params, **kw)


#: The bench's residual blocks that ``emsa-paper`` controls as whole blocks (module class names in
#: :mod:`pmptrain.bench.models`), as the reference code's residual layers are.
PAPER_BLOCKS = ("TanhResidualBlock", "TanhResidualConv")


def _emsa_paper(model, blocks=None, weight_decay=0.0, **kw):
    """:meth:`pmptrain.EMSA.paper`; ``blocks`` (module names) default to every instance of
    :data:`PAPER_BLOCKS` in the model (none: every module with parameters is its own unit)."""
    from . import models as bench_models

    if blocks is None:
        root = getattr(model, "module", model)
        types = tuple(getattr(bench_models, n) for n in PAPER_BLOCKS if hasattr(bench_models, n))
        blocks = tuple(t for t in types if any(isinstance(m, t) for m in root.modules()))
    params = decay_groups(model, weight_decay) if weight_decay else None
    return EMSA.paper(model, params, blocks=blocks, **kw)


def _pytorch_optimizer(name: str):
    try:
        import pytorch_optimizer
    except ImportError as e:
        raise RuntimeError(
            f"the {name} baseline needs the pytorch-optimizer package: pip install 'pmptrain[baselines]'"
        ) from e
    return pytorch_optimizer


def _hidden_matrices(model: nn.Module):
    """``(hidden, other)``: the weights Muon orthogonalises (≥ 2-D, not embeddings, not the output
    layer — the last Linear/Conv module) and everything else (AdamW), as usual for Muon."""
    unwrapped = getattr(model, "module", model)
    emb = {id(m.weight) for m in unwrapped.modules() if isinstance(m, nn.Embedding)}
    layers = [m for m in unwrapped.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    out = id(layers[-1].weight) if layers else None
    hidden = [p for p in unwrapped.parameters()
              if p.requires_grad and p.dim() >= 2 and id(p) not in emb and id(p) != out]
    ids = {id(p) for p in hidden}
    other = [p for p in unwrapped.parameters() if p.requires_grad and id(p) not in ids]
    return hidden, other


def _muon(model, lr=0.02, momentum=0.95, weight_decay=0.0, adamw_lr=1e-3, adamw_wd=0.0, ns_dtype="bfloat16"):
    """pytorch-optimizer's Muon; ``ns_dtype="float32"`` runs its Newton–Schulz iteration in float32
    instead of its bfloat16 (for CPUs without fast bfloat16 products)."""
    po = _pytorch_optimizer("muon")
    if ns_dtype not in ("bfloat16", "float32"):
        raise ValueError(f"ns_dtype: expected bfloat16 or float32, got {ns_dtype!r}")
    hidden, other = _hidden_matrices(model)
    groups = [{"params": hidden, "use_muon": True}, {"params": other, "use_muon": False}]
    cls = po.Muon if ns_dtype == "bfloat16" else _float32_muon(po.Muon)
    return cls(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, adamw_lr=adamw_lr,
               adamw_wd=adamw_wd)


def _float32_muon(base):
    """``base`` (pytorch-optimizer's Muon) with each update orthogonalised by its own quintic
    Newton–Schulz function in float32 (one matrix at a time) instead of bfloat16."""
    from pytorch_optimizer.optimizer.utils.matrix import zero_power_via_newton_schulz_5

    class Float32Muon(base):
        @staticmethod
        def _orthogonalize(group, updates):
            return [zero_power_via_newton_schulz_5(u.reshape(u.size(0), -1), num_steps=group["ns_steps"],
                                                   weights=group["ns_coeffs"], dtype=torch.float32)
                    for u in updates]

    return Float32Muon


def _soap(model, lr=3e-3, betas=(0.95, 0.95), weight_decay=0.01, precondition_frequency=10):
    po = _pytorch_optimizer("soap")
    return po.SOAP(_params(model), lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                   precondition_frequency=precondition_frequency)


def _msa(model, **kw):
    from ..optim import MSA

    return MSA(model, **kw)


def _discrete_msa(model, gamma=None, **kw):
    from ..optim import DiscreteMSA

    if gamma is not None:
        kw["decay_gamma"] = gamma  # the optimizer shrinks 1 - decay in end_epoch()
    return DiscreteMSA(model, **kw)


def _binaryconnect(model, **kw):
    from ..optim import BinaryConnect

    return BinaryConnect(model, **kw)


def _twn(model, **kw):
    from ..optim import TWN

    return TWN(model, **kw)


def _bop(model, **kw):
    from ..optim import Bop

    return Bop(model, **kw)


_RHO_GRID = (0.5, 0.8, 0.95)
_PAPER_RHO_GRID = (0.2, 0.35, 0.5)

#: The benchmark optimizers by name (see the module docstring for the table).
OPTIMIZERS: Dict[str, OptimizerSpec] = {
    s.name: s
    for s in (
        OptimizerSpec("sgd", _sgd, {"lr": 0.05, "momentum": 0.9}, "lr", (0.01, 0.03, 0.1),
                      description="SGD with momentum 0.9 (torch.optim.SGD)"),
        OptimizerSpec("adam", _adam, {"lr": 1e-3}, "lr", (3e-4, 1e-3, 3e-3),
                      description="Adam (torch.optim.Adam)"),
        OptimizerSpec("adamw", _adamw, {"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.1}, "lr",
                      (3e-4, 1e-3, 3e-3),
                      description="AdamW, weight decay 0.1 on >=2-D parameters only (nanoGPT's groups)"),
        OptimizerSpec("adagrad", _adagrad, {"lr": 0.01}, "lr", (3e-3, 0.01, 0.03),
                      description="Adagrad (torch.optim.Adagrad)"),
        OptimizerSpec("muon", _muon, {"lr": 0.02, "momentum": 0.95, "adamw_lr": 1e-3}, "lr", (0.005, 0.02, 0.05),
                      description="Muon on hidden matrices + AdamW on the rest (pytorch-optimizer; "
                                  "optional extra 'baselines')"),
        OptimizerSpec("soap", _soap, {"lr": 3e-3}, "lr", (1e-3, 3e-3, 1e-2),
                      description="SOAP (pytorch-optimizer; optional extra 'baselines')",
                      no_fsdp="pytorch-optimizer's SOAP keeps plain tensors beside FSDP2's DTensor gradients in "
                              "its state and its first step fails (aten.lerp_ refuses the mix)"),
        OptimizerSpec("msa", _msa, {"lr": 0.1}, "lr", (0.03, 0.1, 0.3), takes_wrapper=True,
                      forwards_to="MSA", description="basic MSA (rho = 0) with proximal step lr"),
        OptimizerSpec("emsa", _emsa, {"lr": 1.0, "rho": 1.0}, "lr", (0.3, 1.0, 3.0),
                      takes_wrapper=True, forwards_to="EMSA", description="closed-form E-MSA, rho 1, delta = 1/lr"),
        OptimizerSpec("emsa-costate", _emsa, {"lr": 1e3, "rho": 5.0, "rho_scale": "costate"}, "lr",
                      (1e2, 1e3, 1e4), takes_wrapper=True,
                      forwards_to="EMSA", description="closed-form E-MSA, rho 5 x each layer's rms costate, delta 1e-3 "
                                  "(the transformer setting)"),
        OptimizerSpec("emsa-transformer", _emsa, {"lr": 1e3, "rho": 8.0, "rho_scale": "costate", "grad_decay": 0.95,
                                                  "stat_decay": 0.95}, "lr", (1e2, 1e3, 1e4), takes_wrapper=True,
                      forwards_to="EMSA", description="closed-form E-MSA, the transformer setting: rho 8 x each layer's "
                                  "rms costate, delta 1e-3, gradient and statistics averaged (beta 0.95); what "
                                  "EMSA(model) takes on models with token embeddings or attention"),
        OptimizerSpec("emsa-costate-bounded", _emsa,
                      {"lr": 1e3, "rho": 5.0, "rho_scale": "costate", "stat_every": 10, "amortise": "bounded"},
                      "lr", (1e2, 1e3, 1e4), takes_wrapper=True, forwards_to="EMSA",
                      description="emsa-costate with the statistics captured every 10th step; the steps "
                                  "between keep the eigenbases, bounded by their own gradient"),
        OptimizerSpec("emsa-transformer-bounded", _emsa,
                      {"lr": 1e2, "rho": 8.0, "rho_scale": "costate", "grad_decay": 0.95, "stat_decay": 0.95,
                       "stat_every": 10, "amortise": "bounded"}, "lr", (30.0, 1e2, 3e2), takes_wrapper=True,
                      forwards_to="EMSA",
                      description="emsa-transformer with the statistics captured every 10th step (every step "
                                  "for the first 20), the steps between in the kept eigenbases bounded by "
                                  "their own gradient, lr 1e2 (needs gradient clipping: spikes without)"),
        OptimizerSpec("emsa-bounded-reduce", _emsa,
                      {"lr": 1.0, "rho": 1.0, "stat_every": 10, "amortise": "bounded", "stat_reduce": True},
                      "lr", (0.3, 1.0, 3.0), takes_wrapper=True, forwards_to="EMSA",
                      description="emsa (the classic setting) with the statistics captured every 10th step, "
                                  "K-FAC-reduce statistics of convolutions, the steps between bounded by their "
                                  "own gradient"),
        OptimizerSpec("emsa-iterative", _emsa,
                      {"lr": 1.0, "rho": 1.0, "solver": "iterative", "inner_steps": 10,
                       "inner_lr": 1.0, "inner_optimizer": "lbfgs"},
                      "lr", (0.3, 1.0, 3.0), takes_wrapper=True,
                      forwards_to="EMSA", description="iterative E-MSA: 10 L-BFGS iterations on the augmented Hamiltonian"),
        OptimizerSpec("emsa-paper", _emsa_paper, dict(EMSA.PAPER),
                      "rho", (0.3, 1.0, 3.0), takes_wrapper=True, forwards_to="EMSA",
                      description="the reference code's E-MSA (EMSA.paper): whole residual blocks, 10 L-BFGS "
                                  "iterations, penalties summed over the batch, no proximal term, L2 1e-3 in H"),
        OptimizerSpec("binary-msa", _discrete_msa, {"rho": 0.95}, "rho", _RHO_GRID,
                      levels="binary", takes_wrapper=True, forwards_to="DiscreteMSA",
                      description="latent-free discrete MSA on {-1, +1}, DiscreteMSA's defaults: rho 0.95, "
                                  "decay 0.999 shrunk by gamma 0.95 per epoch"),
        OptimizerSpec("binary-msa-paper", _discrete_msa, {"rho": 0.5, "decay": 0.999, "gamma": 1.0}, "rho",
                      _PAPER_RHO_GRID, levels="binary", takes_wrapper=True, forwards_to="DiscreteMSA",
                      description="discrete MSA on {-1, +1} with Li & Hao's rho 0.5 and a constant decay "
                                  "0.999 (binary-msa before 0.2)"),
        OptimizerSpec("ternary-msa", _discrete_msa,
                      {"rho": 0.95, "decay": 0.999, "lam": 0.2, "lam_mode": "relative"}, "rho",
                      _RHO_GRID, levels="ternary", takes_wrapper=True,
                      forwards_to="DiscreteMSA", description="latent-free discrete MSA on {-1, 0, +1}, rho 0.95, relative lambda 0.2"),
        OptimizerSpec("ternary-msa-paper", _discrete_msa,
                      {"rho": 0.5, "decay": 0.999, "lam": 1e-7, "lam_mode": "absolute"}, "rho",
                      _PAPER_RHO_GRID, levels="ternary", takes_wrapper=True,
                      forwards_to="DiscreteMSA", description="discrete MSA on {-1, 0, +1} with Li & Hao's rho 0.5, lambda 1e-7"),
        OptimizerSpec("kbit-msa", _discrete_msa, {"rho": 0.5, "decay": 0.999}, "rho", _PAPER_RHO_GRID,
                      levels=2, takes_wrapper=True,
                      forwards_to="DiscreteMSA", description="latent-free discrete MSA on the symmetric 2-bit grid"),
        OptimizerSpec("binaryconnect", _binaryconnect, {"lr": 1e-3}, "lr",
                      (1e-3, 3e-3, 1e-2), levels="binary",
                      forwards_to="BinaryConnect", description="BinaryConnect / STE, Adam on clipped latents"),
        OptimizerSpec("twn", _twn, {"lr": 1e-3}, "lr", (1e-3, 3e-3, 1e-2),
                      levels="ternary", forwards_to="TWN", description="Ternary Weight Networks, Adam on latents"),
        OptimizerSpec("bop", _bop, {"lr": 1e-3, "threshold": 1e-8}, "lr", (1e-4, 1e-3, 1e-2),
                      levels="binary", forwards_to="Bop", description="Bop: latent-free flips on a gradient EMA"),
    )
}


def _key(name: str) -> str:
    return str(name).strip().lower().replace("_", "-")


def optimizer_names() -> Tuple[str, ...]:
    """Registry names in table order."""
    return tuple(OPTIMIZERS)


def get_spec(name: str) -> OptimizerSpec:
    """The :class:`OptimizerSpec` of ``name`` (case and ``_``/``-`` ignored).

    Raises:
        UnknownOptimizerError: unknown name; the message lists the valid names.
    """
    key = _key(name)
    if key not in OPTIMIZERS:
        raise UnknownOptimizerError(
            f"--optimizers: unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[key]


def build_optimizer(name: str, model: nn.Module, **overrides) -> torch.optim.Optimizer:
    """``get_spec(name).build(model, **overrides)``; the model must already be discretised if
    the spec needs it (``spec.levels``)."""
    return get_spec(name).build(model, **overrides)


def check_fsdp(names: Sequence[str]) -> None:
    """Refuse (a :class:`~pmptrain.bench.schema.ConfigError` naming ``--optimizers``) the optimizers
    among ``names`` that cannot train FSDP2's sharded parameters (:attr:`OptimizerSpec.no_fsdp`):
    ``--fsdp`` checks this before anything trains."""
    bad = [(get_spec(n).name, get_spec(n).no_fsdp) for n in names if get_spec(n).no_fsdp]
    if bad:
        raise ConfigError("--optimizers: under --fsdp " + "; ".join(f"{n} cannot run: {why}" for n, why in bad)
                          + "; run it without --fsdp")
