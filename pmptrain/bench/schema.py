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
           "NameList", "Seeds", "Mapping_", "check_unknown", "check_fields", "check_optimizer_args", "check_model_args",
           "check_model_size", "refused_as", "load_yaml", "max_threads", "MAX_YAML_BYTES", "MAX_YAML_NODES",
           "MAX_SEEDS", "MAX_SEED", "MAX_MAGNITUDE", "MAX_STEP_SIZE", "MAX_PATH_CHARS", "MAX_MODEL_PARAMETERS"]

#: Largest YAML document :func:`load_yaml` reads (configs are a few hundred bytes).
MAX_YAML_BYTES = 1 << 20
#: Most nodes a YAML document may expand to, aliases counted as often as they are used.
MAX_YAML_NODES = 100_000
#: Most seeds of one bench (a count or the length of a list).
MAX_SEEDS = 1000
#: Largest seed: numpy's generators take seeds below 2**32.
MAX_SEED = 2**32 - 1
#: Largest magnitude of any number in an optimizer override or a model argument.
MAX_MAGNITUDE = 1e9
#: Largest step-size hyper-parameter (``lr``; the registry's largest grid value is 1e4).
MAX_STEP_SIZE = 1e6
#: Longest path (characters; Linux's PATH_MAX is 4096 bytes).
MAX_PATH_CHARS = 4096
#: Most parameters a bench model may have (before the memory bound of :func:`check_model_size`).
MAX_MODEL_PARAMETERS = 500_000_000


def max_threads() -> int:
    """Most threads ``--threads`` may ask for: 4 × the machine's CPUs."""
    return 4 * max(1, os.cpu_count() or 1)


class ConfigError(ValueError):
    """A configuration value or file that the schema refuses; the message names the option."""


def flag(opt: str) -> str:
    """The command-line spelling of option ``opt``: ``batch_size`` → ``--batch-size``."""
    return "--" + opt.replace("_", "-")


