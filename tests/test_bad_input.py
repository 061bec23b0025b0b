"""Bad input, the rest of it (issue 21): every value a user can pass is checked by the schema before
anything is loaded or written, and refused with exit status 2 naming the key; data files and packed
manifests are checked before they are trusted.

Every CLI case here runs in-process with the data loader replaced by a failure, so a refusal that
came only after the data were loaded fails the test."""

import gzip
import json
import os
import struct
import sys

import pytest
import torch

from pmptrain.bench import cli, lm, schema, sweep
from pmptrain.bench.config import BenchConfig

BASE = ["--mnist1d-samples", "200", "--epochs", "1", "--seeds", "1", "--optimizers", "sgd",
        "--no-tensorboard"]


@pytest.fixture(autouse=True)
def _no_loading(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))

    def loaded(*a, **k):
        raise AssertionError("the data were loaded before the refusal")

    monkeypatch.setattr(sweep, "load_data", loaded)
    monkeypatch.setattr(lm, "load_corpus", loaded)


def _bench(tmp_path, capsys, *args, base=BASE):
    out = tmp_path / "out"
    code = cli.main(["bench", *base, "--out", str(out), *args])
    err = capsys.readouterr().err
    return code, err, out


def _train(tmp_path, capsys, yaml_text, *args):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("mnist1d_samples: 200\nepochs: 1\nseeds: 1\noptimizers: [sgd]\ntensorboard: false\n"
                   + yaml_text + "\n")
    out = tmp_path / "out"
    code = cli.main(["train", "--config", str(cfg), "--out", str(out), *args])
    return code, capsys.readouterr().err, out


# ------------------------------------------------------------------ findings 1, 2, 7, 8: bounds


@pytest.mark.parametrize("args, names", [
    (["--seeds", "99999999999999999999"], "--seeds: must be"),               # 1: was OverflowError
    (["--seeds", "100000000"], "--seeds: must be"),                          # 1: was MemoryError / hang
    (["--seeds", "0,99999999999999999999"], "--seeds: must be"),
    (["--mnist1d-samples", "1000000000"], "--mnist1d-samples: must be"),     # 2: ran forever
    (["--threads", "100000"], "--threads: must be"),                          # 7: accepted
    (["--lr", "1e308"], "--lr: must be"),                                    # 8: torch overflow, exit 1
    (["--lr", "sgd=1e300"], "--lr: must be"),
    (["--opt-arg", "sgd.lr=1e308"], "--opt-arg sgd.lr: must be"),
    (["--opt-arg", "sgd.momentum=99999999999999999999999"], "--opt-arg sgd.momentum: must be"),
    (["--epochs", "99999999999999999999"], "--epochs: must be"),
    (["--batch-size", "99999999999999999999"], "--batch-size: must be"),
    (["--model-args", "{widths: [40000, 40000]}"], "--model-args: model 'mlp' would have"),  # 8
    (["--model-args", "{widths: [99999999999999999999]}"], "--model-args"),
])
def test_out_of_range_values_are_refused_before_loading(tmp_path, capsys, args, names):
    code, err, out = _bench(tmp_path, capsys, *args)
    assert code == 2 and names in err, err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("yaml_text, names", [
    ("seeds: 99999999999999999999", "--seeds: must be"),
    ("seeds: [0, 99999999999999999999]", "--seeds: must be"),
    ("lr: 99999999999999999999999", "--lr: must be"),                        # 8: OverflowError after load
    ("lr: 1.0e+308", "--lr: must be"),
    ("lr: 1" + "0" * 400, "--lr: must be"),                                  # int too large for a float
    ("target_acc: 1" + "0" * 400, "--target-acc: must be"),
    ("mnist1d_samples: 1000000000", "--mnist1d-samples: must be"),
    ("threads: 100000", "--threads: must be"),
    ("optimizer_args: {sgd: {momentum: 1" + "0" * 400 + "}}", "--opt-arg sgd.momentum: must be"),
    ("model_args: {widths: [40000, 40000]}", "--model-args: model 'mlp' would have"),
    ("data_dir: " + "a" * 5000, "--data-dir: must be"),
], ids=lambda v: v[:40] if isinstance(v, str) else str(v))
def test_out_of_range_config_values_are_refused_before_loading(tmp_path, capsys, yaml_text, names):
    code, err, out = _train(tmp_path, capsys, yaml_text)
    assert code == 2 and names in err, err
    assert "Traceback" not in err and not out.exists()


