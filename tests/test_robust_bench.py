"""``pmptrain bench --task robust`` end to end at tiny sizes (seconds), its errors and the data fallback."""

import json

import pytest

from pmptrain.bench.cli import main
from pmptrain.robust import bench as rb

TINY = ["bench", "--task", "robust", "--dataset", "mnist1d", "--max-train", "64", "--max-test", "32",
        "--eval-n", "8", "--epochs", "2", "--yopo-epochs", "1", "--seeds", "1", "--batch-size", "32",
        "--methods", "standard,pgd-at,yopo", "--optimizers", "sgd", "--pgd-k", "2", "--yopo-m", "2",
        "--yopo-n", "1", "--no-autoattack", "--cl-n", "4", "--cl-fit", "64", "--no-tensorboard", "--threads", "1"]


def test_robust_bench_cli_writes_the_table(tmp_path, capsys):
    out = tmp_path / "rb"
    assert main(TINY + ["--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"standard", "pgd-at", "yopo"}
    assert rows["pgd-at"]["time_vs_pgd_at"] == pytest.approx(1.0)
    assert rows["pgd-at"]["passes_vs_pgd_at"] == pytest.approx(1.0)
    # 2 batches/epoch: PGD-2 AT 3 passes per batch x 2 epochs; YOPO-2-1 2 passes x 1 epoch
    assert rows["yopo"]["passes_vs_pgd_at"] == pytest.approx((2 * 2 * 1) / (3 * 2 * 2))
    assert rows["yopo"]["first_layer_passes"] == 2 * 2  # one first-layer input-VJP per pass (in its backward)
    for r in rows.values():
        assert 0.0 <= r["clean_median"] <= 1.0 and 0.0 <= r["pgd20_median"] <= r["clean_median"] + 1e-9
        assert r["cl_clean"] is not None and r["cl_pgd20_adaptive"] is not None
        assert all(0.0 <= r[k] <= 1.0 for k in ("cl_clean_base", "cl_clean", "cl_pgd20_base", "cl_pgd20_transfer"))
    assert "→" in (out / "results.txt").read_text()
    assert (out / "results.csv").read_text().startswith("setting,method")
    assert (out / "robust_vs_seconds.png").stat().st_size > 0
    assert "PGD-2 AT" in (out / "results.txt").read_text()
    assert "YOPO-2-1" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--methods", "pgd-at,nope"], ["--optimizers", "adam"], ["--epochs", "0"],
                                 ["--lr", "sgd=x"], ["--eps", "-1"]])
def test_robust_bench_bad_arguments_exit_2(bad, tmp_path, capsys):
    assert main(TINY + bad + ["--out", str(tmp_path / "x")]) == 2  # refused before any training
    assert "error" in capsys.readouterr().err


def test_unknown_task_exits_2(capsys):
    assert main(["bench", "--task", "nope"]) == 2
    assert "--task" in capsys.readouterr().err


def test_fashion_mnist_absent_falls_back_to_mnist1d_with_a_note(monkeypatch):
    from pmptrain.bench import data as bd

    real = bd.load_dataset

    def fake(name, **kw):
        if name == "fashion-mnist":
            raise bd.DatasetNotFoundError("no fashion-mnist here")
        return real(name, **kw)

    monkeypatch.setattr(bd, "load_dataset", fake)
    notes = []
    d = rb.load("fashion-mnist", None, False, 10, 10, notes.append)
    assert d["name"] == "mnist1d" and d["bounds"] is None and "fell back" in d["note"] and notes
