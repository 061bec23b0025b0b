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

__all__ = ["Spec", "Real", "Int", "Choice", "Pair", "Flag", "is_number"]


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

    def __init__(self, lo=None, hi=None, lo_open=False, hi_open=False, tensor_ok=False):
        self.lo, self.hi, self.lo_open, self.hi_open, self.tensor_ok = lo, hi, lo_open, hi_open, tensor_ok
        parts = []
        if lo is not None:
            parts.append(f"{'>' if lo_open else '>='} {lo}")
        if hi is not None:
            parts.append(f"{'<' if hi_open else '<='} {hi}")
        self.what = "a finite number" + (" " + " and ".join(parts) if parts else "")

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
