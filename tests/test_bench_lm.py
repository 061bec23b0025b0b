"""The language-model bench (``pmptrain bench --model gpt``), its corpus and schedule, and the
transformer / ResNet baselines of the registry (AdamW with decay groups, Muon, SOAP)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pmptrain.bench import cli, lm, registry
from pmptrain.bench.models import build_model

TINY_GPT = ["--model", "gpt", "--steps", "6", "--eval-every", "3", "--seeds", "2", "--batch-size", "2",
            "--seq-len", "16", "--max-bytes", "30000", "--model-args", "{n_layer: 1, n_embd: 16, n_head: 2}",
            "--threads", "1", "--no-tensorboard"]


def test_gpt_bench_runs_and_reports_loss_curves(tmp_path):
    out = tmp_path / "gpt"
    assert cli.main(["bench", *TINY_GPT, "--optimizers", "adamw,emsa", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["kind"] == "language-model" and res["corpus"]["name"] == "pysrc"
    assert len(res["corpus"]["sha256"]) == 64 and res["corpus"]["bytes"] == 30000
    rows = {r["optimizer"]: r for r in res["summary"]["rows"]}
    assert set(rows) == {"adamw", "emsa"}
    for r in rows.values():
        assert r["curve_steps"] == [0, 3, 6] and all(math.isfinite(v) for v in r["curve_val_loss"])
        assert r["curve_val_loss"][-1] < r["curve_val_loss"][0]  # both learn something in 6 steps
        assert r["final_ppl"] == pytest.approx(math.exp(r["final_val_loss"]))
        assert r["seeds"] == 2 and r["skipped_steps"] == 0
    assert rows["adamw"]["step_ratio"] == 1.0 and res["summary"]["reference"] == "adamw"
    assert res["summary"]["target_loss"] == pytest.approx(rows["adamw"]["final_val_loss"])
    assert (out / "val_loss_vs_step.png").is_file() and (out / "val_loss_vs_seconds.png").is_file()
    assert (out / "results.csv").read_text().startswith("optimizer,final_val_loss")
    table = (out / "results.txt").read_text().splitlines()
    assert table[0].split()[:4] == ["optimizer", "final", "val", "loss"] and table[2].startswith("adamw ")
    stored = json.loads((out / "config.json").read_text())
    assert stored["kind"] == "language-model" and stored["config"]["steps"] == 6
    assert cli.main(["bench", "--resume", str(out)]) == 2  # a clear refusal, not a BenchConfig error
    # the same seed gives the same run (seeded model, batches and validation batches)
    runs = [r for r in res["runs"] if r["optimizer"] == "adamw"]
    assert [r["optimizer"] for r in res["runs"]] == ["adamw", "adamw", "emsa", "emsa"]
    assert runs[0]["history"][0]["val_loss"] != runs[1]["history"][0]["val_loss"]  # seeds differ


def test_gpt_bench_errors_are_clear(tmp_path, capsys):
    assert cli.main(["bench", *TINY_GPT, "--optimizers", "binary-msa", "--out", str(tmp_path / "a")]) == 2
    assert "discrete weights" in capsys.readouterr().err
    assert cli.main(["bench", *TINY_GPT, "--epochs", "3", "--out", str(tmp_path / "b")]) == 2
    assert "do not apply to the language-model bench" in capsys.readouterr().err
    assert cli.main(["bench", *TINY_GPT, "--dataset", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "c")]) == 2
    assert "existing text file" in capsys.readouterr().err


def test_corpus_is_deterministic_and_files_work(tmp_path):
    a, b = lm.load_corpus("pysrc", 50_000), lm.load_corpus("pysrc", 50_000)
    assert a.sha256 == b.sha256 and torch.equal(a.data, b.data) and len(a.data) == 50_000
    text = tmp_path / "t.txt"
    text.write_bytes(b"hello world\n" * 2000)
    c = lm.load_corpus(str(text))
    assert bytes(c.data[:5].tolist()) == b"hello" and c.source == str(text)
    with pytest.raises(ValueError, match="10 000"):
        small = tmp_path / "s.txt"
        small.write_bytes(b"x" * 100)
        lm.load_corpus(str(small))


def test_warmup_and_cosine_schedule():
    mult = [lm.lr_multiplier(s, 100, 0.1, 0.1) for s in range(100)]
    assert mult[0] == pytest.approx(0.1) and mult[9] == pytest.approx(1.0)  # linear warmup over 10 steps
    assert mult[10] == pytest.approx(1.0) and mult[99] == pytest.approx(0.1, abs=1e-3)
    assert all(b <= a + 1e-12 for a, b in zip(mult[10:], mult[11:]))  # cosine decay, monotone
    assert lm.lr_multiplier(55, 100, 0.1, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_decay_groups_put_decay_on_matrices_only():
    model = build_model("gpt", (8,), 32, n_layer=1, n_embd=16, n_head=2)
    dec, nodec = registry.decay_groups(model, 0.1)
    assert dec["weight_decay"] == 0.1 and nodec["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in dec["params"]) and all(p.dim() < 2 for p in nodec["params"])
    assert len(dec["params"]) + len(nodec["params"]) == len(list(model.parameters()))  # tied weight once
    opt = registry.build_optimizer("adamw", model)
    assert isinstance(opt, torch.optim.AdamW) and [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    e = registry.build_optimizer("emsa", build_model("gpt", (8,), 32, n_layer=1, n_embd=16, n_head=2),
                                 weight_decay=0.1)
    assert [g["weight_decay"] for g in e.param_groups] == [0.1, 0.0]


@pytest.mark.parametrize("name", ["muon", "soap", "adamw"])
def test_preconditioned_baselines_train_a_gpt_and_a_resnet(name):
    pytest.importorskip("pytorch_optimizer")
    for arch, shape, classes, kw in (("gpt", (16,), 32, {"n_layer": 1, "n_embd": 16, "n_head": 2}),
                                     ("resnet", (1, 12, 12), 4, {"width": 4})):
        torch.manual_seed(0)
        model = build_model(arch, shape, classes, **kw)
        opt = registry.build_optimizer(name, model)
        if arch == "gpt":
            x = torch.randint(0, classes, (4, 16))
            y = x.roll(-1, 1)
        else:
            x, y = torch.randn(8, *shape), torch.arange(8) % classes
        losses = []
        for _ in range(8):
            opt.zero_grad()
            out = model(x)
            loss = F.cross_entropy(out.reshape(-1, classes), y.reshape(-1))
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0], (name, arch, losses)


def test_muon_groups_exclude_embeddings_and_the_output_layer():
    model = build_model("gpt", (8,), 32, n_layer=1, n_embd=16, n_head=2)
    hidden, other = registry._hidden_matrices(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in hidden} == {"h.0.attn.c_attn.weight", "h.0.attn.c_proj.weight",
                                              "h.0.mlp.0.weight", "h.0.mlp.2.weight"}
    assert any(names[id(p)] == "wte.weight" for p in other)
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 3))
    hidden, other = registry._hidden_matrices(cnn)
    assert [p.shape for p in hidden] == [torch.Size([2, 1, 3, 3])]  # the classifier goes to AdamW
