"""Hyper-parameter specifications: one validator per kind of value, errors that name the argument.

A rule declares the param-group keys it reads as ``{name: Spec}``; the optimizer shell validates
every group (at construction, in ``add_param_group`` and before every step, so a value a scheduler or
a user wrote into ``param_groups`` is checked too). Wrong types raise ``TypeError``, values out of
range ``ValueError``; both messages start with ``invalid <key>=<value>``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

__all__ = ["Spec", "Real", "Int", "Choice", "Pair", "Flag", "StepSize", "Maybe", "is_number", "PENALTY_MAX", "RHO_WHY"]

#: The largest penalty weight (ρ, δ = 1/lr, an eigenvalue floor) and step size the solvers accept:
#: ``2**64 ≈ 1.8e19 = √(float32 max)``. The closed forms compute in float32 (for float32, float16
#: and bfloat16 parameters) and form ``ρ·C``, ``ρ²`` (the two-sided Gram route), ``lr·g``: with both
#: factors at most ``2**64`` every such product stays finite in float32 (beyond it ρ = 3.5e38 is
#: not even a float32, and ρ = 1e300 made every step non-finite, i.e. skipped).
PENALTY_MAX = 2.0 ** 64
#: why ρ is bounded (the message of its spec)
RHO_WHY = "rho*statistics and rho**2 must stay finite in the float32 solves"


def is_number(v: Any, tensor_ok: bool = False) -> bool:
    """A real Python number (not a bool), or a 0-dim real tensor when ``tensor_ok``."""
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return True
    return tensor_ok and isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_complex()


class Spec:
    """Validates one value; :meth:`check` raises or returns the value to store."""

    what = "a value"

    def check(self, key: str, value: Any) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def _type_error(self, key, value):
        return TypeError(f"invalid {key}={value!r}: must be {self.what}")

    def _value_error(self, key, value):
        return ValueError(f"invalid {key}={value!r}: must be {self.what}")


class Real(Spec):
    """A finite real number in an interval (``lo``/``hi`` None for unbounded, ``*_open`` for strict
    bounds); ``tensor_ok`` also accepts a 0-dim tensor (``lr`` may be a tensor, as in torch)."""

    def __init__(self, lo=None, hi=None, lo_open=False, hi_open=False, tensor_ok=False, why: str = ""):
        self.lo, self.hi, self.lo_open, self.hi_open, self.tensor_ok = lo, hi, lo_open, hi_open, tensor_ok
        parts = []
        if lo is not None:
            parts.append(f"{'>' if lo_open else '>='} {lo}")
        if hi is not None:
            parts.append(f"{'<' if hi_open else '<='} {_fmt_bound(hi)}")
        self.what = "a finite number" + (" " + " and ".join(parts) if parts else "") + (f": {why}" if why else "")

    def check(self, key, value):
        if not is_number(value, self.tensor_ok):
            raise self._type_error(key, value)
        v = float(value)
        ok = math.isfinite(v)
        if ok and self.lo is not None:
            ok = v > self.lo if self.lo_open else v >= self.lo
        if ok and self.hi is not None:
            ok = v < self.hi if self.hi_open else v <= self.hi
        if not ok:
            raise self._value_error(key, value)
        return value


def _fmt_bound(v) -> str:
    return "2**64 (about 1.8e19)" if v == PENALTY_MAX else str(v)


class StepSize(Spec):
    """The ``lr`` of a proximal (E-MSA) rule: 0 (frozen) or ``2**-64 <= lr <= 2**64``, so that the
    proximal weight ``δ = 1/lr`` is within :data:`PENALTY_MAX` too (below ``2**-64`` δ overflows
    the float32 solves); a 0-dim tensor is accepted, as in torch."""

    what = ("0 or a finite number >= 2**-64 (about 5.4e-20) and <= 2**64 (about 1.8e19): the proximal "
            "weight 1/lr and lr itself must stay within 2**64 for the float32 solves")

    def check(self, key, value):
        if not is_number(value, True):
            raise self._type_error(key, value)
        v = float(value)
        if not (v == 0.0 or (math.isfinite(v) and 1.0 / PENALTY_MAX <= v <= PENALTY_MAX)):
            raise self._value_error(key, value)
        return value


class Int(Spec):
    """An integer ``>= lo``."""

    def __init__(self, lo: int = 0):
        self.lo = lo
        self.what = f"an integer >= {lo}"

    def check(self, key, value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._type_error(key, value)
        if value < self.lo:
            raise self._value_error(key, value)
        return value


class Choice(Spec):
    """One of a fixed set of strings."""

    def __init__(self, options: Sequence[str]):
        self.options = tuple(options)
        self.what = "one of " + ", ".join(repr(o) for o in self.options)

    def check(self, key, value):
        if not isinstance(value, str):
            raise self._type_error(key, value)
        if value not in self.options:
            raise self._value_error(key, value)
        return value


class Flag(Spec):
    """A bool."""

    what = "True or False"

    def check(self, key, value):
        if not isinstance(value, bool):
            raise self._type_error(key, value)
        return value


class Pair(Spec):
    """Two values, each checked by ``elem`` (e.g. Adam's ``betas``); stored as a tuple."""

    def __init__(self, elem: Spec):
        self.elem = elem
        self.what = f"a pair of {elem.what.replace('a finite number', 'finite numbers')}"

    def check(self, key, value):
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
            raise self._type_error(key, value)
        for i, v in enumerate(value):
            self.elem.check(f"{key}[{i}]", v)
        return tuple(value)


class Maybe(Spec):
    """None (the option is off / takes its default) or a value checked by ``elem``."""

    def __init__(self, elem: Spec):
        self.elem = elem
        self.what = f"None or {elem.what}"

    def check(self, key, value):
        if value is None:
            return None
        try:
            return self.elem.check(key, value)
        except TypeError:
            raise self._type_error(key, value) from None
        except ValueError:
            raise self._value_error(key, value) from None
