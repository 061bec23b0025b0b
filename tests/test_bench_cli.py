"""Tests of the ``pmptrain`` CLI (bench/train), the optimizer registry, the runner and the report.

All runs use a tiny MNIST-1D (``--mnist1d-samples 200``: 160 train / 40 test examples, generated
into a temporary cache) for one or two epochs.
"""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pmptrain.bench import checkpoint as ckpt_mod
from pmptrain.bench import cli, losses, registry, runner, sweep
from pmptrain.bench.config import BenchConfig
from pmptrain.bench.report import ROW_FIELDS
from pmptrain.bench.schema import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--mnist1d-samples", "200", "--batch-size", "32", "--no-tensorboard", "--threads", "1"]


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path_factory, monkeypatch):
    # MNIST-1D is cached under $XDG_CACHE_HOME/pmptrain: keep the user's cache untouched
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


def _results(out: Path):
    return json.loads((out / "results.json").read_text())


# ---------------------------------------------------------------------------------- CLI surface


def test_help_documents_everything(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("--dataset", "--model", "--optimizers", "--epochs", "--seeds", "--batch-size",
                 "--lr", "--tune", "--target-acc", "--out", "--tensorboard", "--data-dir",
                 "--download", "--preset", "--threads", "--resume", "lihao-binary-mnist",
                 "results.csv", "torchrun", *registry.OPTIMIZERS):
        assert word in text, word
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "--config" in capsys.readouterr().out


def test_unknown_optimizer_is_a_clear_error(capsys, tmp_path):
    code = cli.main(["bench", "--optimizers", "sgd,adamx", "--out", str(tmp_path / "x"), *TINY])
    err = capsys.readouterr().err
    assert code == 2
    assert "--optimizers" in err and "'adamx'" in err and "binary-msa" in err
    assert not (tmp_path / "x").exists()
    with pytest.raises(registry.UnknownOptimizerError, match="valid names"):
        registry.get_spec("lbfgs")


@pytest.mark.parametrize("args, word", [
    (["--epochs", "0"], "--epochs"),
    (["--seeds", "a,b"], "--seeds"),
    (["--target-acc", "1.5"], "--target-acc"),
    (["--opt-arg", "emsa-rho=2"], "--opt-arg"),
    (["--keep", "middle"], "--keep"),
    (["--tune", "lr", "--lr", "0.1"], "--tune"),
])
def test_bad_arguments_name_the_option(capsys, tmp_path, args, word):
    assert cli.main(["bench", *args, "--out", str(tmp_path / "x"), *TINY]) == 2
    assert word in capsys.readouterr().err


def test_train_needs_a_config(capsys):
    assert cli.main(["train"]) == 2
    assert "--config" in capsys.readouterr().err


def test_presets_resolve():
    ns = cli.build_parser().parse_args(["bench", "--preset", "lihao-binary-mnist", "--epochs", "3"])
    cfg, _, resume = cli._resolve(ns)
    assert not resume
    assert (cfg.model, cfg.dataset, cfg.loss, cfg.batch_size, cfg.keep, cfg.scale, cfg.epochs) == \
        ("ref_mlp", "mnist", "squared-hinge", 100, [], None, 3)
    assert cfg.optimizers == ["binary-msa"]
    assert cfg.optimizer_args["binary-msa"] == {"rho": 0.5, "decay": 0.999, "gamma": 0.95, "acc_init": 1e-6,
                                                "acc_init_mode": "uniform"}


def test_registry_entries_are_documented():
    for name, spec in registry.OPTIMIZERS.items():
        assert spec.lr_key in spec.defaults and len(spec.tune_grid) >= 2 and spec.description
        assert name in registry.__doc__
    assert registry.get_spec("Binary_MSA").levels == "binary"


def test_squared_hinge_loss():
    logits = torch.tensor([[0.5, -2.0, 1.5], [0.0, 0.0, 0.0]])
    y = torch.tensor([2, 0])
    t = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, -1.0]])
    ref = (torch.clamp(1 - t * logits, min=0) ** 2).mean(1)
    assert torch.allclose(losses.squared_hinge_loss(logits, y), ref)
    assert losses.squared_hinge_loss(logits, y)[0] == pytest.approx((1.5**2 + 0 + 0) / 3)


# ---------------------------------------------------------------------------------- smoke runs


