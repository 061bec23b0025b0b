"""What the discrete-weight configurations share: the model check and lazy per-layer diagnostics.

:class:`DiscreteConfig` is the base of :class:`~pmptrain.DiscreteMSA`, :class:`~pmptrain.BinaryConnect`,
:class:`~pmptrain.TWN` and :class:`~pmptrain.Bop`: it finds the model's discrete tensors (from
:func:`pmptrain.discretize_`), sends each to the configuration's discrete rule and everything else
to the fallback, and publishes ``opt.last_step["discrete"]`` (:class:`DiscreteDiagnostics`).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any, Dict, List, Optional

import torch

from ..quant import DiscreteTensor, discrete_parameters
from .shell import PMPOptimizer, StepInfo, unwrap_model

__all__ = ["DiscreteConfig", "DiscreteDiagnostics"]


class DiscreteDiagnostics(Mapping):
    """Diagnostics of the discrete tensors in one step, computed lazily.

    The step stores 0-dim tensors and references to the step's ``W_new − W`` and new accumulator
    (the optimizer reuses the accumulator's buffer two steps later, and converts diagnostics still
    held before that); flips and ``|M|`` mean are counted, and everything converted
    with one ``torch.stack(...).tolist()``, only on first access — a loop that does not read the
    diagnostics pays nothing for them. Keys:

    * ``"layers"``: ``{module name: {"flips", "numel", "flip_ratio", "density", "rho_k",
      "acc_abs_mean", "acc_abs_max"}}`` — flips: entries that changed; density: fraction of non-zero
      codes after the step (1.0 on grids without 0); ``rho_k``: the absolute penalty ``ρ·max_wrong|M|``
      used by discrete MSA (0 for the baselines); ``acc_abs_*``: statistics of the updated
      accumulator, latent or gradient average ``|M|``.
    * ``"total"``: ``{"flips", "numel", "flip_ratio", "density"}`` over all discrete tensors updated.

    Empty (``layers == {}``) when the step was skipped.
    """

    _KEYS = ("flips", "density_nnz", "rho_k", "acc_abs_sum", "acc_abs_max")

    def __init__(self, raw: Optional[Dict[str, Dict[str, Any]]] = None):
        self._raw = raw or {}
        self._data: Optional[Dict[str, Any]] = None

    def _materialise(self) -> Dict[str, Any]:
        if self._data is not None:
            return self._data
        names = list(self._raw)
        vals: List[List[float]] = []
        if names:
            flat = []
            for n in names:
                r = self._raw[n]
                r.setdefault("flips", torch.count_nonzero(r.pop("delta")))
                r.setdefault("acc_abs_sum", r.pop("acc").abs().sum(dtype=torch.float64))
                flat += [torch.as_tensor(r[k]).detach().to("cpu", torch.float64).reshape(()) for k in self._KEYS]
            allv = torch.stack(flat).tolist()
            vals = [allv[i * len(self._KEYS):(i + 1) * len(self._KEYS)] for i in range(len(names))]
        layers, flips_t, numel_t, nnz_t = {}, 0, 0, 0.0
        for n, v in zip(names, vals):
            numel = int(self._raw[n]["numel"])
            flips, nnz, rho_k, acc_sum, acc_max = v
            layers[n] = {
                "flips": int(flips), "numel": numel, "flip_ratio": flips / numel if numel else 0.0,
                "density": nnz / numel if numel else 0.0, "rho_k": rho_k,
                "acc_abs_mean": acc_sum / numel if numel else 0.0, "acc_abs_max": acc_max,
            }
            flips_t, numel_t, nnz_t = flips_t + int(flips), numel_t + numel, nnz_t + nnz
        total = {"flips": flips_t, "numel": numel_t, "flip_ratio": flips_t / numel_t if numel_t else 0.0,
                 "density": nnz_t / numel_t if numel_t else 0.0}
        self._data = {"layers": layers, "total": total}
        return self._data

    def __getitem__(self, key):
        return self._materialise()[key]

    def __iter__(self):
        return iter(("layers", "total"))

    def __len__(self) -> int:
        return 2

    def __repr__(self) -> str:
        return f"DiscreteDiagnostics({self._materialise()!r})"


class DiscreteConfig(PMPOptimizer):
    """Base of the discrete-weight configurations (see the module docstring). Subclasses set
    ``self._discrete_rule`` and ``self._fallback`` before calling ``__init__`` and may restrict
    the grids (:meth:`_check_grid`)."""

    def _find_discrete(self, model) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module, got {type(model).__name__}: pass the model itself "
                f"(after pmptrain.discretize_), not its parameters; {type(self).__name__} needs the modules "
                "to tell discrete weights from the rest"
            )
        root = unwrap_model(model)[0]
        dts = discrete_parameters(root)
        if not dts:
            raise ValueError(
                f"model: it has no discrete weights; call pmptrain.discretize_(model, ...) before "
                f"building {type(self).__name__}"
            )
        for d in dts:
            self._check_grid(d)
        self._discrete: Dict[int, DiscreteTensor] = {id(d.param): d for d in dts}
        self._discrete_modules = {d.name for d in dts}

    def _check_grid(self, d: DiscreteTensor) -> None:
        """Raise if the configuration's rule does not support ``d``'s grid."""

    def _check_exclude(self, exclude) -> None:
        bad = sorted(set(exclude) & self._discrete_modules)
        if bad:
            raise ValueError(
                f"invalid exclude: {bad} are discrete modules; the fallback step would move their codes "
                "off the grid"
            )

    def _param_rule(self, name, param):
        d = self._discrete.get(id(param))
        if d is not None:
            return self._discrete_rule, {"discrete": d}
        return self._fallback, {}

    _TRANSIENT = PMPOptimizer._TRANSIENT + ("_last_diagnostics", "_older_diagnostics")

    def _step(self, loss) -> None:
        # The rules reuse the buffers of the step before last (the accumulator's second buffer):
        # diagnostics of that step still held by the caller are converted before they are.
        older = getattr(self, "_older_diagnostics", None)
        diag = older() if older is not None else None
        if diag is not None:
            diag._materialise()
        super()._step(loss)

    def _step_info(self, info: StepInfo, proposals) -> StepInfo:
        raw = {}
        for unit, prop in proposals:
            if prop.info is not None and "discrete" in unit.meta:
                raw[unit.meta["discrete"].name] = prop.info
        diag = DiscreteDiagnostics(raw)
        self._older_diagnostics = getattr(self, "_last_diagnostics", None)
        self._last_diagnostics = weakref.ref(diag)
        info["discrete"] = diag
        return info
