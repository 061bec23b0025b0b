"""The configuration schema (issue 10, finding 3): every option's type, range and finiteness, unknown
keys, optimizer overrides, model arguments and bounded YAML; each refusal exits 2 naming the key and
leaves no output directory behind."""

import math

import pytest

from pmptrain.bench import cli, schema
from pmptrain.bench.config import FIELDS, BenchConfig
from pmptrain.bench.lm import LM_FIELDS, LMConfig
from pmptrain.bench.registry import OPTIMIZERS, get_spec

BASE = "mnist1d_samples: 200\nepochs: 1\nseeds: 1\noptimizers: [sgd, emsa]\nbatch_size: 32\n"


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


def _train(tmp_path, extra: str, *args):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(BASE + extra + "\n")
    out = tmp_path / "out"
    code = cli.main(["train", "--config", str(cfg), "--out", str(out), *args])
    return code, out


@pytest.mark.parametrize("extra, names", [
    ('tensorboard: "no"', "--tensorboard: must be true or false"),
    ('download: "no"', "--download: must be true or false or null"),
    ("optimizers: 5", "--optimizers: must be a non-empty list of names"),
    ("model_args: {bogus: 1}", "--model-args: unknown argument(s) ['bogus'] of model 'mlp'"),
    ("data_dir: [a, b]", "--data-dir: must be a path"),
    ("lr: .nan", "--lr: must be a finite number in [0, 1e+06]"),
    ("lr: {emsa: .inf}", "--lr: must be a finite number in [0, 1e+06]"),
    ("optimizer_args: {sgd: {lr: .nan}}", "--opt-arg sgd.lr: must be finite"),
    ("optimizer_args: {emsa: {rho: .inf}}", "--opt-arg emsa.rho: must be finite"),
    ('optimizer_args: {sgd: {momentum: "x"}}', "--opt-arg sgd.momentum: must be a finite number"),
    ("optimizer_args: {emsa: {bogus: 1}}", "--opt-arg emsa.bogus: emsa has no option 'bogus'"),
    ("optimizer_args: {emsa: {betas: [0.9]}}", "--opt-arg emsa.betas: must be a list of 2 numbers"),
    ("optimizer_args: {emsa: {exclude: {a: 1}}}", "--opt-arg emsa.exclude: must be plain data"),
    ("optimizer_args: {emsa: 5}", "--optimizer-args.emsa: must be a mapping"),
    ("optimizer_args: [1]", "--optimizer-args: must be a mapping"),
    ("loss: [x]", "--loss: must be one of cross-entropy, squared-hinge"),
    ("epochs: 1.5", "--epochs: must be an integer >= 1"),
    ("epochs: true", "--epochs: must be an integer >= 1"),
    ("target_acc: .nan", "--target-acc: must be a finite number in (0, 1]"),
    ("val_fraction: .nan", "--val-fraction: must be a finite number in [0, 1) or null"),
    ('seeds: [0, "a"]', "--seeds: must be a count in [1, 1000] or a non-empty list"),
    ("keep: 5", "--keep: must be a list of names"),
    ("keep: [first, middle]", "--keep: must be a list of names"),
    ("threads: true", "--threads: must be an integer >= 1 and <="),
    ("mnist1d_samples: .inf", "--mnist1d-samples: must be an integer >= 10"),
    ("scale: 5", "--scale: must be one of tensor, channel or null"),
    ("bogus_option: 1", "unknown option(s) ['bogus_option']"),
    ("3: 1", "option names must be strings"),
])
def test_bad_config_values_exit_2_naming_the_key(tmp_path, capsys, extra, names):
    code, out = _train(tmp_path, extra)
    err = capsys.readouterr().err
    assert code == 2, err
    assert names in err
    assert not out.exists()


@pytest.mark.parametrize("extra, names", [
    ("model_args: {widths: x}", "--model-args: widths: must be a list of integers"),
    ("model_args: {widths: [0]}", "--model-args: model 'mlp' refuses"),
    ("optimizer_args: {emsa: {rho: -1}}", "--opt-arg emsa: invalid rho=-1"),
    ("optimizer_args: {sgd: {lr: -1}}", "--opt-arg sgd.lr: must be a finite number in [0, 1e+06]"),
    ("optimizer_args: {sgd: {momentum: -1}}", "--opt-arg sgd: Invalid momentum value"),
    ("optimizer_args: {emsa: {fallback: bogus}}", "--opt-arg emsa: invalid fallback='bogus'"),
])
def test_values_only_the_builders_judge_are_refused_before_any_run(tmp_path, capsys, monkeypatch, extra, names):
    from pmptrain.bench import sweep

    ran = []
    monkeypatch.setattr(sweep, "run_one", lambda *a, **k: ran.append(a) or pytest.fail("a run started"))
    code, out = _train(tmp_path, extra)
    err = capsys.readouterr().err
    assert code == 2 and names in err, err
    assert not ran and not out.exists()


