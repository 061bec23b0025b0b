"""Bench checkpoints (issue 10, findings 1 and 2): nothing in a checkpoint runs on load, a flipped
bit is refused, and the previous good checkpoint takes over so at most one epoch is lost."""

import io
import os
import warnings
from pathlib import Path

import pytest
import torch

from pmptrain.bench import checkpoint as ck
from pmptrain.bench import cli, runner, seeding

MARKER = "pmptrain-test-payload-ran"


class _Payload:
    """A pickle that would create a directory when unpickled with ``weights_only=False``."""

    def __init__(self, where):
        self.where = str(where)

    def __reduce__(self):
        return (os.makedirs, (self.where,))


def _config(tmp_path, epochs=3, opts=("sgd", "emsa")):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "dataset: mnist1d\nmnist1d_samples: 200\nmodel: mlp\nmodel_args: {widths: [16]}\n"
        f"optimizers: [{', '.join(opts)}]\nepochs: {epochs}\nseeds: [0]\nbatch_size: 32\n"
        "tensorboard: false\nthreads: 1\n")
    return cfg


class _Killed(BaseException):
    pass


def _run_killed_after(cfg, out, monkeypatch, epoch_to_die):
    def kill(run_dir, epoch):
        if run_dir is not None and epoch == epoch_to_die:
            raise _Killed
    monkeypatch.setattr(runner, "_after_checkpoint", kill)
    with pytest.raises(_Killed):
        cli.main(["train", "--config", str(cfg), "--out", str(out)])
    monkeypatch.undo()


def _final(out, opt):
    state = ck.load(out / "runs" / opt / "seed0" / "checkpoint.pt")
    return state["model"], [h["test_acc"] for h in state["history"]]


# ------------------------------------------------------------------------------- the format


def test_round_trip_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    ck.save({"epoch": 0, "w": torch.arange(5.0)}, path)
    assert not ck.previous_path(path).exists()
    ck.save({"epoch": 1, "w": torch.arange(6.0)}, path)
    assert ck.load(path)["epoch"] == 1 and ck.load(ck.previous_path(path))["epoch"] == 0
    assert torch.equal(ck.load(path)["w"], torch.arange(6.0))


def test_rng_state_is_plain_data_and_restores_exactly():
    import random

    import numpy as np
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    st = seeding.rng_state()
    buf = io.BytesIO()
    torch.save(st, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)  # would raise on numpy objects
    a = (torch.rand(3), random.random(), np.random.rand(3), np.random.randn())
    seeding.set_rng_state(back)
    b = (torch.rand(3), random.random(), np.random.rand(3), np.random.randn())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and (a[2] == b[2]).all() and a[3] == b[3]


def test_state_that_cannot_be_read_back_safely_is_not_written(tmp_path):
    with pytest.raises(ck.CheckpointError, match="not written"):
        ck.save({"x": _Payload(tmp_path / MARKER)}, tmp_path / "checkpoint.pt")
    assert not (tmp_path / "checkpoint.pt").exists()


def test_code_in_a_checkpoint_never_runs(tmp_path):
    marker = tmp_path / MARKER
    # a plain torch.save file (the old format) carrying a __reduce__ payload
    torch.save({"model": _Payload(marker)}, tmp_path / "old.pt")
    with pytest.raises(ck.CheckpointError, match="plain data"):
        ck.load(tmp_path / "old.pt")
    # the same payload inside a valid envelope with a correct checksum
    buf = io.BytesIO()
    torch.save({"model": _Payload(marker)}, buf)
    env = {"format": ck.FORMAT, "version": ck.VERSION, "sha256": __import__("hashlib").sha256(buf.getvalue()).hexdigest(),
           "payload": torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)}
    torch.save(env, tmp_path / "crafted.pt")
    with pytest.raises(ck.CheckpointError, match="plain data") as e:
        ck.load(tmp_path / "crafted.pt")
    assert "crafted.pt" in str(e.value)
    assert not marker.exists()  # nothing ran


