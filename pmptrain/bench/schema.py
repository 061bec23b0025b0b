"""One schema for the bench's configurations: option kinds, optimizer keyword overrides, bounded YAML.

Every option of :class:`~pmptrain.bench.config.BenchConfig` and
:class:`~pmptrain.bench.lm.LMConfig` is declared with a *kind* (:class:`Bool`, :class:`Int`,
:class:`Number`, :class:`OneOf`, …) that checks its type and range and returns the normalised value;
:func:`check_fields` applies a table of kinds to a config. Optimizer overrides (``optimizer_args``
and ``--opt-arg``) are checked by :func:`check_optimizer_args` against each optimizer's declared
keywords (:meth:`~pmptrain.bench.registry.OptimizerSpec.options`) and the types of their defaults;
the optimizer's own validation runs on top when the bench builds it before training
(:func:`pmptrain.bench.sweep.run_bench`). YAML text is read by :func:`load_yaml`, which refuses
documents over :data:`MAX_YAML_BYTES` or whose aliases expand to more than :data:`MAX_YAML_NODES`
nodes (an "alias bomb" of a few hundred bytes otherwise expands to 10⁹ values).

Every error is a :class:`ConfigError` (a ``ValueError``; the CLI exits with status 2) whose message
starts with the option it concerns, ``--name: ...`` (``--opt-arg emsa.rho: ...`` for overrides).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Sequence

__all__ = ["ConfigError", "flag", "Kind", "Bool", "Int", "Number", "Text", "PathText", "OneOf", "Maybe",
           "NameList", "Seeds", "Mapping_", "check_unknown", "check_fields", "check_optimizer_args", "check_model_args", "refused_as", "load_yaml",
           "MAX_YAML_BYTES", "MAX_YAML_NODES"]

#: Largest YAML document :func:`load_yaml` reads (configs are a few hundred bytes).
MAX_YAML_BYTES = 1 << 20
#: Most nodes a YAML document may expand to, aliases counted as often as they are used.
MAX_YAML_NODES = 100_000


class ConfigError(ValueError):
    """A configuration value or file that the schema refuses; the message names the option."""


def flag(opt: str) -> str:
    """The command-line spelling of option ``opt``: ``batch_size`` → ``--batch-size``."""
    return "--" + opt.replace("_", "-")


def _fail(opt: str, what: str, value: Any) -> ConfigError:
    return ConfigError(f"{flag(opt) if not opt.startswith('-') else opt}: must be {what}, got {value!r}")


# --------------------------------------------------------------------------------------------
# kinds


class Kind:
    """Checks one option's value; :meth:`check` returns the value to store or raises
    :class:`ConfigError`."""

    what = "a value"

    def check(self, opt: str, value: Any) -> Any:  # pragma: no cover - interface
        raise NotImplementedError


class Bool(Kind):
    """``True`` or ``False`` (YAML ``true``/``false``); strings such as ``"no"`` are refused."""

    what = "true or false"

    def check(self, opt, value):
        if not isinstance(value, bool):
            raise _fail(opt, self.what, value)
        return value


class Int(Kind):
    """An integer in ``[lo, hi]`` (``hi`` None: unbounded); bools and floats are refused."""

    def __init__(self, lo: int = 1, hi: Optional[int] = None):
        self.lo, self.hi = lo, hi
        self.what = f"an integer >= {lo}" + ("" if hi is None else f" and <= {hi}")

    def check(self, opt, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < self.lo \
                or (self.hi is not None and value > self.hi):
            raise _fail(opt, self.what, value)
        return value


class Number(Kind):
    """A finite real number (int or float, not bool) in an interval; ``*_open`` for strict bounds."""

    def __init__(self, lo: Optional[float] = None, hi: Optional[float] = None,
                 lo_open: bool = False, hi_open: bool = False):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        if lo is not None and hi is not None:
            self.what = f"a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        elif lo is not None:
            self.what = f"a finite number {'>' if lo_open else '>='} {lo:g}"
        else:
            self.what = "a finite number"

    def check(self, opt, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _fail(opt, self.what, value)
        ok = True
        if self.lo is not None:
            ok = value > self.lo if self.lo_open else value >= self.lo
        if ok and self.hi is not None:
            ok = value < self.hi if self.hi_open else value <= self.hi
        if not ok:
            raise _fail(opt, self.what, value)
        return value


class Text(Kind):
    """A non-empty string."""

    what = "a non-empty string"

    def check(self, opt, value):
        if not isinstance(value, str) or not value.strip():
            raise _fail(opt, self.what, value)
        return value


class PathText(Kind):
    """A file-system path (a non-empty string or ``os.PathLike``), stored as a string."""

    what = "a path (a string)"

    def check(self, opt, value):
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value or "\0" in value:
            raise _fail(opt, self.what, value)
        return value


class OneOf(Kind):
    """One of fixed strings; ``normalise`` maps the given spelling first (e.g. lower-casing)."""

    def __init__(self, options: Iterable[str], normalise: Callable[[str], str] = lambda s: s):
        self.options = tuple(options)
        self.normalise = normalise
        self.what = "one of " + ", ".join(self.options)

    def check(self, opt, value):
        if not isinstance(value, str) or self.normalise(value) not in self.options:
            raise _fail(opt, self.what, value)
        return self.normalise(value)


class Maybe(Kind):
    """``None`` (YAML ``null``; with ``none_word``, also that string) or a value of ``kind``."""

    def __init__(self, kind: Kind, none_word: Optional[str] = None):
        self.kind, self.none_word = kind, none_word
        self.what = f"{kind.what} or null" + (f" ({none_word})" if none_word else "")

    def check(self, opt, value):
        if value is None or (self.none_word and isinstance(value, str) and value.strip().lower() == self.none_word):
            return None
        try:
            return self.kind.check(opt, value)
        except ConfigError:
            raise _fail(opt, self.what, value) from None


class NameList(Kind):
    """A list of strings, or one comma-separated string; ``empty`` words (``"none"``, ``""``) give
    ``[]``; ``choices`` restricts the names; ``nonempty`` refuses an empty list."""

    def __init__(self, choices: Optional[Sequence[str]] = None, nonempty: bool = True,
                 empty_words: Sequence[str] = ()):
        self.choices, self.nonempty, self.empty_words = choices, nonempty, tuple(empty_words)
        self.what = ("a non-empty " if nonempty else "a ") + "list of names (or a comma-separated string)"
        if choices is not None:
            self.what += " from " + ", ".join(choices)

    def check(self, opt, value):
        if isinstance(value, str):
            value = [] if value.strip().lower() in self.empty_words else [s.strip() for s in value.split(",") if s.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value) \
                or (self.nonempty and not value) \
                or (self.choices is not None and not set(value) <= set(self.choices)):
            raise _fail(opt, self.what, value)
        return [v.strip() for v in value]


class Seeds(Kind):
    """A count ``n >= 1`` (seeds ``0..n-1``) or a non-empty list of non-negative integers."""

    what = "a count or a non-empty list of non-negative integers"

    def check(self, opt, value):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return list(range(value))
        if not isinstance(value, (list, tuple)) or not value \
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value):
            raise _fail(opt, self.what, value)
        return list(value)


class Mapping_(Kind):
    """A mapping with string keys (``None`` gives ``{}``)."""

    what = "a mapping {key: value}"

    def check(self, opt, value):
        if value is None:
            return {}
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _fail(opt, self.what, value)
        return dict(value)


def check_fields(obj: Any, kinds: Dict[str, Kind]) -> None:
    """Replace every attribute ``obj.<opt>`` named in ``kinds`` by ``kinds[opt].check(opt, value)``."""
    for opt, kind in kinds.items():
        setattr(obj, opt, kind.check(opt, getattr(obj, opt)))


def check_unknown(d: Mapping, valid: Iterable[str], where: str, what: str = "option(s)") -> None:
    """Refuse keys of ``d`` outside ``valid`` (the message lists the valid ones)."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping of options, got {type(d).__name__}")
    bad = [k for k in d if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{where}: option names must be strings, got {bad!r}")
    valid = set(valid)
    unknown = sorted(set(d) - valid)
    if unknown:
        raise ConfigError(f"{where}: unknown {what} {unknown}; valid: {sorted(valid)}")


# --------------------------------------------------------------------------------------------
# optimizer overrides and model arguments


def _plain(value: Any) -> bool:
    """A value a configuration may hold: bool, finite number, string, None, or a list of those."""
    if value is None or isinstance(value, (bool, str)):
        return True
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_plain(v) and not isinstance(v, (list, tuple)) for v in value)
    return False


