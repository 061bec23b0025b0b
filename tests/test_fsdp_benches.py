"""The GPT and fine-tuning benches under ``torchrun --fsdp`` (2 gloo ranks on CPU).

Two ranks, each training on its half of every global batch with the GPT's blocks sharded by FSDP2,
must reproduce the one-process bench's training and validation losses within float32 rounding
(measured: at most 1e-7 relative on these tiny runs; asserted 2e-5), and only rank 0 logs and writes.
Distributed runs the benches cannot do are refused with messages naming the option.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dist_utils import run_distributed
from pmptrain.bench import cli

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
TINY_GPT = ["--model", "gpt", "--steps", "4", "--eval-every", "2", "--seeds", "1", "--batch-size", "4",
            "--seq-len", "16", "--max-bytes", "30000", "--model-args", "{n_layer: 1, n_embd: 16, n_head: 2}",
            "--threads", "1", "--no-tensorboard", "--optimizers", "adamw,emsa"]
REL = 2e-5  # float32: the ranks' reductions run in another order than one process's


def _torchrun(args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pmptrain", *args]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=300)  # ~15 s idle
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # torchrun and its workers
        p.communicate()
        pytest.fail("torchrun bench did not finish within 300 s")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _losses(run):
    return [(h["train_loss"], h["val_loss"]) for h in run["history"]]


def test_gpt_bench_under_torchrun_fsdp_reproduces_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(["bench", *TINY_GPT, "--out", str(one)]) == 0
    p = _torchrun(["bench", *TINY_GPT, "--fsdp", "--out", str(two)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("seed 0: final val loss") == 2 and p.stdout.count("results:") == 1, p.stdout  # rank 0 only
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert r2["world_size"] == 2 and r2["config"]["fsdp"] is True and r1["world_size"] == 1
    for a, b in zip(r1["runs"], r2["runs"]):
        assert a["optimizer"] == b["optimizer"]
        la, lb = _losses(a), _losses(b)
        assert len(la) == len(lb) == 3
        for (ta, va), (tb, vb) in zip(la, lb):
            assert vb == pytest.approx(va, rel=REL)
            assert (ta is None and tb is None) or tb == pytest.approx(ta, rel=REL)
        assert la[-1][1] < la[0][1]  # it trained


def _refusals(rank: int, world: int, out: str):
    from pmptrain.bench.lm import LMConfig, run_lm_bench

    msgs = []
    for kw in ({"fsdp": False, "batch_size": 4}, {"fsdp": True, "batch_size": 3}):
        cfg = LMConfig(steps=1, seq_len=16, max_bytes=30000, model_args={"n_layer": 1, "n_embd": 16, "n_head": 2},
                       optimizers=["adamw"], seeds=[0], tensorboard=False, **kw)
        try:
            run_lm_bench(cfg, Path(out) / f"r{rank}")
            msgs.append("accepted")
        except ValueError as e:
            msgs.append(str(e))
    return msgs


def test_gpt_bench_distributed_refusals(tmp_path):
    for msgs in run_distributed(_refusals, 2, args=(str(tmp_path),), timeout=120.0):
        assert "--fsdp" in msgs[0] and "DDP" in msgs[0], msgs
        assert "--batch-size" in msgs[1] and "2 ranks" in msgs[1], msgs
    assert not any(tmp_path.iterdir())  # refused before anything was written


# ---------------------------------------------------------------------------------- fine-tuning
TINY_FT = ["--seeds", "0", "--steps", "3", "--pretrain-steps", "3", "--n-embd", "16", "--n-head", "2",
           "--seq-len", "16", "--batch-size", "4", "--eval-every", "1", "--eval-batches", "1", "--rank", "2",
           "--max-bytes", "20000", "--threads", "1", "--no-tensorboard"]
# full-emsa: the transformer setting (rho_scale="costate") with the bench's clip at 1.0 — the costates are
# rescaled with the clipped gradient as in one process (the record of ‖∇J‖² follows FSDP2's reduce-scatter)
FT_METHODS = "full-adamw,full-emsa,lora-adamw,lora-emsa,parallel-emsa,parallel2-emsa,nonlinear-adamw,binary-dmsa"
FT_REL = 1e-4  # measured: ≤ 1.3e-7 for the control rows, 2.5e-6 for full-adamw (Adam's normalised step), 2.4e-7 for full-emsa


def test_finetune_bench_under_torchrun_fsdp_reproduces_one_process(tmp_path):
    from pmptrain.bench.finetune import _LICENSES

    tune = "licenses"
    if not _LICENSES.is_dir():
        tune = str(tmp_path / "tune.txt")
        Path(tune).write_text("Permission is hereby granted, free of charge, to any person. " * 400)
    common = ["bench", "--task", "finetune", "--cache-dir", str(tmp_path / "cache"), "--tune-corpus", tune,
              "--methods", FT_METHODS, *TINY_FT]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main([*common, "--out", str(one)]) == 0
    p = _torchrun([*common, "--fsdp", "--out", str(two)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("pretrained model: cached") == 1, p.stdout  # rank 0 logs; the cache was reused
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert r1["world_size"] == 1 and r2["world_size"] == 2 and r2["config"]["fsdp"] is True
    for a, b in zip(r1["runs"], r2["runs"]):
        m = a["method"]
        assert m == b["method"]
        for ha, hb in zip(a["history"], b["history"]):
            assert hb["val_loss"] == pytest.approx(ha["val_loss"], rel=FT_REL), m
            if "train_loss" in ha:
                assert hb["train_loss"] == pytest.approx(ha["train_loss"], rel=FT_REL), m
        assert b["old_val_loss"] == pytest.approx(a["old_val_loss"], rel=FT_REL), m
        for k in ("trainable_params", "adapter_bytes", "adapter_payload_bytes"):
            assert a[k] == b[k], (m, k)
        assert b["roundtrip_exact"] and b["frozen_base_untouched"] and b["skipped_steps"] == 0, m
        # per rank: half the parameters, gradients and optimizer state (the shards), half the rows
        assert b["train_memory_mb"] < 0.75 * a["train_memory_mb"], (m, a["train_memory_mb"], b["train_memory_mb"])


def test_finetune_bench_distributed_refusals(tmp_path):
    p = _torchrun(["bench", "--task", "finetune", *TINY_FT, "--batch-size", "3", "--out", str(tmp_path / "o")],
                  tmp_path)
    # (torchrun exits 1 when a worker fails; the workers exit 2, and only rank 0 prints)
    assert p.returncode != 0 and p.stderr.count("error: --fsdp: under torchrun") == 1, p.stderr[-2000:]
    assert "exitcode  : 2" in p.stderr
    assert not (tmp_path / "o").exists()