def test_the_language_model_bench_has_the_same_bounds(tmp_path, capsys):
    for args, names in [(["--seeds", "99999999999999999999"], "--seeds: must be"),
                        (["--threads", "100000"], "--threads: must be"),
                        (["--lr", "1e308"], "--lr: must be"),
                        (["--steps", "99999999999999999999"], "--steps: must be"),
                        (["--seq-len", "99999999999"], "--seq-len: must be"),
                        (["--model-args", "{n_embd: 65536, n_layer: 64}"], "--model-args: model 'gpt' would have")]:
        code, err, out = _bench(tmp_path, capsys, "--model", "gpt", *args, base=["--no-tensorboard"])
        assert code == 2 and names in err, (args, err)
        assert not out.exists()


def test_bounds_admit_the_documented_settings():
    cfg = BenchConfig.from_dict({"seeds": 1000, "threads": 1, "mnist1d_samples": 100_000, "lr": 1e4,
                                 "model": "ref_mlp", "dataset": "mnist"})
    assert len(cfg.seeds) == 1000 and cfg.lr == 1e4
    assert BenchConfig.from_dict({"seeds": [0, 2**32 - 1]}).seeds == [0, 2**32 - 1]
    lm.LMConfig.from_dict({"lr": {"emsa-costate": 1e4}, "steps": 10})


# ------------------------------------------------------------------ finding 3: the output directory