def test_a_flipped_bit_in_the_state_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    ck.save({"w": torch.ones(1000)}, path)
    env = torch.load(path, weights_only=True)
    env["payload"][len(env["payload"]) // 2] ^= 1  # one bit of the weight data
    torch.save(env, path)
    with pytest.raises(ck.CheckpointError, match="checksum mismatch"):
        ck.load(path)


@pytest.mark.parametrize("content,reason", [
    (b"", "not a readable checkpoint"), (b"PK\x03\x04garbage", "not a readable checkpoint"),
    ("plain", "not a pmptrain-checkpoint file"), ("version", "format version"),
])
def test_malformed_files_name_the_problem(tmp_path, content, reason):
    path = tmp_path / "checkpoint.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "plain":
        torch.save({"model": {}}, path)
    else:
        ck.save({"a": 1}, path)
        env = torch.load(path, weights_only=True)
        env["version"] = 99
        torch.save(env, path)
    with pytest.raises(ck.CheckpointError, match=reason) as e:
        ck.load(path)
    assert "checkpoint.pt" in str(e.value)


# ------------------------------------------------------------------------------- resume


def test_resume_refuses_a_checkpoint_with_code_exit_2(tmp_path, monkeypatch, capsys):
    cfg = _config(tmp_path, opts=("sgd",))
    out = tmp_path / "part"
    _run_killed_after(cfg, out, monkeypatch, 0)
    run = out / "runs" / "sgd" / "seed0"
    marker = tmp_path / MARKER
    torch.save({"model": _Payload(marker)}, run / "checkpoint.pt")
    assert cli.main(["train", "--config", str(cfg), "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt" in err and "plain data" in err
    assert not marker.exists()


def test_a_corrupted_checkpoint_falls_back_to_the_previous_one_and_loses_one_epoch(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    full, part = tmp_path / "full", tmp_path / "part"
    assert cli.main(["train", "--config", str(cfg), "--out", str(full)]) == 0
    _run_killed_after(cfg, part, monkeypatch, 1)  # dies after epoch 2 of 3 of the first optimizer
    run = part / "runs" / "sgd" / "seed0"
    assert ck.load(run / "checkpoint.pt")["epoch"] == 1 and ck.load(run / "checkpoint.prev.pt")["epoch"] == 0
    raw = bytearray((run / "checkpoint.pt").read_bytes())
    raw[len(raw) // 2] ^= 0x10  # a bit in the middle of the file: the payload's tensor data
    (run / "checkpoint.pt").write_bytes(bytes(raw))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert cli.main(["train", "--config", str(cfg), "--resume", str(part)]) == 0
    msgs = [str(x.message) for x in w if "previous checkpoint" in str(x.message)]
    assert msgs and "checkpoint.pt" in msgs[0] and "checkpoint.prev.pt" in msgs[0]
    for opt in ("sgd", "emsa"):  # the same final numbers as the uninterrupted run
        (m1, h1), (m2, h2) = _final(full, opt), _final(part, opt)
        assert h1 == h2
        assert all(torch.equal(m1[k], m2[k]) for k in m1)


def test_both_checkpoints_damaged_is_a_clear_error(tmp_path, monkeypatch, capsys):
    cfg = _config(tmp_path, opts=("sgd",))
    out = tmp_path / "part"
    _run_killed_after(cfg, out, monkeypatch, 1)
    run = out / "runs" / "sgd" / "seed0"
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (run / name).write_bytes(b"not a checkpoint")
    assert cli.main(["train", "--config", str(cfg), "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt" in err and "checkpoint.prev.pt" in err


def test_files_are_written_under_their_final_name_only(tmp_path):
    path = tmp_path / "checkpoint.pt"
    ck.save({"a": 1}, path)
    ck.save({"a": 2}, path)
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]


# ------------------------------------------------------------------------ small things (finding 7)


def test_a_temporary_file_left_by_a_killed_save_is_removed(tmp_path):
    path = tmp_path / "checkpoint.pt"
    stale = tmp_path / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"half a torch.save")
    other = tmp_path / ".results.json.x.tmp"  # another file's temporary is not touched
    other.write_bytes(b"x")
    ck.save({"a": 1}, path)
    assert not stale.exists() and other.exists() and ck.load(path)["a"] == 1


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        ck.save({"a": 1}, tmp_path / "checkpoint.pt")
        from pmptrain._io import atomic_write
        with atomic_write(tmp_path / "r.json", "w") as f:
            f.write("{}")
    finally:
        os.umask(old)
    for name in ("checkpoint.pt", "r.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name


def test_out_that_is_a_file_or_unwritable_is_exit_2(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert cli.main(["bench", "--out", str(f), "--epochs", "1"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert cli.main(["bench", "--out", str(f / "sub"), "--epochs", "1"]) == 2
    assert "not a directory" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        assert cli.main(["bench", "--out", str(ro / "x"), "--epochs", "1"]) == 2
        assert "permission denied" in capsys.readouterr().err


def test_resume_with_fewer_epochs_is_refused(tmp_path, capsys):
    cfg = _config(tmp_path, epochs=2, opts=("sgd",))
    out = tmp_path / "done"
    assert cli.main(["train", "--config", str(cfg), "--out", str(out)]) == 0
    assert cli.main(["train", "--resume", str(out), "--epochs", "1"]) == 2
    assert "fewer than the 2 epochs" in capsys.readouterr().err