def _show(value: Any) -> str:
    """``repr(value)``, cut to its start when long (a 400-digit number, a 5000-character path)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + f"... ({len(text)} characters)"


def _fail(opt: str, what: str, value: Any) -> ConfigError:
    return ConfigError(f"{flag(opt) if not opt.startswith('-') else opt}: must be {what}, got {_show(value)}")


def _finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is finite as a float (an int of 400 digits is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


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
        if not _finite_number(value):
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

    what = f"a path (a string of at most {MAX_PATH_CHARS} characters)"

    def check(self, opt, value):
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value or "\0" in value or len(value) > MAX_PATH_CHARS:
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
        out = [v.strip() for v in value]
        if len(set(out)) != len(out):
            raise ConfigError(f"{flag(opt)}: names repeated: {out}")
        return out


class Seeds(Kind):
    """A count ``1 <= n <=`` :data:`MAX_SEEDS` (seeds ``0..n-1``) or a non-empty list of at most
    :data:`MAX_SEEDS` distinct integers in ``[0,`` :data:`MAX_SEED` ``]``."""

    what = (f"a count in [1, {MAX_SEEDS}] or a non-empty list of at most {MAX_SEEDS} integers "
            f"in [0, {MAX_SEED}]")

    def check(self, opt, value):
        if isinstance(value, int) and not isinstance(value, bool):
            if not 1 <= value <= MAX_SEEDS:  # checked before range(): 10**20 seeds never get built
                raise _fail(opt, self.what, value)
            return list(range(value))
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_SEEDS \
                or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_SEED for v in value):
            raise _fail(opt, self.what, value)
        if len(set(value)) != len(value):
            raise ConfigError(f"{flag(opt)}: seeds repeated: {list(value)}")
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


#: The kind of every step-size hyper-parameter (``--lr``, ``--opt-arg <opt>.<lr_key>``).
STEP_SIZE = Number(0, MAX_STEP_SIZE)


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
    """A value a configuration may hold: bool, finite number of magnitude at most
    :data:`MAX_MAGNITUDE`, string, None, or a flat list of those."""
    if value is None or isinstance(value, (bool, str)):
        return True
    if isinstance(value, (int, float)):
        return _finite_number(value) and abs(value) <= MAX_MAGNITUDE
    if isinstance(value, (list, tuple)):
        return len(value) <= MAX_YAML_NODES and all(_plain(v) and not isinstance(v, (list, tuple)) for v in value)
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


_PLAIN_WHAT = (f"plain data (true/false, a finite number of magnitude at most {MAX_MAGNITUDE:g}, a string, "
               "null or a list of those)")


def check_optimizer_args(optimizer_args: Any, opt: str = "optimizer_args") -> Dict[str, Dict[str, Any]]:
    """Validate ``{optimizer: {key: value}}`` overrides; return them keyed by registry name.

    Each optimizer name must be in the registry, and given once (``sgd`` and ``SGD`` are one name);
    each key one of its declared keywords (:meth:`~pmptrain.bench.registry.OptimizerSpec.options`);
    each value plain data (bool, string, null, a finite number of magnitude at most
    :data:`MAX_MAGNITUDE`, or a flat list of those) of the type of the keyword's default (a number
    where the default is a number, true/false where it is a bool, …; null also where the keyword's
    annotation is ``Optional``: :meth:`~pmptrain.bench.registry.OptimizerSpec.nullable`); the step-size
    hyper-parameter (``spec.lr_key``) in ``[0,`` :data:`MAX_STEP_SIZE` ``]`` as ``--lr``. Other
    ranges are the optimizer's own business: it checks them when the bench builds it before training.
    """
    from .registry import get_spec

    if optimizer_args is None:
        return {}
    if not isinstance(optimizer_args, Mapping):
        raise _fail(opt, "a mapping {optimizer: {key: value}}", optimizer_args)
    out: Dict[str, Dict[str, Any]] = {}
    for name, kwargs in optimizer_args.items():
        spec = get_spec(name)
        if spec.name in out:
            raise ConfigError(f"{flag(opt)}: {spec.name} given twice ({name!r})")
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, Mapping):
            raise _fail(f"{opt}.{spec.name}", "a mapping {key: value}", kwargs)
        options, nullable = spec.options(), spec.nullable()
        for key, value in kwargs.items():
            where = f"--opt-arg {spec.name}.{key}"
            if key not in options:
                raise ConfigError(f"{where}: {spec.name} has no option {key!r}; valid: {', '.join(sorted(options))}")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not _finite_number(value):
                raise ConfigError(f"{where}: must be finite, got {_show(value)}")
            if not _plain(value):
                raise ConfigError(f"{where}: must be {_PLAIN_WHAT}, got {_show(value)}")
            need = None if value is None and key in nullable else _like_default(value, options[key])
            if need is not None:
                raise ConfigError(f"{where}: must be {need} (the default is {options[key]!r}), got {value!r}")
            if key == spec.lr_key:
                STEP_SIZE.check(where, value)
        out[spec.name] = dict(kwargs)
    return out


def _annotation_kind(ann: Any) -> Optional[str]:
    """``"bool"``, ``"int"``, ``"float"``, ``"str"``, ``"ints"`` (a sequence of ints, or one int)
    or ``"floats"`` for a builder's parameter annotation; ``None`` when it says nothing checkable.
    ``Optional[X]`` gives X's kind (None is allowed separately)."""
    import typing

    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Union:
        kinds = {_annotation_kind(a) for a in args if a is not type(None)}
        return kinds.pop() if len(kinds) == 1 else None
    if ann in (bool, int, float, str):
        return ann.__name__
    if origin is not None and args:
        import collections.abc as cabc

        if origin in (list, tuple, cabc.Sequence) and args[0] in (int, float):
            return "ints" if args[0] is int else "floats"
    return None


def _check_model_value(where: str, value: Any, kind: Optional[str], default: Any) -> None:
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and abs(v) <= MAX_MAGNITUDE

    def is_num(v):
        return _finite_number(v) and abs(v) <= MAX_MAGNITUDE

    if value is None and (default is None or kind is None):
        return
    if kind == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{where}: must be true or false, got {_show(value)}")
    if kind == "int" and not is_int(value):
        raise ConfigError(f"{where}: must be an integer of magnitude at most {MAX_MAGNITUDE:g}, got {value!r}")
    if kind == "float" and not is_num(value):
        raise ConfigError(f"{where}: must be a finite number of magnitude at most {MAX_MAGNITUDE:g}, got {value!r}")
    if kind == "str" and not isinstance(value, str):
        raise ConfigError(f"{where}: must be a string, got {value!r}")
    if kind in ("ints", "floats"):
        ok = is_int if kind == "ints" else is_num
        if not (ok(value) or (isinstance(value, (list, tuple)) and len(value) <= 1000 and all(ok(v) for v in value))):
            what = "integers" if kind == "ints" else "finite numbers"
            raise ConfigError(f"{where}: must be a list of {what} (magnitude at most {MAX_MAGNITUDE:g}), got {value!r}")
    if kind is None:
        need = _like_default(value, default)
        if need is not None:
            raise ConfigError(f"{where}: must be {need} (the default is {default!r}), got {value!r}")