def test_an_output_directory_that_cannot_be_created_is_refused_before_loading(tmp_path, capsys):
    loop = tmp_path / "loop"
    os.symlink(loop, loop)  # a symlink to itself
    for out in (loop, loop / "sub", tmp_path / "file" / "sub", "/proc/pmptrain-x/y", "/proc/pmptrain-x"):
        (tmp_path / "file").write_text("x")
        code = cli.main(["bench", *BASE, "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and "--out:" in err and "Traceback" not in err, (out, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "loop"]  # nothing left behind


@pytest.mark.parametrize("task", ["finetune", "robust"])
def test_the_other_benches_refuse_an_output_directory_that_cannot_be_created(tmp_path, capsys, task):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file" / "sub", "/proc/pmptrain-x/y"):
        code = cli.main(["bench", "--task", task, "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and "--out:" in err and "Traceback" not in err, (out, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_the_output_check_leaves_nothing_behind_and_the_directory_can_then_be_made(tmp_path):
    out = tmp_path / "a" / "b" / "c"
    cli._check_out_dir(out)
    assert not (tmp_path / "a").exists()
    (tmp_path / "d").mkdir()
    cli._check_out_dir(tmp_path / "d")
    assert list((tmp_path / "d").iterdir()) == []


# ------------------------------------------------------------------ finding 4: model_args types


@pytest.mark.parametrize("model_args, names", [
    ('{batchnorm: "no"}', "--model-args: batchnorm: must be true or false"),
    ('{batchnorm: "false"}', "--model-args: batchnorm: must be true or false"),
    ('{bias: "false"}', "--model-args: bias: must be true or false"),
    ("{bias: 0}", "--model-args: bias: must be true or false"),
    ("{dropout: true}", "--model-args: dropout: must be a finite number"),
    ('{widths: "256"}', "--model-args: widths: must be a list of integers"),
    ("{widths: [256, 1.5]}", "--model-args: widths: must be a list of integers"),
    ("{widths: [256, true]}", "--model-args: widths: must be a list of integers"),
])
def test_model_args_values_are_checked_against_the_builders_types(tmp_path, capsys, model_args, names):
    code, err, out = _bench(tmp_path, capsys, "--model-args", model_args)
    assert code == 2 and names in err, err
    assert not out.exists()


def test_model_args_of_the_right_types_pass():
    for args in ({"batchnorm": False, "bias": True, "dropout": 0.1, "widths": [32, 16]}, {"widths": []},
                 {"widths": 64}):
        assert BenchConfig.from_dict({"model_args": args}).model_args == args
    BenchConfig.from_dict({"model": "ref_mlp", "model_args": {"bn_init": "reference", "bn_eps": 1e-4}})
    BenchConfig.from_dict({"model": "resnet", "dataset": "cifar10", "model_args": {"width": 16, "bias": False}})


# ------------------------------------------------------------------ finding 10: duplicates, names not in the run


@pytest.mark.parametrize("args, names", [
    (["--lr", "adam=0.1"], "--lr: adam is not benchmarked"),
    (["--lr", "sgd=1,sgd=2"], "--lr: sgd given twice"),
    (["--keep", "first,first"], "--keep: names repeated"),
    (["--opt-arg", "sgd.lr=1", "--opt-arg", "sgd.lr=2"], "--opt-arg sgd.lr: given twice"),
    (["--opt-arg", "adam.lr=1"], "--opt-arg adam: adam is not benchmarked"),
])
def test_duplicates_and_names_not_in_the_run_are_refused(tmp_path, capsys, args, names):
    code, err, out = _bench(tmp_path, capsys, *args)
    assert code == 2 and names in err, err
    assert not out.exists()


def test_config_lr_for_an_optimizer_not_run_and_duplicate_spellings_are_refused(tmp_path, capsys):
    code, err, _ = _train(tmp_path, capsys, "lr: {adam: 0.1}")
    assert code == 2 and "--lr: adam is not benchmarked" in err
    code, err, _ = _train(tmp_path, capsys, "lr: {sgd: 0.1, SGD: 0.2}")
    assert code == 2 and "--lr: sgd given twice" in err


def test_a_presets_optimizer_args_for_optimizers_left_out_are_dropped_not_refused(capsys, tmp_path):
    # resnet-fmnist pins sgd's weight decay; running only emsa from it is a legitimate choice
    code = cli.main(["bench", "--preset", "resnet-fmnist", "--optimizers", "emsa", "--dry-run",
                     "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["optimizer_args"] == {}


# ------------------------------------------------------------------ the validate-only path


def test_dry_run_validates_prints_the_configuration_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["bench", *BASE, "--dry-run", "--out", str(out)]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["optimizers"] == ["sgd"] and cfg["seeds"] == [0] and not out.exists()
    assert cli.main(["bench", *BASE, "--dry-run", "--seeds", "0,0"]) == 2
    assert cli.main(["bench", "--model", "gpt", "--dry-run", "--steps", "5"]) == 0


# ------------------------------------------------------------------ finding 5: packed manifests


@pytest.mark.parametrize("field, value, match", [
    ("train_scale", "no", "train_scale"),       # was: a trainable scale
    ("train_scale", 1, "train_scale"),
    ("scale", "bogus", "scale"),                # was: accepted and written back on re-export
    ("scale", 5, "scale"),
    ("grid", {"values": [-1, 1], "name": 7}, "name"),
    ("grid", {"values": [-1, 1], "bits": "1"}, "bits"),
    ("grid", {"values": "ab"}, "values"),
    ("extra", 1, "extra"),
])
def test_manifest_specs_are_checked(tmp_path, field, value, match):
    from tests.test_export import _rewrite_manifest, make_mlp, prepare
    from pmptrain import export_packed, load_packed
    from pmptrain.export import PackedFileError

    model = prepare(make_mlp, 1, torch.randn(4, 12), levels="binary", keep=None, scale="tensor")
    export_packed(model, tmp_path / "m.pmp")
    bad = tmp_path / "bad.pmp"
    bad.write_bytes(_rewrite_manifest((tmp_path / "m.pmp").read_bytes(),
                                      lambda m: [e["spec"].__setitem__(field, value) for e in m["discrete"]]))
    with pytest.raises(PackedFileError, match=match):
        load_packed(bad, make_mlp())


def test_discrete_spec_from_dict_round_trips_and_refuses():
    from pmptrain.discrete import binary_grid
    from pmptrain.quant import DiscreteSpec

    for spec in (DiscreteSpec(binary_grid()), DiscreteSpec(binary_grid(), "channel", True),
                 DiscreteSpec(binary_grid(), "tensor", False)):
        assert DiscreteSpec.from_dict(spec.to_dict()) == spec
    for d in ({"grid": binary_grid().to_dict(), "train_scale": "no"},
              {"grid": binary_grid().to_dict(), "scale": "bogus"}, [1], {"scale": None}):
        with pytest.raises((ValueError, TypeError)):
            DiscreteSpec.from_dict(d)


# ------------------------------------------------------------------ finding 6: a gzip bomb


def _idx_header(dims, code=0x08):
    return bytes([0, 0, code, len(dims)]) + struct.pack(">" + "I" * len(dims), *dims)


def test_a_gzip_bomb_is_refused_from_its_header_without_inflating_it(tmp_path, monkeypatch):
    from pmptrain.bench.data import CorruptDataError, read_idx

    # 1 GiB of zeros after a header that declares 10 images: refused after reading ~the header's size
    path = tmp_path / "train-images-idx3-ubyte.gz"
    zeros = gzip.compress(bytes(64 << 20), 9)  # 64 MiB in ~65 kB; gzip members concatenate
    path.write_bytes(gzip.compress(_idx_header((10, 28, 28))) + zeros * 16)
    assert path.stat().st_size < 2 << 20
    inflated = []
    orig_read = gzip.GzipFile.read

    def counting_read(self, n=-1):
        out = orig_read(self, n)
        inflated.append(len(out))
        assert n is not None and n >= 0, "the whole stream was asked for"
        return out

    import tracemalloc

    monkeypatch.setattr(gzip.GzipFile, "read", counting_read)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptDataError, match="trailing bytes"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, peak  # inflating it in full took 1 GiB
    assert sum(inflated) <= 10 * 28 * 28 + 16 + (1 << 20)
    # a header that itself declares a huge payload is refused before any payload is read
    huge = tmp_path / "huge.gz"
    with gzip.open(huge, "wb") as f:
        f.write(_idx_header((1 << 20, 1 << 10, 1 << 10)))
    inflated.clear()
    with pytest.raises(CorruptDataError, match="larger than"):
        read_idx(huge)
    assert sum(inflated) <= 64


def test_gzip_and_raw_idx_files_still_read(tmp_path):
    import numpy as np

    from pmptrain.bench.data import read_idx

    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = _idx_header(arr.shape) + arr.tobytes()
    (tmp_path / "a").write_bytes(raw)
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    assert (read_idx(tmp_path / "a") == arr).all() and (read_idx(tmp_path / "a.gz") == arr).all()


# ------------------------------------------------------------------ finding 10: a partial --data-dir


def test_a_partial_data_dir_is_refused_not_completed_from_elsewhere(tmp_path, monkeypatch):
    from pmptrain.bench.data import DataError, catalog, locate

    full = tmp_path / "system"
    full.mkdir()
    for base in catalog.IDX_FILES:
        (full / base).write_bytes(b"x")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / catalog.IDX_FILES[0]).write_bytes(b"x")  # the user's images, no labels
    monkeypatch.setenv("PMPTRAIN_DATA", str(full))
    with pytest.raises(DataError, match=r"--data-dir.*lacks.*" + catalog.IDX_FILES[1].replace(".", r"\.")):
        locate("mnist", mine, False, None)
    files, d = locate("mnist", tmp_path / "empty", False, None)  # an empty --data-dir: the next source
    assert d == full / "mnist" or d == full


# ------------------------------------------------------------------ finding 9: dtype changed after building


@pytest.mark.parametrize("make", ["EMSA", "MSA"])
def test_model_double_after_the_optimizer_was_built_steps_in_float64(make):
    import pmptrain

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = getattr(pmptrain, make)(model)
    model.double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        assert not opt.last_step["skipped"]
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------ finding 11: the skip reason


def test_a_nan_loss_is_named_as_such():
    import pmptrain

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = pmptrain.EMSA(model)
    x = torch.randn(5, 3)

    def closure():
        opt.zero_grad()
        loss = model(x).sum() * float("nan")
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    opt.step(closure)
    assert opt.last_step["skip_reason"] == "non-finite loss"
    # without a closure the shell never sees the loss: the reason says what it knows
    closure()
    opt.step()
    reason = opt.last_step["skip_reason"]
    assert reason.startswith("non-finite gradient") and "loss" in reason and "closure" in reason
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ------------------------------------------------------------------ finding 12: baselines out of the box


def test_binaryconnect_and_twn_defaults_are_the_registrys():
    import inspect

    from pmptrain import TWN, BinaryConnect
    from pmptrain.bench.registry import get_spec

    for cls, name in ((BinaryConnect, "binaryconnect"), (TWN, "twn")):
        defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()}
        spec = get_spec(name)
        assert defaults["latent_scale"] == 0.05
        for k, v in spec.defaults.items():  # the registry repeats no default of its own
            assert defaults[k] == v, (name, k)
        assert spec.options()["latent_scale"] == 0.05


def test_binaryconnect_with_its_defaults_trains():
    import pmptrain

    torch.manual_seed(0)
    x = torch.randn(256, 20)
    y = (x[:, :10].sum(1) > x[:, 10:].sum(1)).long()  # a linearly separable two-class problem
    model = torch.nn.Sequential(torch.nn.Linear(20, 64, bias=False), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 2, bias=False), torch.nn.BatchNorm1d(2))
    pmptrain.discretize_(model, "binary", keep=None)
    opt = pmptrain.BinaryConnect(model)
    codes0 = [d.param.detach().clone() for d in pmptrain.discrete_parameters(model)]
    losses = []
    for _ in range(200):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    flipped = sum(int((d.param != c).sum()) for d, c in zip(pmptrain.discrete_parameters(model), codes0))
    total = sum(c.numel() for c in codes0)
    assert flipped >= 0.05 * total, (flipped, total)  # with latent_scale 1.0: 0 of 1408 in 200 steps
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10, losses[::20]
    assert all(set(d.param.unique().tolist()) <= {-1.0, 1.0} for d in pmptrain.discrete_parameters(model))


def test_binaryconnect_steps_match_a_float64_reference_adam_on_the_latents():
    import pmptrain

    torch.manual_seed(3)
    lin = torch.nn.Linear(6, 5, bias=False).double()
    model = pmptrain.discretize_(torch.nn.Sequential(lin), "binary", keep=None)
    opt = pmptrain.BinaryConnect(model, lr=0.05, weight_decay=0.1)
    z = (0.05 * lin.weight.detach()).clamp(-1, 1)
    m, v = torch.zeros_like(z), torch.zeros_like(z)
    b1, b2, lr, eps = 0.9, 0.999, 0.05, 1e-8
    x = torch.randn(8, 6, dtype=torch.float64)
    for t in range(1, 9):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        g = lin.weight.grad.clone()
        if t == 4:  # a non-finite step in the middle: skipped, nothing changes, the buffers stay right
            lin.weight.grad[0, 0] = float("nan")
            before = lin.weight.detach().clone()
            opt.step()
            assert opt.last_step["skipped"] and torch.equal(before, lin.weight)
            lin.weight.grad.copy_(g)
        opt.step()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        z = z * (1 - lr * 0.1) - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        z = z.clamp(-1, 1)
        st = opt.state_of(lin.weight)
        assert st.step == t and torch.allclose(st.latent, z, atol=1e-12, rtol=1e-10)
        assert torch.equal(lin.weight.detach(), torch.where(z >= 0, 1.0, -1.0).double())


def test_sign_nonzero_conventions():
    from pmptrain.discrete import sign_nonzero

    x = torch.tensor([float("nan"), 0.0, -0.0, float("-inf"), float("inf"), -2.0, 3.0, 1e-45, -1e-45])
    got = sign_nonzero(x)
    assert torch.isnan(got[0]) and got[1:].tolist() == [1, 1, -1, 1, -1, 1, 1, -1]
    out = torch.empty_like(x)
    assert sign_nonzero(x, out=out) is out and torch.equal(out[1:], got[1:])


# ------------------------------------------------------------------ finding 13: DiscreteMSA's defaults


def test_discrete_msa_defaults_are_the_recommended_settings_and_the_paper_is_a_preset():
    import inspect

    import pmptrain
    from pmptrain import DiscreteMSA
    from pmptrain.bench import cli as bench_cli
    from pmptrain.bench.registry import get_spec

    sig = {k: p.default for k, p in inspect.signature(DiscreteMSA).parameters.items()}
    assert sig["rho"] == 0.95 and sig["decay_gamma"] == 0.95 and sig["decay"] == 0.999
    # the registry's binary-msa is the class's defaults; the previous setting stays reachable
    assert get_spec("binary-msa").defaults == {"rho": 0.95}
    assert get_spec("binary-msa-paper").defaults == {"rho": 0.5, "decay": 0.999, "gamma": 1.0}
    for name, preset in bench_cli.PRESETS.items():
        if name.startswith("lihao-"):  # the published protocols pin every value
            args = preset["optimizer_args"][preset["optimizers"][0]]
            assert args["rho"] == 0.5 and args["decay"] == 0.999 and args["gamma"] in (0.95, 0.98)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False))
    pmptrain.discretize_(model, "binary", keep=None)
    opt = DiscreteMSA.paper(model)
    g = opt.param_groups[0]
    assert (g["rho"], g["decay"], g["decay_gamma"]) == (0.5, 0.999, 0.95)
    assert DiscreteMSA.PAPER == {"rho": 0.5, "decay": 0.999, "decay_gamma": 0.95, "acc_init": 1e-6,
                                 "acc_init_mode": "uniform"}
    assert DiscreteMSA.paper(model, decay_gamma=0.98).param_groups[0]["decay_gamma"] == 0.98
    d = DiscreteMSA(model).param_groups[0]
    assert (d["rho"], d["decay_gamma"]) == (0.95, 0.95)


@pytest.mark.parametrize("make", ["DiscreteMSA", "BinaryConnect"])
def test_discrete_optimizers_follow_model_double_after_they_were_built(make):
    import pmptrain

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16, bias=False), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 3, bias=False))
    pmptrain.discretize_(model, "binary", keep=None)
    opt = getattr(pmptrain, make)(model, **({"rho": 0.5} if make == "DiscreteMSA" else {"lr": 0.05}))
    model.double()
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        assert not opt.last_step["skipped"]
    for d in pmptrain.discrete_parameters(model):
        assert d.param.dtype == torch.float64 and set(d.param.unique().tolist()) <= {-1.0, 1.0}