def _like_default(value: Any, default: Any) -> Optional[str]:
    """What ``value`` should be, judged by the type of the keyword's default; None if it fits."""
    if default is inspect.Parameter.empty or default is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, (int, float)):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a finite number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    if isinstance(default, (tuple, list)):
        if not isinstance(value, (list, tuple)):
            return f"a list like {list(default)!r}"
        if default and all(isinstance(d, (int, float)) and not isinstance(d, bool) for d in default):
            if len(value) != len(default) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     for v in value):
                return f"a list of {len(default)} numbers like {list(default)!r}"
    return None


def check_optimizer_args(optimizer_args: Any, opt: str = "optimizer_args") -> Dict[str, Dict[str, Any]]:
    """Validate ``{optimizer: {key: value}}`` overrides; return them keyed by registry name.

    Each optimizer name must be in the registry; each key one of its declared keywords
    (:meth:`~pmptrain.bench.registry.OptimizerSpec.options`); each value plain data (bool, string,
    null, a finite number, or a flat list of those) of the type of the keyword's default (a number
    where the default is a number, true/false where it is a bool, …). Ranges are the optimizer's own
    business: it checks them when the bench builds it before training.
    """
    from .registry import get_spec

    if optimizer_args is None:
        return {}
    if not isinstance(optimizer_args, Mapping):
        raise _fail(opt, "a mapping {optimizer: {key: value}}", optimizer_args)
    out: Dict[str, Dict[str, Any]] = {}
    for name, kwargs in optimizer_args.items():
        spec = get_spec(name)
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, Mapping):
            raise _fail(f"{opt}.{spec.name}", "a mapping {key: value}", kwargs)
        options = spec.options()
        for key, value in kwargs.items():
            where = f"--opt-arg {spec.name}.{key}"
            if key not in options:
                raise ConfigError(f"{where}: {spec.name} has no option {key!r}; valid: {', '.join(sorted(options))}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{where}: must be finite, got {value!r}")
            if not _plain(value):
                raise ConfigError(f"{where}: must be plain data (true/false, a finite number, a string, "
                                  f"null or a list of those), got {value!r}")
            need = _like_default(value, options[key])
            if need is not None:
                raise ConfigError(f"{where}: must be {need} (the default is {options[key]!r}), got {value!r}")
        out.setdefault(spec.name, {}).update(kwargs)
    return out