def check_model_args(builder: Callable, model_args: Mapping, opt: str = "model_args") -> None:
    """Refuse keys of ``model_args`` that ``builder(input_shape, num_classes, **kw)`` does not take,
    values that are not plain data, and values not of the type of the builder's parameter: its
    annotation (``bool`` must be true/false — ``"no"`` is refused, not read as true —, ``int`` an
    integer, ``float`` a number, ``Sequence[int]`` a list of integers) or, unannotated, its
    default's type. Every number's magnitude is at most :data:`MAX_MAGNITUDE`. Ranges are the
    builder's to check (the bench builds the model before training), the model's size
    :func:`check_model_size`'s."""
    import typing

    name = getattr(builder, "__name__", builder)
    params = inspect.signature(builder).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        valid = [n for n, p in list(params.items())[2:] if p.kind is not p.VAR_POSITIONAL]
        unknown = sorted(set(model_args) - set(valid))
        if unknown:
            raise ConfigError(f"{flag(opt)}: unknown argument(s) {unknown} of model "
                              f"{name!r}; valid: {', '.join(valid) or 'none'}")
    try:
        hints = typing.get_type_hints(builder)
    except Exception:  # an annotation that does not resolve: judge by the defaults only
        hints = {}
    for k, v in model_args.items():
        if not _plain(v) and not (isinstance(v, (list, tuple)) and all(_plain(e) for e in v)):
            raise ConfigError(f"{flag(opt)}: {k} must be {_PLAIN_WHAT}, got {_show(v)}")
        prm = params.get(k)
        default = prm.default if prm is not None else inspect.Parameter.empty
        _check_model_value(f"{flag(opt)}: {k}", v, _annotation_kind(hints.get(k)), default)


def check_model_size(builder: Callable, input_shape, num_classes: int, model_args: Mapping,
                     model: str, opt: str = "model_args") -> int:
    """Build the model on PyTorch's ``meta`` device (shapes only, no memory) and refuse it when it
    has more than :data:`MAX_MODEL_PARAMETERS` parameters or its parameters with gradients and two
    optimizer moments (16 bytes each in float32) would not fit in the machine's memory; the builder's
    own refusals become a :class:`ConfigError` naming ``--model-args``. Returns the parameter count."""
    import torch

    with refused_as(f"{flag(opt)}: model {model!r} refuses {dict(model_args)}"):
        try:
            with torch.device("meta"):
                net = builder(input_shape, num_classes, **model_args)
        except (NotImplementedError, RuntimeError):
            return -1  # an operation the meta device lacks: the real build (preflight) judges it
    n = sum(p.numel() for p in net.parameters())
    limit = MAX_MODEL_PARAMETERS
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        limit = min(limit, memory // 16)
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not a POSIX system
        pass
    if n > limit:
        raise ConfigError(f"{flag(opt)}: model {model!r} would have {n:,} parameters, more than the {limit:,} "
                          f"allowed ({MAX_MODEL_PARAMETERS:,}, and 16 bytes each within this machine's memory: "
                          f"weights, gradients and two optimizer moments); reduce its widths")
    return n


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


_YAML_LOADER = None


def _yaml_loader():
    """``yaml.SafeLoader`` that also reads YAML 1.2 floats: ``1e3``, ``1e-3``, ``1.5e3``, ``-2E+5``
    (YAML 1.1, PyYAML's default, wants a dot in the mantissa and a sign in the exponent and reads
    the others as *strings*, so
    ``--opt-arg emsa.rho=1e3`` or ``lr: 1e-3`` in a config were refused as "not a number")."""
    global _YAML_LOADER
    if _YAML_LOADER is None:
        import re

        import yaml

        class Loader(yaml.SafeLoader):
            pass

        exponent = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
        Loader.add_implicit_resolver("tag:yaml.org,2002:float", exponent, list("-+0123456789."))
        _YAML_LOADER = Loader
    return _YAML_LOADER


def load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load(text)`` within bounds: at most :data:`MAX_YAML_BYTES` bytes and
    :data:`MAX_YAML_NODES` nodes after alias expansion; a refusal or syntax error is a
    :class:`ConfigError` starting with ``where``. Exponent floats without a dot (``1e-3``) are
    numbers, as in YAML 1.2 (:func:`_yaml_loader`)."""
    import yaml

    if len(text.encode("utf-8", "surrogatepass")) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: YAML larger than {MAX_YAML_BYTES} bytes; a configuration is a few lines")
    try:
        loader = _yaml_loader()
        node = yaml.compose(text, Loader=loader)
        if node is None:
            return None
        if _expanded_nodes(node) > MAX_YAML_NODES:
            raise ConfigError(f"{where}: YAML expands to more than {MAX_YAML_NODES} values (through aliases "
                              "or nesting); refused")
        return yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader subclass (one float resolver added)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply; refused") from None