def test_run_bench_called_directly_checks_the_output_directory_before_loading(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(schema.ConfigError, match="--out"):
        sweep.run_bench(BenchConfig.from_dict({"optimizers": ["sgd"], "epochs": 1, "seeds": 1}),
                        tmp_path / "file" / "out")
    with pytest.raises(schema.ConfigError, match="--out"):
        lm.run_lm_bench(lm.LMConfig.from_dict({"steps": 1, "seeds": 1}), tmp_path / "file" / "out")


def test_the_benchmarks_minimal_binaryconnect_takes_the_same_steps_as_pmptrains():
    """benchmarks/binaryconnect_step.py compares like with like: same latents, codes and BN affines."""
    import pathlib

    import pmptrain

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    from binaryconnect_step import MinimalBinaryConnect

    def make():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16, bias=False), torch.nn.BatchNorm1d(16),
                                torch.nn.ReLU(), torch.nn.Linear(16, 3, bias=False), torch.nn.BatchNorm1d(3)).double()
        return pmptrain.discretize_(m, "binary", keep=None)

    a, b = make(), make()
    opt_a, opt_b = pmptrain.BinaryConnect(a), MinimalBinaryConnect(b)
    x, y = torch.randn(64, 12, dtype=torch.float64), torch.randint(0, 3, (64,))
    for _ in range(30):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    index = {id(p): i for i, p in enumerate(b.parameters())}
    params_a = list(a.parameters())
    for w, z in zip(opt_b.ws, opt_b.lat):
        assert torch.allclose(opt_a.state_of(params_a[index[id(w)]]).latent, z, atol=1e-10)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-10)
