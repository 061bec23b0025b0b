"""Property-based fuzz of the command line and the configuration schema (issue 21): whatever a user
types — any option with any value, any YAML config — ``pmptrain`` answers with exit status 0 or 2,
never a traceback. Runs in-process with ``--dry-run`` (validation only: nothing is loaded, trained
or written), derandomised (the same examples on every run) and bounded to a few seconds."""

import contextlib
import io
import math

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from pmptrain.bench import cli, lm, schema, sweep  # noqa: E402
from pmptrain.bench.config import FIELDS, BenchConfig  # noqa: E402
from pmptrain.bench.registry import OPTIMIZERS  # noqa: E402

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

_NAMES = list(OPTIMIZERS) + ["adamx", "SGD", "binary_msa", ""]
_WORDS = ["mlp", "gpt", "ref_mlp", "cnn_small", "mnist1d", "mnist", "cifar10", "fashion-mnist", "first",
          "last", "none", "tensor", "channel", "lr", "sign", "uniform", "yes", "no", "true", "null", "~"]

# numbers as a user might type them: huge, tiny, negative, non-finite, in every spelling
_numbers = st.one_of(
    st.integers(-3, 3), st.integers(-(10**30), 10**30), st.sampled_from([2**31, 2**32, 2**63, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, -1e308, 1e-320, 0.5, 1e6, 1e9]),
)
_texts = st.one_of(st.sampled_from(_WORDS + _NAMES), st.text(max_size=12),
                   st.lists(st.sampled_from(_NAMES + _WORDS), max_size=4).map(",".join))


def _as_arg(v) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return str(v)


_values = st.one_of(_numbers.map(_as_arg), _texts)
_yaml_values = st.one_of(_texts.map(lambda s: "{" + s + "}"), st.sampled_from([
    "{widths: [40000, 40000]}", "{widths: 99999999999999999999}", "{batchnorm: 'no'}", "{bias: 1}",
    "{dropout: .nan}", "{n_embd: 65536}", "[1, 2]", "{a: &a [*a]}", "'x'", "{widths: []}", "{width: 3}"]))

_OPTIONS = ["--dataset", "--model", "--optimizers", "--loss", "--epochs", "--seeds", "--batch-size", "--lr",
            "--tune", "--val-fraction", "--target-acc", "--keep", "--scale", "--init", "--density-convention",
            "--data-dir", "--max-train", "--max-test", "--mnist1d-samples", "--threads", "--steps", "--seq-len",
            "--eval-every", "--warmup", "--clip", "--max-bytes", "--target-loss", "--preset"]


@st.composite
def _argv(draw):
    args = []
    for opt in draw(st.lists(st.sampled_from(_OPTIONS), max_size=5)):
        args += [opt, draw(_values)]
    if draw(st.booleans()):
        args += ["--model-args", draw(_yaml_values)]
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(_NAMES))
        key = draw(st.sampled_from(["lr", "rho", "momentum", "decay", "gamma", "betas", "bogus", "latent_scale"]))
        args += ["--opt-arg", f"{name}.{key}={draw(_values)}"]
    for flag in draw(st.lists(st.sampled_from(["--shuffle", "--no-shuffle", "--tensorboard", "--download"]),
                              max_size=2)):
        args.append(flag)
    return args


@pytest.fixture()
def no_loading(monkeypatch, tmp_path):
    def loaded(*a, **k):
        raise AssertionError("--dry-run loaded data")

    monkeypatch.setattr(sweep, "load_data", loaded)
    monkeypatch.setattr(lm, "load_corpus", loaded)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def _run(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse's own refusals (an int option given "x")
            code = e.code
    return code, err.getvalue()


def test_fuzzed_command_lines_exit_0_or_2_and_never_trace(no_loading):
    out = str(no_loading / "out")

    @FUZZ
    @given(_argv(), st.sampled_from(["bench", "train"]))
    def check(args, command):
        argv = [command, "--dry-run", "--out", out, *args]
        if command == "train":
            argv += ["--config", str(no_loading / "missing.yaml")]
        code, err = _run(argv)
        assert code in (0, 2), (argv, code, err)
        assert "Traceback" not in err, (argv, err)
        if code == 2:
            assert "error:" in err or "usage:" in err, (argv, err)

    check()


_config_values = st.recursive(
    st.one_of(st.none(), st.booleans(), _numbers, _texts),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(_WORDS + _NAMES),
                                                                          inner, max_size=3)),
    max_leaves=6)


def test_fuzzed_configs_are_accepted_or_refused_with_a_config_error():
    keys = sorted(set(FIELDS) | {"lr", "optimizer_args"})

    @FUZZ
    @given(st.dictionaries(st.sampled_from(keys + ["bogus"]), _config_values, max_size=4))
    def check(d):
        try:
            cfg = BenchConfig.from_dict(dict(d))
        except schema.ConfigError as e:  # the one refusal, naming the option
            assert str(e).startswith(("--", "config")), str(e)
        else:
            assert BenchConfig.from_dict(cfg.to_dict()) == cfg  # what passed, passes again

    check()
