"""The benchmark scripts of issue 9 measure what they say: ratios are medians over the same run's
reference, the profile's phases add up to the profiled iteration, the markers cost nothing without
a profiler, and the scaling sweep builds the models it names. (Timings themselves are never
asserted.)"""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import profile_step  # noqa: E402
import step_scaling  # noqa: E402
import step_time  # noqa: E402


def test_step_time_ratios_are_medians_over_the_reference(tmp_path):
    out = tmp_path / "t.json"
    step_time.main(["--models", "mlp", "--optimizers", "emsa", "--rounds", "2", "--steps", "2", "--warmup", "1",
                    "--threads", "1", "--json", str(out)])
    res = json.loads(out.read_text())["models"]["mlp"]
    t = res["time"]
    assert set(t) == {"sgd", "emsa"} and t["sgd"]["ratio"] == 1.0
    assert t["emsa"]["samples"] == 4
    assert t["emsa"]["ratio"] == pytest.approx(t["emsa"]["median_ms"] / t["sgd"]["median_ms"])
    assert t["emsa"]["mean_ratio"] == pytest.approx(t["emsa"]["mean_ms"] / t["sgd"]["mean_ms"])


def test_step_time_memory_child_reports_a_number(tmp_path):
    mem = step_time.memory_table("mlp", ["sgd"], 16, 1, torch.device("cpu"), 1)
    assert mem["sgd"]["ratio"] == pytest.approx(1.0) and mem["sgd"]["peak_mb"] >= 0.0


def test_step_time_refuses_cuda_without_a_device(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit) as e:
        step_time.main(["--models", "mlp", "--device", "cuda"])
    assert e.value.code == 2 and "no CUDA device" in capsys.readouterr().err


def test_every_benchmark_model_and_optimizer_builds_and_steps():
    for model_name in ("mlp", "cnn", "gpt", "binary-mlp-bn"):
        spec = step_time.MODELS[model_name]
        for name in spec.optimizers:
            _, model, opt, batches = step_time.setup(model_name, name, 4, torch.device("cpu"))
            before = [p.detach().clone() for p in model.parameters()]
            step_time.iteration(spec, model, opt, batches)
            assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), (model_name, name)


def test_profile_phases_add_up_to_the_iteration():
    prof = profile_step.run_profiled("mlp", "emsa", 16, 2, 1, torch.device("cpu"))
    phases = profile_step.phase_times(prof, 2)
    assert sum(phases.values()) == pytest.approx(profile_step.iteration_ms(prof, 2), rel=1e-6)
    for name in ("iter::forward", "iter::backward", "pmptrain::capture", "pmptrain::solve", "pmptrain::factorise"):
        assert phases.get(name, 0.0) > 0.0, name
    sgd = profile_step.profile_one("mlp", "sgd", 16, 2, 1, torch.device("cpu"))
    assert all(v == 0.0 for k, v in sgd.items() if k.startswith("pmptrain::"))


def test_phase_markers_are_inert_without_a_profiler(monkeypatch):
    from contextlib import nullcontext

    import pmptrain._profile as prof
    calls = []
    monkeypatch.setattr(torch.profiler, "record_function", lambda name: calls.append(name) or nullcontext())
    with prof.phase("solve"):
        pass
    assert calls == []
    with torch.profiler.profile():
        with prof.phase("solve"):
            pass
    assert calls == ["pmptrain::solve"]


def test_scaling_points_build_the_named_models():
    name, spec, batch, names = step_scaling.point_spec("width", 512, 1)
    model = spec.build()
    assert [m.out_features for m in model if isinstance(m, torch.nn.Linear)] == [512, 512, 10] and batch == 128
    name, spec, batch, names = step_scaling.point_spec("seq", 64, 1)
    x, _ = spec.batch(batch, torch.Generator().manual_seed(0))
    assert x.shape == (16, 64) and names == ["adamw", "emsa-costate"]
    assert spec.build()(x).shape == (16, 64, 256)


def test_step_time_cpu_clock_and_the_compiled_suffix(tmp_path, capsys):
    out = tmp_path / "t.json"
    step_time.main(["--models", "mlp", "--optimizers", "emsa-careful", "--rounds", "1", "--steps", "2",
                    "--warmup", "1", "--threads", "1", "--clock", "cpu", "--json", str(out)])
    t = json.loads(out.read_text())["models"]["mlp"]["time"]
    assert set(t) == {"sgd", "emsa-careful"} and t["emsa-careful"]["median_ms"] > 0.0
    import argparse
    ap = argparse.ArgumentParser()
    assert step_time.resolve_names(ap, "mlp", "emsa:compiled")[1] == ["sgd", "emsa:compiled"]
    with pytest.raises(SystemExit):
        step_time.resolve_names(ap, "mlp", "nope:compiled")
    assert "unknown optimizer 'nope:compiled'" in capsys.readouterr().err
    assert step_time.with_compiled(["sgd", "emsa", "emsa:compiled"]) == ["sgd", "emsa", "emsa:compiled", "sgd:compiled"]


def test_profile_counts_operations_and_flops_per_step():
    sgd = profile_step.profile_one("mlp", "sgd", 16, 2, 1, torch.device("cpu"))
    emsa = profile_step.profile_one("mlp", "emsa", 16, 2, 1, torch.device("cpu"))
    for r in (sgd, emsa):
        assert r["count::ops"] > r["count::step_ops"] > 0
    # forward + backward of 784-256-256-10 at batch 16: 2·16·(784·256 + 256·256 + 256·10)·(1 + 2) flops,
    # less the first layer's input gradient (not needed)
    fwd = 2 * 16 * (784 * 256 + 256 * 256 + 256 * 10) / 1e9
    assert sgd["count::gflop"] == pytest.approx(3 * fwd - 2 * 16 * 784 * 256 / 1e9, rel=0.05)
    assert sgd.get("count::step_gflop", 0.0) == 0.0 and emsa["count::step_gflop"] > 0.0


def test_gain_ratio_reads_the_bench_logs(tmp_path, capsys):
    """benchmarks/gain_ratio.py divides each step's logged pmp/hamiltonian_gain by the same step's
    train/loss; a run without PMP scalars (a baseline) is left out."""
    from torch.utils.tensorboard import SummaryWriter

    import gain_ratio

    run = tmp_path / "tensorboard" / "emsa" / "seed0"
    w = SummaryWriter(str(run))
    for step, (loss, gain) in enumerate([(2.0, 1.0), (1.0, 1.5), (0.5, 0.1)]):
        w.add_scalar("train/loss", loss, step)
        w.add_scalar("pmp/hamiltonian_gain", gain, step)
    w.close()
    base = SummaryWriter(str(tmp_path / "tensorboard" / "sgd" / "seed0"))
    base.add_scalar("train/loss", 1.0, 0)
    base.close()
    assert sorted(gain_ratio.ratios(run)) == pytest.approx([0.2, 0.5, 1.5])
    gain_ratio.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "emsa/seed0" in out and "sgd/seed0" not in out
    assert out.splitlines()[1].split()[1:] == ["3", "0.50", "0.50", "1.50", "1"]
