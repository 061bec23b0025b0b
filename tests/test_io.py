"""The shared atomic writer (export, checkpoints, reports, downloads)."""

import os

import pytest

from pmptrain._io import atomic_write


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "f.bin"
    with atomic_write(target) as f:
        f.write(b"one")
    assert target.read_bytes() == b"one"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write(b"two")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"one"

    def reject(tmp):
        assert open(tmp, "rb").read() == b"three"
        raise ValueError("bad checksum")

    with pytest.raises(ValueError):
        with atomic_write(target, verify=reject) as f:
            f.write(b"three")
    assert target.read_bytes() == b"one"
    assert os.listdir(tmp_path) == ["f.bin"]  # no temporary file left behind
