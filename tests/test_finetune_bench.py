"""``pmptrain bench --task finetune`` at tiny sizes (seconds): every row runs, the files are written,
the pretrained model is cached with its checksum and reused, round trips are exact, the frozen base is
untouched, bad options exit 2."""

import json

import pytest

from pmptrain.bench.cli import main
from pmptrain.bench.finetune import METHODS, _LICENSES

TINY = ["--seeds", "0", "--steps", "3", "--pretrain-steps", "3", "--n-embd", "16", "--n-head", "2",
        "--seq-len", "16", "--batch-size", "2", "--eval-every", "1", "--eval-batches", "1", "--rank", "2",
        "--max-bytes", "20000", "--threads", "1", "--no-tensorboard"]


@pytest.fixture
def tune_file(tmp_path):
    if _LICENSES.is_dir():
        return "licenses"
    p = tmp_path / "tune.txt"  # a machine without Debian's common-licenses: any text file
    p.write_text("Permission is hereby granted, free of charge, to any person. " * 400)
    return str(p)


def test_finetune_bench_runs_every_row_and_caches_the_pretrained_model(tmp_path, tune_file, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["bench", "--task", "finetune", "--out", str(out), "--cache-dir", str(cache), "--tune-corpus", tune_file,
            "--methods", ",".join(METHODS), *TINY]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in res["summary"]["rows"]}
    assert list(rows) == list(METHODS)
    for r in rows.values():
        assert r["roundtrip_exact"] and r["frozen_base_untouched"], r["method"]
        assert r["activation_mb"] > 0 and r["adapter_bytes"] > 0
    assert rows["parallel-adamw"]["activation_mb"] < rows["lora-adamw"]["activation_mb"]
    # codes at 1/8 of LoRA's float32 bytes, plus the scales s_A, s_B (4 bytes each) of each control
    for kind in ("binary", "ternary"):
        assert rows[f"{kind}-dmsa"]["adapter_payload_bytes"] <= rows["lora-adamw"]["adapter_payload_bytes"] / 8
    assert rows["lora-adamw"]["trainable_params"] < rows["full-adamw"]["trainable_params"]
    for f in ("results.txt", "results.csv", "config.json", "val_loss_vs_step.png", "loss_vs_memory.png"):
        assert (out / f).is_file(), f
    meta_files = list(cache.glob("*/meta.json"))
    assert len(meta_files) == 1
    meta = json.loads(meta_files[0].read_text())
    assert len(meta["checkpoint_sha256"]) == 64 and meta["command"]
    capsys.readouterr()
    again = lambda o: ["bench", "--task", "finetune", "--out", str(tmp_path / o), "--cache-dir", str(cache),
                       "--tune-corpus", tune_file, "--methods", "lora-adamw", *TINY]
    assert main(again("out2")) == 0
    assert "pretrained model: cached" in capsys.readouterr().out
    ckpt = meta_files[0].parent / "pretrained.pt"
    ckpt.write_bytes(ckpt.read_bytes() + b"x")  # a tampered checkpoint is retrained
    assert main(again("out3")) == 0
    assert "does not match its recorded checksum" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--methods", "dora"], ["--rank", "0"], ["--seeds", "a"], ["--task"]])
def test_finetune_bench_bad_options_exit_2(bad, tmp_path, capsys):
    argv = ["bench", "--task", "finetune", "--out", str(tmp_path / "o"), *bad] if bad != ["--task"] else \
        ["bench", "--task", "nope"]
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_finetune_benches_of_different_seeds_merge_into_one_report(tmp_path, tune_file):
    cache = tmp_path / "cache"
    run = lambda seed, out, extra=(): main(["bench", "--task", "finetune", "--out", str(tmp_path / out), "--cache-dir",
                                            str(cache), "--tune-corpus", tune_file, "--methods", "lora-adamw,lora-emsa",
                                            *TINY[2:], "--seeds", str(seed), *extra])
    assert run(0, "s0") == 0 and run(1, "s1") == 0 and run(1, "s1b", ["--lr-adapter", "0.05"]) == 0
    assert main(["bench", "--task", "finetune", "--merge", f"{tmp_path / 's0'},{tmp_path / 's1'}",
                 "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert [r["seeds"] for r in merged["summary"]["rows"]] == [2, 2]
    single = [json.loads((tmp_path / d / "results.json").read_text())["runs"] for d in ("s0", "s1")]
    finals = sorted(r["final_val_loss"] for rs in single for r in rs if r["method"] == "lora-adamw")
    row = merged["summary"]["rows"][0]
    assert (row["final_val_loss_min"], row["final_val_loss_max"]) == (finals[0], finals[1])
    assert main(["bench", "--task", "finetune", "--merge", f"{tmp_path / 's0'},{tmp_path / 's1b'}",
                 "--out", str(tmp_path / "m2")]) == 2  # another learning rate: not the same bench
    assert main(["bench", "--task", "finetune", "--merge", f"{tmp_path / 's0'},{tmp_path / 's0'}",
                 "--out", str(tmp_path / "m3")]) == 2  # the same runs twice


def test_finetune_bench_on_mnist1d_held_out_classes(tmp_path):
    pytest.importorskip("mnist1d")
    out = tmp_path / "out"
    argv = ["bench", "--task", "finetune", "--model", "mnist1d", "--out", str(out), "--cache-dir", str(tmp_path / "c"),
            "--methods", "full-adamw,lora-adamw,lora-emsa,parallel-adamw,nonlinear-adamw,binary-dmsa",
            "--seeds", "0", "--steps", "3", "--pretrain-steps", "3", "--n-embd", "16", "--batch-size", "8",
            "--eval-every", "1", "--threads", "1", "--no-tensorboard"]
    assert main(argv) == 0
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["summary"]["rows"]}
    for r in rows.values():
        assert r["roundtrip_exact"] and r["frozen_base_untouched"] and 0 <= r["final_val_acc"] <= 1
    assert rows["lora-adamw"]["trainable_params"] == 2 * 8 * (16 + 64) * 2  # fc1 and fc2 of 2 blocks, rank 8
    assert rows["parallel-adamw"]["trainable_params"] == rows["lora-adamw"]["trainable_params"]
    argv[argv.index("--methods") + 1] = "parallel2-adamw"
    assert main(argv) == 2  # the MLP blocks have one residual branch each
