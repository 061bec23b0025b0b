"""``pmptrain bench --clock {wall,cpu}`` and ``--eval-every`` on the classifier bench (issue 17,
"per second"): the option's schema and refusal, that the recorded times come from the chosen clock
(process CPU time does not count a sleeping step), and the finer time to every final accuracy."""

import json
import time

import pytest
import torch

from pmptrain.bench import cli, clock, lm, runner
from pmptrain.bench.config import BenchConfig
from pmptrain.bench.losses import LOSSES
from pmptrain.bench.report import format_table, time_to_final_acc
from pmptrain.bench.schema import ConfigError

TINY = ["--mnist1d-samples", "200", "--batch-size", "32", "--epochs", "2", "--seeds", "1", "--no-tensorboard",
        "--model-args", "{widths: [16]}"]


def test_clock_schema_and_the_thread_rule():
    assert BenchConfig().clock == "wall" and lm.LMConfig().clock == "wall"
    assert BenchConfig(clock="cpu", threads=1).validate().clock == "cpu"
    for make in (BenchConfig, lm.LMConfig):
        for threads in (None, 2):
            with pytest.raises(ConfigError, match=r"--clock cpu.*--threads 1"):
                make(clock="cpu", threads=threads).validate()
        with pytest.raises(ConfigError, match="clock"):
            make(clock="gpu").validate()
    with pytest.raises(ConfigError, match="--eval-every"):
        BenchConfig(eval_every=0).validate()
    assert clock.clock_fn("cpu") is time.process_time and clock.clock_fn("wall") is time.perf_counter


def test_cli_refuses_cpu_clock_without_one_thread(tmp_path, capsys):
    assert cli.main(["bench", *TINY, "--clock", "cpu", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "--clock cpu" in err and "--threads 1" in err and not (tmp_path / "a").exists()
    assert cli.main(["bench", "--model", "gpt", "--clock", "cpu", "--threads", "2", "--out", str(tmp_path / "b")]) == 2
    assert "--clock cpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--clock", "sundial"])
    assert cli.main(["bench", *TINY, "--clock", "cpu", "--threads", "1", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["clock"] == "cpu"


SLEEP = 0.25  # s per step: far above a step's own CPU time on any machine (10–20 ms measured under load)


class _SleepySGD(torch.optim.SGD):
    """SGD whose step also sleeps: wall-clock time the process does not spend on a CPU."""

    def step(self, closure=None):
        time.sleep(SLEEP)
        return super().step(closure)


@pytest.mark.parametrize("which", ["wall", "cpu"])
def test_recorded_step_times_are_the_chosen_clocks(which):
    """The same steps, each sleeping ``SLEEP``: on the wall clock every step takes at least that, in
    process CPU time (a sleeping process spends none) each takes less than half of it — the tiny
    MLP's step is a few ms of CPU (10–21 ms measured on a loaded machine under MKL_CBWR=COMPATIBLE,
    which is why the sleep is not 30 ms)."""
    cfg = BenchConfig(mnist1d_samples=200, batch_size=32, epochs=1, seeds=[0], tensorboard=False,
                      model_args={"widths": [16]}, clock=which, threads=1).validate()
    data = runner.load_data(cfg)
    model, wrapped, _ = runner.build_run(cfg, data, runner.get_spec("sgd"), {}, 0)
    opt = _SleepySGD(model.parameters(), lr=0.01)
    st = runner._train_epoch(cfg, data, opt, wrapped, LOSSES[cfg.loss], 0, 0, 0, 1, "t", max_steps=4)
    assert len(st.step_times) == 4
    if which == "wall":
        assert min(st.step_times) >= SLEEP
    else:
        assert max(st.step_times) < SLEEP / 2


def test_process_clock_counts_this_process_only():
    """The ``cpu`` clock advances with this process's own work and not with sleeping."""
    f = clock.clock_fn("cpu")
    t0 = f()
    time.sleep(0.05)
    slept = f() - t0
    t0 = f()
    x = torch.randn(256, 256, dtype=torch.float64)
    while f() - t0 < 0.05:
        x = (x @ x).tanh_()
    assert slept < 0.02 and f() - t0 >= 0.05


def test_bench_records_the_clock_and_probes_between_epochs(tmp_path):
    """A whole CLI bench on the cpu clock: results.json names the clock, the tables' headers say
    ``(cpu)``/``CPU``, and --eval-every 2 adds the test accuracy after every 2nd step (not at the
    epochs' ends, which are evaluated anyway), with the run's step count and its training seconds."""
    out = tmp_path / "b"
    assert cli.main(["bench", *TINY, "--optimizers", "sgd,adam", "--clock", "cpu", "--threads", "1",
                     "--eval-every", "2", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["clock"] == "cpu" and res["meta"]["config"]["clock"] == "cpu"
    text = (out / "results.txt").read_text()
    assert "s→tgt (cpu)" in text and "step ms (cpu)" in text and "CPU seconds to the final acc of" in text
    assert "time.process_time" in text
    run = json.loads((out / "runs" / "sgd" / "seed0" / "run.json").read_text())
    steps_per_epoch = len(run["history"][0]["step_times"])  # 160 training examples / 32 = 5
    assert steps_per_epoch == 5
    probes = [p for h in run["history"] for p in h["probes"]]
    assert [p["step"] for p in probes] == [2, 4, 6, 8]  # 10 is epoch 2's end: evaluated as an epoch
    times = [t for h in run["history"] for t in h["step_times"]]
    for p in probes:
        assert p["seconds"] == pytest.approx(sum(times[:p["step"]]), rel=1e-12)
        assert 0 <= p["test_acc"] <= 1
    curves = next(r["curves"] for r in res["runs"] if r["optimizer"] == "sgd")
    assert curves["probe_step"] == [2, 4, 6, 8] and len(curves["probe_acc"]) == 4
    assert "probes" not in json.loads((tmp_path / "b" / "config.json").read_text())


def test_time_to_final_acc_uses_the_evaluations_between_epochs():
    rows = [{"optimizer": "adam", "final_acc_median": 0.80}, {"optimizer": "emsa", "final_acc_median": 0.85}]
    runs = [{"optimizer": "adam", "selected": True,
             "curves": {"test_acc": [0.70, 0.80], "seconds": [10.0, 20.0], "epoch": [1, 2]}},
            {"optimizer": "emsa", "selected": True,
             "curves": {"test_acc": [0.79, 0.85], "seconds": [30.0, 60.0], "epoch": [1, 2],
                        "probe_step": [5, 15], "probe_seconds": [15.0, 45.0], "probe_acc": [0.60, 0.82]}}]
    ttf = time_to_final_acc(rows, runs)
    assert ttf["adam"]["seconds"]["emsa"] == 45.0  # the probe at 45 s, before epoch 2's end (60 s)
    assert ttf["emsa"]["seconds"]["emsa"] == 60.0 and ttf["emsa"]["seconds"]["adam"] is None
    assert ttf["adam"]["seconds"]["adam"] == 20.0


def test_wall_clock_tables_keep_their_headers():
    res = {"rows": [], "meta": {"config": {"dataset": "d", "model": "m", "epochs": 1, "batch_size": 1, "seeds": [0]}},
           "target_acc": 0.5, "sgd_reference": {"median_step_ms": 1.0, "source": "x"}}
    text = format_table(res)
    assert "s→tgt " in text and "(cpu)" not in text and "wall-clock (time.perf_counter)" in text
