r"""Baselines for discrete-weight networks as configurations of the shell: BinaryConnect, TWN, Bop.

They exist for fair comparison with :class:`~pmptrain.DiscreteMSA` (same models, same data, same
budget; docs/discrete.md) and share its contract: they take the *model* (after
:func:`pmptrain.discretize_`); its discrete weights get the baseline's rule
(:mod:`pmptrain.optim.elementwise`), every other trainable parameter — biases, norm affines, kept
full-precision layers, trainable scales — the Adam/SGD fallback (``fallback_lr``, default 1e-3,
scaled by ``lr/base_lr``). Param groups, ``add_param_group``, every LR scheduler, GradScaler
(unscaled gradients for every rule), non-finite skips, bit-exact ``state_dict`` resume and
``opt.last_step["discrete"]`` diagnostics work as for every pmptrain optimizer.

References:
    M. Courbariaux, Y. Bengio, J.-P. David, "BinaryConnect: Training Deep Neural Networks with
    binary weights during propagations", NeurIPS 2015.
    F. Li, B. Zhang, B. Liu, "Ternary Weight Networks", arXiv:1605.04711, 2016.
    K. Helwegen, J. Widdicombe, L. Geiger, Z. Liu, K.-T. Cheng, R. Nusselder, "Latent Weights Do Not
    Exist: Rethinking Binarized Neural Network Optimization", NeurIPS 2019 (arXiv:1906.02107).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

from torch import nn

from .discrete_config import DiscreteConfig
from .elementwise import BopRule, FallbackRule, LatentSignRule, TWNRule
from .hyper import Real

__all__ = ["BinaryConnect", "TWN", "Bop"]


def _fallback_defaults(fallback, fallback_lr, momentum, weight_decay):
    return dict(fallback=fallback, fallback_lr=fallback_lr, momentum=momentum, weight_decay=weight_decay)


class _Baseline(DiscreteConfig):
    _binary_only = False

    def _check_grid(self, d):
        if self._binary_only and d.grid.values != (-1.0, 1.0):
            raise ValueError(f"model: {type(self).__name__} needs binary weights, {d.name!r} has grid {d.grid.name}")

    def _module_rule(self, name, module):
        return None  # everything is per parameter: the discrete rule or the fallback


class BinaryConnect(_Baseline):
    r"""BinaryConnect / straight-through estimator with Adam on latent real weights.

    For each binary weight tensor ``W`` a latent ``w̃`` (optimizer state) starts at
    ``clip(latent_scale·W, −clip, clip)`` and ``W`` is rewritten to ``sign(w̃)`` when the optimizer is
    built. Each step, with ``g = ∂J/∂W`` used straight through as the latent's gradient::

        w̃ ← AdamW(w̃, g; lr, betas, eps, weight_decay)      (bias-corrected Adam, decoupled decay)
        w̃ ← clip(w̃, −clip, clip)
        W ← sign(w̃)                                          (sign(0) = +1)

    Args:
        model: the model after ``discretize_(model, "binary", ...)``.
        params: optional parameters / param groups (default: all trainable parameters).
        lr: Adam step on the latents (default 1e-3); also the schedule reference of the fallback.
        betas, eps: Adam coefficients of the latents and of the Adam fallback (defaults (0.9, 0.999),
            1e-8).
        clip: latent clipping bound (default 1.0, as Courbariaux et al.; None disables).
        latent_scale: multiplies the current weights to initialise the latents (default 0.05: the
            codes ±1 of :func:`~pmptrain.discretize_` start at ±0.05, where a few dozen Adam steps of
            1e-3 flip a weight, as from a fresh initialisation; with 1.0 they start at the clipping
            bound and need ~1000 steps, so nothing flips in a short run — 1.0 is Courbariaux et
            al.'s setting for latents initialised from real weights, pass it for that).
        fallback, fallback_lr, momentum, weight_decay: the fallback of all other parameters
            (defaults ``"adam"``, 1e-3, 0.9, 0).
        exclude, strict, process_group, grad_scaler: as in :class:`~pmptrain.EMSA`.

    Note: the paper also scales learning rates per layer by the Glorot factor; here it is plain Adam.
    """

    _binary_only = True

    def __init__(self, model: nn.Module, params: Optional[Iterable] = None, *, lr: float = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, clip: Optional[float] = 1.0,
                 latent_scale: float = 0.05, fallback: str = "adam", fallback_lr: float = 1e-3,
                 momentum: float = 0.9, weight_decay: float = 0.0, exclude: Sequence[str] = (),
                 strict: bool = False, process_group=None, grad_scaler=None):
        if clip is not None:
            clip = float(Real(0.0, lo_open=True).check("clip", clip))
        latent_scale = float(Real(0.0, lo_open=True).check("latent_scale", latent_scale))
        self._find_discrete(model)
        self._check_exclude(exclude)
        self._discrete_rule = LatentSignRule(clip, latent_scale)
        self._fallback = FallbackRule()
        defaults = dict(lr=lr, betas=betas, eps=eps, **_fallback_defaults(fallback, fallback_lr, momentum, weight_decay))
        super().__init__(model, params, defaults, [self._discrete_rule, self._fallback], strict=strict,
                         exclude=exclude, process_group=process_group, grad_scaler=grad_scaler)


class TWN(_Baseline):
    r"""Ternary Weight Networks (Li, Zhang & Liu 2016) with Adam on latent real weights and STE.

    Latent ``w̃`` (optimizer state, initialised as ``latent_scale·W``). Each step, with ``g`` the
    gradient w.r.t. the effective ternary weight (straight through)::

        w̃ ← AdamW(w̃, g; lr, betas, eps, weight_decay)
        Δ  = delta_factor · mean|w̃|,  I = {i : |w̃_i| > Δ},  α = mean_{i∈I}|w̃_i|   (α = 0 if I = ∅)
        W_eff ← α·t,   t_i = sign(w̃_i)·1{i ∈ I}

    Where ``W_eff`` is stored: with a fixed per-tensor scale buffer (``discretize_(...,
    scale="tensor")``) the parameter receives the codes ``t`` (it stays on the grid and
    ``export_packed`` works) and ``α`` goes into the buffer, and the codes' gradient is divided by
    the current ``α``; otherwise the parameter receives ``α·t``. The same is written once when the
    optimizer is built.

    Args:
        model: the model after ``discretize_(model, "ternary", ...)``.
        params, lr, betas, eps: as :class:`BinaryConnect`.
        delta_factor: threshold factor (default 0.7, the paper's approximation).
        latent_scale: latent init multiplier (default 0.05, as :class:`BinaryConnect`: codes ±1
            start as latents ±0.05, which Adam moves across the threshold within a short run).
        fallback, fallback_lr, momentum, weight_decay, exclude, strict, process_group, grad_scaler:
            as :class:`BinaryConnect`.
    """

    def __init__(self, model: nn.Module, params: Optional[Iterable] = None, *, lr: float = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, delta_factor: float = 0.7,
                 latent_scale: float = 0.05, fallback: str = "adam", fallback_lr: float = 1e-3,
                 momentum: float = 0.9, weight_decay: float = 0.0, exclude: Sequence[str] = (),
                 strict: bool = False, process_group=None, grad_scaler=None):
        latent_scale = float(Real(0.0, lo_open=True).check("latent_scale", latent_scale))
        self._find_discrete(model)
        self._check_exclude(exclude)
        self._discrete_rule = TWNRule(latent_scale)
        self._fallback = FallbackRule()
        defaults = dict(lr=lr, betas=betas, eps=eps, delta_factor=delta_factor,
                        **_fallback_defaults(fallback, fallback_lr, momentum, weight_decay))
        super().__init__(model, params, defaults, [self._discrete_rule, self._fallback], strict=strict,
                         exclude=exclude, process_group=process_group, grad_scaler=grad_scaler)


class Bop(_Baseline):
    r"""Bop, the latent-free binary optimizer of Helwegen et al. (NeurIPS 2019).

    Per binary weight tensor ``W`` an exponential moving average ``m`` of the gradient ``g = ∂J/∂W``
    (state ``exp_avg``, initialised to 0)::

        m ← (1 − γ)·m + γ·g,    γ = lr
        W_i ← −W_i   if m_i·W_i > τ,   else W_i

    ``lr`` is the adaptivity rate γ (the paper: γ plays the role of a learning rate; it decays γ
    during training — schedule ``lr`` with any torch scheduler). The defaults ``lr = 1e-4``,
    ``threshold = 1e-8`` are those of the paper's CIFAR-10 experiments and of larq's ``Bop``.

    Args:
        model: the model after ``discretize_(model, "binary", ...)``.
        params: optional parameters / param groups.
        lr: γ ∈ [0, 1] (default 1e-4). threshold: τ ≥ 0 (default 1e-8).
        betas, eps, fallback, fallback_lr, momentum, weight_decay: the fallback of all other
            parameters (defaults (0.9, 0.999), 1e-8, ``"adam"``, 1e-3, 0.9, 0), its step scaled by
            ``lr/base_lr``.
        exclude, strict, process_group, grad_scaler: as in :class:`~pmptrain.EMSA`.
    """

    _binary_only = True

    def __init__(self, model: nn.Module, params: Optional[Iterable] = None, *, lr: float = 1e-4,
                 threshold: float = 1e-8, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 fallback: str = "adam", fallback_lr: float = 1e-3, momentum: float = 0.9,
                 weight_decay: float = 0.0, exclude: Sequence[str] = (), strict: bool = False,
                 process_group=None, grad_scaler=None):
        self._find_discrete(model)
        self._check_exclude(exclude)
        self._discrete_rule = BopRule()
        self._fallback = FallbackRule()
        defaults = dict(lr=lr, threshold=threshold, betas=betas, eps=eps,
                        **_fallback_defaults(fallback, fallback_lr, momentum, weight_decay))
        super().__init__(model, params, defaults, [self._discrete_rule, self._fallback], strict=strict,
                         exclude=exclude, process_group=process_group, grad_scaler=grad_scaler)