@pytest.mark.parametrize("arg, names", [
    ("sgd.lr=.nan", "--opt-arg sgd.lr: must be finite"),
    ("emsa.rho=-1", "--opt-arg emsa: invalid rho=-1"),
    ("emsa.stat_every=two", "--opt-arg emsa.stat_every: must be a finite number"),
    ("emsa.bogus=1", "--opt-arg emsa.bogus: emsa has no option"),
])
def test_opt_arg_values_go_through_the_same_schema(tmp_path, capsys, arg, names):
    out = tmp_path / "out"
    code = cli.main(["bench", "--optimizers", "sgd,emsa", "--epochs", "1", "--seeds", "1", "--mnist1d-samples",
                     "200", "--no-tensorboard", "--opt-arg", arg, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and names in err, err
    assert not out.exists()


@pytest.mark.parametrize("text, value", [("1e3", 1000.0), ("1e-3", 1e-3), ("-2E+5", -2e5), ("1.5e3", 1500.0),
                                         (".5e3", 500.0), ("1.0e+3", 1000.0), ("12", 12), ("1.5", 1.5),
                                         ("1e", "1e"), ("e3", "e3"), ("'1e3'", "1e3"), ("{lr: 1e-4}", {"lr": 1e-4})])
def test_yaml_reads_exponent_floats_as_numbers(text, value):
    """PyYAML's YAML 1.1 read ``1e3`` and ``1.5e3`` as strings (``--opt-arg emsa.rho=1e3`` was refused
    as "not a number"); the bench reads them as YAML 1.2 does, a quoted one stays a string."""
    got = schema.load_yaml(text, "x")
    assert got == value and type(got) is type(value)


def test_opt_arg_exponent_and_null_for_optional_keywords(capsys):
    code = cli.main(["bench", "--optimizers", "emsa", "--opt-arg", "emsa.rho=1e3", "--opt-arg", "emsa.max_gain=null",
                     "--dry-run"])
    out = capsys.readouterr()
    assert code == 0, out.err
    import json
    args = json.loads(out.out)["optimizer_args"]["emsa"]
    assert args == {"rho": 1000.0, "max_gain": None}
    assert "max_gain" in get_spec("emsa").nullable() and "fallback" not in get_spec("emsa").nullable()
    code = cli.main(["bench", "--optimizers", "sgd", "--opt-arg", "sgd.momentum=null", "--dry-run"])
    assert code == 2 and "--opt-arg sgd.momentum: must be a finite number" in capsys.readouterr().err


def test_good_spellings_are_normalised():
    cfg = BenchConfig.from_dict({"optimizers": "sgd, EMSA, binary_msa", "seeds": 3, "keep": "none", "scale": "None",
                                 "dataset": "fashion_mnist", "lr": {"Emsa": 2}, "data_dir": "/x",
                                 "optimizer_args": {"binary_msa": {"rho": 1, "gamma": 0.9}, "sgd": None}})
    assert cfg.optimizers == ["sgd", "emsa", "binary-msa"] and cfg.seeds == [0, 1, 2] and cfg.keep == [] and cfg.scale is None
    assert cfg.dataset == "fashion-mnist" and cfg.lr == {"emsa": 2} and cfg.data_dir == "/x"
    assert cfg.optimizer_args == {"binary-msa": {"rho": 1, "gamma": 0.9}, "sgd": {}}
    assert BenchConfig.from_dict(cfg.to_dict()) == cfg  # validation is idempotent (resume reloads it)


def test_every_field_is_declared():
    import dataclasses

    assert set(FIELDS) | {"lr", "optimizer_args"} == {f.name for f in dataclasses.fields(BenchConfig)}
    assert set(LM_FIELDS) | {"lr", "optimizer_args"} == {f.name for f in dataclasses.fields(LMConfig)}


def test_registry_defaults_pass_the_schema_and_options_follow_forwarding():
    for name, spec in OPTIMIZERS.items():
        assert schema.check_optimizer_args({name: dict(spec.defaults)}) == {name: dict(spec.defaults)}
    assert set(get_spec("sgd").options()) == {"lr", "momentum", "weight_decay", "nesterov"}
    emsa = get_spec("emsa").options()
    assert {"stat_every", "rho_scale", "solver", "weight_decay"} <= set(emsa) and "process_group" not in emsa
    assert emsa["rho"] == 1.0 and emsa["stat_every"] == 1  # registry default, then the class default
    assert set(get_spec("msa").options()) == set(emsa)  # MSA(**kwargs) forwards to EMSA
    assert {"gamma", "acc_init", "decay"} <= set(get_spec("binary-msa").options())


@pytest.mark.parametrize("kind, good, bad", [
    (schema.Bool(), [True, False], ["no", 0, 1, None]),
    (schema.Int(1), [1, 7], [0, -1, 1.0, True, "2", None]),
    (schema.Number(0, 1, lo_open=True), [1, 0.5, 1e-9], [0, 1.5, math.nan, math.inf, True, "0.5"]),
    (schema.Maybe(schema.Int(1)), [None, 3], [0, "x"]),
    (schema.PathText(), ["a/b"], ["", ["a"], 3, "a\0b"]),
    (schema.OneOf(("a", "b")), ["a"], ["c", ["a"], 1]),
    (schema.NameList(), [["a"], "a,b"], [[], "", 5, [1], ["a", ""]]),
    (schema.Seeds(), [2, [0, 5]], [0, [], [-1], [1.0], True]),
    (schema.Mapping_(), [{}, {"a": 1}, None], [[1], "x", {1: 2}]),
])
def test_kinds_accept_and_refuse(kind, good, bad):
    for v in good:
        kind.check("opt", v)
    for v in bad:
        with pytest.raises(schema.ConfigError, match=r"^--opt: must be"):
            kind.check("opt", v)


def test_yaml_alias_bomb_and_size_are_bounded(tmp_path, capsys):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    bomb = "\n".join(lines) + "\n"  # 600 bytes, 10^10 leaves once expanded
    with pytest.raises(schema.ConfigError, match="expands to more than"):
        schema.load_yaml(bomb, "--config x")
    ok = "\n".join(lines[:3]) + "\n"  # 1 + 10 + 100 + 1000 nodes: fine
    assert len(schema.load_yaml(ok, "--config x")["a2"]) == 10
    with pytest.raises(schema.ConfigError, match="nested too deeply|expands to more than"):
        schema.load_yaml("[" * 5000 + "]" * 5000, "--config x")
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(bomb + "model_args: {widths: *a9}\n")
    assert cli.main(["train", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "--config" in capsys.readouterr().err
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * schema.MAX_YAML_BYTES + "\nepochs: 1\n")
    assert cli.main(["train", "--config", str(big), "--out", str(tmp_path / "o")]) == 2
    assert "larger than" in capsys.readouterr().err
    assert cli.main(["bench", "--model-args", bomb.replace("\n", ", ").join("{}"), "--out", str(tmp_path / "o")]) == 2


def test_lm_config_uses_the_schema():
    with pytest.raises(schema.ConfigError, match="--tensorboard"):
        LMConfig.from_dict({"tensorboard": "no"})
    with pytest.raises(schema.ConfigError, match="--opt-arg adamw.lr: must be finite"):
        LMConfig.from_dict({"optimizer_args": {"adamw": {"lr": math.nan}}})
    with pytest.raises(schema.ConfigError, match="--model-args: unknown argument"):
        LMConfig.from_dict({"model_args": {"bogus": 1}})
    with pytest.raises(schema.ConfigError, match="--clip: must be a finite number >= 0"):
        LMConfig.from_dict({"clip": math.inf})


def test_lm_bench_refuses_builder_only_values_before_training(tmp_path, capsys, monkeypatch):
    from pmptrain.bench import lm

    monkeypatch.setattr(lm, "run_one", lambda *a, **k: pytest.fail("a run started"))
    tiny = ["--model", "gpt", "--steps", "2", "--seeds", "1", "--batch-size", "2", "--seq-len", "16",
            "--max-bytes", "30000", "--model-args", "{n_layer: 1, n_embd: 16, n_head: 2}", "--no-tensorboard",
            "--optimizers", "adamw,emsa-costate"]
    assert cli.main(["bench", *tiny, "--opt-arg", "emsa-costate.rho=-1", "--out", str(tmp_path / "a")]) == 2
    assert "--opt-arg emsa-costate: invalid rho=-1" in capsys.readouterr().err
    assert cli.main(["bench", *tiny[:-2], "--model-args", "{n_layer: 0}", "--out", str(tmp_path / "b")]) == 2
    assert "--model-args: model 'gpt' refuses" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_adagrad_entry_builds_torch_adagrad_with_its_options():
    import torch
    from torch import nn

    spec = get_spec("adagrad")
    assert spec.defaults == {"lr": 0.01} and spec.lr_key == "lr" and spec.levels is None
    assert set(spec.options()) == {"lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"}
    model = nn.Linear(3, 2)
    opt = spec.build(model, initial_accumulator_value=0.1, weight_decay=1e-3)
    assert isinstance(opt, torch.optim.Adagrad)
    g = opt.param_groups[0]
    assert (g["lr"], g["initial_accumulator_value"], g["weight_decay"], g["eps"]) == (0.01, 0.1, 1e-3, 1e-10)
    with pytest.raises(schema.ConfigError, match="adagrad has no option 'momentum'"):
        schema.check_optimizer_args({"adagrad": {"momentum": 0.9}})