def test_bench_smoke_results_schema_and_plots(tmp_path, capsys):
    out = tmp_path / "b"
    opts = "sgd,emsa,binaryconnect,binary-msa"
    assert cli.main(["bench", "--optimizers", opts, "--epochs", "1", "--seeds", "2",
                     "--target-acc", "0.05", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "final acc" in printed and "emsa" in printed
    res = _results(out)
    assert res["schema"] == 1 and res["meta"]["versions"]["torch"] == torch.__version__
    assert {"python", "pmptrain", "git"} <= set(res["meta"]["versions"])
    assert [r["optimizer"] for r in res["rows"]] == opts.split(",")
    for row in res["rows"]:
        assert set(ROW_FIELDS) <= set(row)
        assert row["seeds"] == 2 and 0 <= row["final_acc_median"] <= 1
        assert row["reached"] == 2 and row["epochs_to_target_median"] == 1
        assert row["median_step_ms"] > 0 and row["ratio_to_sgd"] > 0
        assert row["peak_rss_mb"] > 0
    assert res["rows"][0]["ratio_to_sgd"] == pytest.approx(1.0)
    assert len(res["runs"]) == 2 * len(res["rows"])
    assert all(len(r["curves"]["test_acc"]) == 1 for r in res["runs"])
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(ROW_FIELDS) and len(rows) == len(res["rows"])
    for png in ("acc_vs_epoch.png", "acc_vs_seconds.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    rec = json.loads((out / "runs" / "emsa" / "seed1" / "run.json").read_text())
    assert rec["status"] == "done" and rec["seed"] == 1 and rec["config"]["batch_size"] == 32
    assert (out / "runs" / "emsa" / "seed1" / "checkpoint.pt").is_file()
    assert json.loads((out / "config.json").read_text())["config"]["optimizers"] == opts.split(",")


def test_tune_reports_best_of_grid_and_tensorboard(tmp_path):
    out = tmp_path / "t"
    assert cli.main(["bench", "--optimizers", "sgd", "--tune", "lr", "--epochs", "1", "--seeds", "1",
                     "--out", str(out), *TINY, "--tensorboard"]) == 0
    res = _results(out)
    row = res["rows"][0]
    assert row["tuned"] and "val" in row["selected_by"] and len(row["grid_scores"]) == 3
    assert sum(r["selected"] for r in res["runs"]) == 1 and len(res["runs"]) == 3
    assert "best of grid" in (out / "results.txt").read_text()
    events = list((out / "tensorboard" / "sgd").rglob("events.out.tfevents.*"))
    assert len(events) == 3 and all(e.stat().st_size > 0 for e in events)


def test_sgd_reference_timing_when_sgd_not_benchmarked(tmp_path):
    out = tmp_path / "r"
    assert cli.main(["bench", "--optimizers", "adam", "--epochs", "1", "--seeds", "1",
                     "--out", str(out), *TINY]) == 0
    res = _results(out)
    assert "reference" in res["sgd_reference"]["source"] and res["rows"][0]["ratio_to_sgd"] > 0
    assert (out / "sgd_reference.json").is_file()


# ---------------------------------------------------------------------------------- resume


class _Killed(BaseException):
    pass


def _final_state(out: Path, opt: str):
    ck = ckpt_mod.load(out / "runs" / opt / "seed0" / "checkpoint.pt")
    return ck["model"], ck["history"]


def test_resume_is_exact(tmp_path, monkeypatch):
    opts = ["sgd", "adam", "emsa", "binaryconnect", "bop", "binary-msa"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "dataset: mnist1d\nmnist1d_samples: 200\nmodel: mlp\nmodel_args: {widths: [32, 32], dropout: 0.1}\n"
        f"optimizers: [{', '.join(opts)}]\nepochs: 2\nseeds: [0]\nbatch_size: 32\n"
        "tensorboard: false\nthreads: 1\n")
    full, part = tmp_path / "full", tmp_path / "part"
    assert cli.main(["train", "--config", str(cfg), "--out", str(full)]) == 0

    killed = []

    def kill(run_dir, epoch):  # the process dies right after the first epoch's checkpoint
        if run_dir is not None and epoch == 0 and not killed:
            killed.append(run_dir)
            raise _Killed

    monkeypatch.setattr(runner, "_after_checkpoint", kill)
    with pytest.raises(_Killed):
        cli.main(["train", "--config", str(cfg), "--out", str(part)])
    monkeypatch.undo()
    assert killed and not (part / "results.json").exists()
    ck = ckpt_mod.load(killed[0] / "checkpoint.pt")
    assert ck["epoch"] == 0
    # another option than epochs cannot change on resume
    assert cli.main(["train", "--resume", str(part), "--batch-size", "16"]) == 2
    assert cli.main(["train", "--config", str(cfg), "--resume", str(part)]) == 0

    for opt in opts:
        (m1, h1), (m2, h2) = _final_state(full, opt), _final_state(part, opt)
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert [h[key] for h in h1] == [h[key] for h in h2], (opt, key)
        assert m1.keys() == m2.keys()
        for k in m1:
            assert torch.equal(m1[k], m2[k]), (opt, k)
    r1, r2 = _results(full), _results(part)
    for a, b in zip(r1["rows"], r2["rows"]):
        assert a["final_acc_median"] == b["final_acc_median"]


# ---------------------------------------------------------------------------------- distributed


def _torchrun(args, tmp_path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pmptrain", *args]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=tmp_path, start_new_session=True)
    try:
        _, err = p.communicate(timeout=300)  # ~6 s idle; generous for a loaded machine
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # torchrun and its workers
        p.communicate()
        pytest.fail("torchrun bench did not finish within 300 s")
    assert p.returncode == 0, err[-3000:]


@pytest.mark.distributed
@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one(tmp_path, wrap):
    common = ["bench", "--optimizers", "sgd,emsa,binaryconnect", "--epochs", "1", "--seeds", "1",
              "--model-args", "{widths: [32, 32]}", *TINY]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main([*common, "--out", str(one)]) == 0
    _torchrun([*common, "--out", str(two)] + (["--fsdp"] if wrap == "fsdp" else []), tmp_path)
    r2 = _results(two)
    assert r2["meta"]["world_size"] == 2
    for opt in ("sgd", "emsa", "binaryconnect"):
        (m1, h1), (m2, h2) = _final_state(one, opt), _final_state(two, opt)
        assert h1[0]["test_loss"] == pytest.approx(h2[0]["test_loss"], rel=1e-4, abs=1e-5), opt
        assert h1[0]["train_loss"] == pytest.approx(h2[0]["train_loss"], rel=1e-4, abs=1e-5), opt
        assert abs(h1[0]["test_acc"] - h2[0]["test_acc"]) <= 1 / 40 + 1e-9, opt
        for k in m1:
            assert torch.allclose(m1[k], m2[k], rtol=1e-4, atol=1e-5), (opt, k)


@pytest.mark.distributed
def test_torchrun_fsdp_resume_continues_exactly(tmp_path):
    """Under FSDP2 the checkpoint holds whole tensors (gathered on every rank, written by rank 0)
    and --resume loads them back into each rank's shard: 1 epoch then --resume to 2 epochs gives
    the uninterrupted 2-epoch run."""
    common = ["bench", "--fsdp", "--optimizers", "adam,emsa,binary-msa", "--seeds", "1",
              "--model-args", "{widths: [32, 32]}", *TINY]
    full, part = tmp_path / "full", tmp_path / "part"
    _torchrun([*common, "--epochs", "2", "--out", str(full)], tmp_path)
    _torchrun([*common, "--epochs", "1", "--out", str(part)], tmp_path)
    _torchrun([*common, "--epochs", "2", "--resume", str(part)], tmp_path)
    for opt in ("adam", "emsa", "binary-msa"):
        (m1, h1), (m2, h2) = _final_state(full, opt), _final_state(part, opt)
        assert [h["train_loss"] for h in h1] == pytest.approx([h["train_loss"] for h in h2], rel=1e-6), opt
        for k in m1:
            assert torch.allclose(m1[k], m2[k], rtol=1e-6, atol=1e-7), (opt, k)


# ---------------------------------------------------------------------------------- discrete MSA


def test_real_discrete_msa_gamma_via_end_epoch(tmp_path):
    out = tmp_path / "g"
    assert cli.main(["bench", "--optimizers", "binary-msa,ternary-msa", "--epochs", "2", "--seeds",
                     "1", "--opt-arg", "binary-msa.gamma=0.5", "--out", str(out), *TINY]) == 0
    ck = ckpt_mod.load(out / "runs" / "binary-msa" / "seed0" / "checkpoint.pt")
    assert ck["optimizer"]["param_groups"][0]["decay"] == pytest.approx(1 - 0.001 * 0.25)
    row = _results(out)["rows"][1]
    assert row["optimizer"] == "ternary-msa" and 0 < row["final_density"] <= 1


def test_runs_are_interleaved_seed_major(tmp_path, monkeypatch):
    order = []
    real = runner.run_one

    def recording(cfg, data, name, overrides, seed, *a, **kw):
        order.append((name, dict(overrides).get("lr"), seed))
        return real(cfg, data, name, overrides, seed, *a, **kw)

    monkeypatch.setattr(sweep, "run_one", recording)
    out = tmp_path / "b"
    assert cli.main(["bench", "--optimizers", "adam,emsa", "--epochs", "1", "--seeds", "2", "--out", str(out),
                     "--tune", "lr", *TINY]) == 0
    grid_a, grid_e = registry.get_spec("adam").tune_grid, registry.get_spec("emsa").tune_grid
    per_seed = [("adam", v) for v in grid_a] + [("emsa", v) for v in grid_e]
    assert order == [(n, v, s) for s in (0, 1) for n, v in per_seed]
    res = json.loads((out / "results.json").read_text())
    assert [r["optimizer"] for r in res["rows"]] == ["adam", "emsa"]


# ---------------------------------------------------------------------------------- diagnostics
def test_step_info_scalars_are_the_declared_schema():
    from pmptrain.optim import StepInfo

    class _Disc(dict):  # what DiscreteDiagnostics exposes: "layers" and "total"
        pass

    disc = _Disc(layers={"fc": {}}, total={"flip_ratio": 0.25, "density": 0.5, "flips": 1, "numel": 4})
    info = StepInfo(skipped=False, hamiltonian_gain=torch.tensor(1.5), discrete=disc)
    assert info.scalars() == {"hamiltonian_gain": 1.5, "flip_ratio": 0.25, "density": 0.5}
    assert list(info.scalars()) == list(StepInfo.SCALARS)
    assert StepInfo(skipped=False, hamiltonian_gain=0.5).scalars() == {"hamiltonian_gain": 0.5}
    no_layers = _Disc(layers={}, total={"flip_ratio": 0.0, "density": 0.0})
    assert StepInfo(skipped=False, hamiltonian_gain=0.5, discrete=no_layers).scalars() == {"hamiltonian_gain": 0.5}
    assert StepInfo(skipped=True, hamiltonian_gain=0.0, discrete=disc).scalars() == {}


def test_epoch_diagnostics_average_over_the_steps_that_report_them():
    st = runner._EpochStats()
    for d in ({"hamiltonian_gain": 1.0, "flip_ratio": 0.5}, {}, {"hamiltonian_gain": 3.0}):
        st.add_scalars(d)
    assert st.diag_means() == {"hamiltonian_gain": 2.0, "flip_ratio": 0.5}


def test_run_history_logs_each_optimizers_step_scalars(tmp_path, monkeypatch):
    """Per-epoch diagnostics are the means of what each step's StepInfo.scalars() reported: the
    discrete MSA's flip ratio and the E-MSA gain are logged; torch's SGD reports nothing."""
    cfg = BenchConfig(mnist1d_samples=200, batch_size=32, epochs=1, seeds=[0], tensorboard=False,
                          optimizers=["sgd", "emsa", "binary-msa"])
    data = runner.load_data(cfg)
    seen = []
    real = runner.step_scalars
    monkeypatch.setattr(runner, "step_scalars", lambda opt: seen.append(real(opt)) or seen[-1])
    hist = {}
    for name in cfg.optimizers:
        seen.clear()
        h = runner.run_one(cfg, data, name, {}, 0, None)["history"][0]
        hist[name] = h
        for key in ("hamiltonian_gain", "flip_ratio"):
            vals = [d[key] for d in seen if key in d]
            if vals:
                assert h[key] == pytest.approx(sum(vals) / len(vals), rel=1e-12)
            else:
                assert key not in h
    assert "hamiltonian_gain" not in hist["sgd"] and "flip_ratio" not in hist["sgd"]
    assert hist["emsa"]["hamiltonian_gain"] > 0 and "flip_ratio" not in hist["emsa"]
    assert 0 < hist["binary-msa"]["flip_ratio"] < 1 and hist["binary-msa"]["hamiltonian_gain"] > 0
    assert 0 < hist["binary-msa"]["density"] <= 1


@pytest.mark.parametrize("flag, want", [([], True), (["--no-shuffle"], False), (["--shuffle"], True)])
def test_shuffle_option_reaches_the_loader(flag, want, tmp_path, monkeypatch):
    """--shuffle/--no-shuffle (YAML ``shuffle``) decides whether the training batches are permuted;
    with --no-shuffle the model sees the training set in file order."""
    from pmptrain.bench import runner

    seen = []
    real = runner.make_loader

    def spy(x, y, batch_size, shuffle=True, **kw):
        loader = real(x, y, batch_size, shuffle=shuffle, **kw)
        seen.append((shuffle, [idx.tolist() for idx in loader.global_batches()]))
        return loader

    monkeypatch.setattr(runner, "make_loader", spy)
    out = tmp_path / "run"
    assert cli.main(["bench", "--optimizers", "sgd", "--epochs", "1", "--seeds", "1", "--max-train", "64",
                     "--max-test", "32", "--batch-size", "16", "--mnist1d-samples", "200", "--threads", "1",
                     "--no-tensorboard", "--out", str(out), *flag]) == 0
    assert [s for s, _ in seen] == [want]
    order = [i for batch in seen[0][1] for i in batch]
    assert sorted(order) == list(range(64)) and (order == list(range(64))) == (not want)
    assert json.loads((out / "config.json").read_text())["config"]["shuffle"] is want  # recorded


def test_shuffle_must_be_a_bool():
    with pytest.raises(ConfigError, match="--shuffle: must be true or false"):
        BenchConfig.from_dict({"shuffle": "no"})