def check_model_args(builder: Callable, model_args: Mapping, opt: str = "model_args") -> None:
    """Refuse keys of ``model_args`` that ``builder(input_shape, num_classes, **kw)`` does not take,
    and values that are not plain data; the values' meaning is the builder's to check."""
    params = inspect.signature(builder).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        valid = [n for n, p in list(params.items())[2:] if p.kind is not p.VAR_POSITIONAL]
        unknown = sorted(set(model_args) - set(valid))
        if unknown:
            raise ConfigError(f"{flag(opt)}: unknown argument(s) {unknown} of model "
                              f"{getattr(builder, '__name__', builder)!r}; valid: {', '.join(valid) or 'none'}")
    for k, v in model_args.items():
        if not _plain(v) and not (isinstance(v, (list, tuple)) and all(_plain(e) for e in v)):
            raise ConfigError(f"{flag(opt)}: {k} must be plain data, got {v!r}")


@contextlib.contextmanager
def refused_as(option: str) -> Iterator[None]:
    """Turn a builder's ``TypeError``/``ValueError`` inside the block into a :class:`ConfigError`
    ``"<option>: <the builder's message>"`` (a ``ValueError`` that wraps a ``TypeError`` reports
    the ``TypeError``'s message): how the bench refuses, before training, a value only the model
    builder or an optimizer can judge."""
    try:
        yield
    except (TypeError, ValueError) as e:
        cause = e.__cause__ if isinstance(e.__cause__, TypeError) else e
        raise ConfigError(f"{option}: {cause}") from None


# --------------------------------------------------------------------------------------------
# YAML


def _expanded_nodes(root) -> int:
    """Number of nodes of a composed YAML graph with every alias expanded (memoised: linear in the
    document, however large the expansion)."""
    memo: Dict[int, int] = {}

    def size(node) -> int:
        key = id(node)
        if key in memo:
            return memo[key]
        memo[key] = MAX_YAML_NODES + 1  # a cycle (recursive alias) counts as too large
        if isinstance(node.value, list):
            n = 1
            for item in node.value:
                n += sum(size(x) for x in item) if isinstance(item, tuple) else size(item)
                if n > MAX_YAML_NODES:
                    break
        else:
            n = 1
        memo[key] = n
        return n

    return size(root)


def load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load(text)`` within bounds: at most :data:`MAX_YAML_BYTES` bytes and
    :data:`MAX_YAML_NODES` nodes after alias expansion; a refusal or syntax error is a
    :class:`ConfigError` starting with ``where``."""
    import yaml

    if len(text.encode("utf-8", "surrogatepass")) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: YAML larger than {MAX_YAML_BYTES} bytes; a configuration is a few lines")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:
            return None
        if _expanded_nodes(node) > MAX_YAML_NODES:
            raise ConfigError(f"{where}: YAML expands to more than {MAX_YAML_NODES} values (through aliases "
                              "or nesting); refused")
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply; refused") from None
