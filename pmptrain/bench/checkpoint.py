"""The bench's checkpoints: plain data only, checksummed, the previous good one kept.

A checkpoint file is ``torch.save`` of an envelope

    {"format": "pmptrain-checkpoint", "version": 1, "sha256": <hex digest>, "payload": <uint8 tensor>}

whose payload is the bytes of ``torch.save(state)``. Both levels are read with
``torch.load(..., weights_only=True)``, so a checkpoint may hold only tensors, numbers, strings,
booleans, None and lists, tuples and dicts of them: a pickled object of any other type is refused
before anything in it runs. The SHA-256 of the payload is checked before the payload is read, so a
flipped bit anywhere in the state (a weight, an optimizer buffer, the history) is refused rather
than resumed.

:func:`save` keeps the previous checkpoint, if it verifies, as ``<name>.prev.pt`` before writing the
new one atomically; :func:`load_latest` falls back to it (with a warning naming the bad file) when
the newest is damaged, so a corrupted checkpoint costs at most one epoch.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from .._io import atomic_write, remove_stale_temporaries

__all__ = ["CheckpointError", "save", "load", "load_latest", "previous_path", "FORMAT", "VERSION"]

FORMAT = "pmptrain-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be resumed from: ``path`` and the ``reason``."""

    def __init__(self, path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"checkpoint {os.fspath(path)!r}: {reason}")


def previous_path(path) -> Path:
    """``checkpoint.pt`` → ``checkpoint.prev.pt``: where :func:`save` keeps the previous one."""
    path = Path(path)
    return path.with_name(path.stem + ".prev" + path.suffix)


def _envelope(state: Dict[str, Any]) -> Dict[str, Any]:
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    return {"format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(data).hexdigest(),
            "payload": torch.frombuffer(bytearray(data), dtype=torch.uint8)}


def save(state: Dict[str, Any], path) -> None:
    """Write ``state`` (plain data and tensors) to ``path`` atomically; a verified existing file is
    kept as :func:`previous_path` first, and temporary files of a killed earlier save are removed. Raises :class:`CheckpointError` if ``state`` holds anything
    :func:`load` would refuse (checked before anything is written)."""
    path = Path(path)
    env = _envelope(state)
    try:  # what cannot be read back safely is not written
        _read_payload(bytes(env["payload"].numpy()), path)
    except CheckpointError as e:
        raise CheckpointError(path, f"not written: {e.reason}") from None
    if path.is_file():
        try:
            _verified_payload(path)  # ours, so the checksum is the check: no need to unpickle it
        except CheckpointError:
            pass  # a damaged newest file is overwritten; the previous good one stays
        else:
            os.replace(path, previous_path(path))
    remove_stale_temporaries(path)  # left by a writer killed during torch.save (one writer per run)
    with atomic_write(path) as f:
        torch.save(env, f)


def _torch_load(source, path: Path, unreadable: str):
    """``torch.load(source, weights_only=True)`` with every failure as a :class:`CheckpointError`
    on ``path`` (``unreadable``: what a parse failure means at this level)."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(path, "it holds objects other than tensors and plain data; refused without "
                              f"loading them ({str(e).splitlines()[0]})") from None
    except Exception as e:  # noqa: BLE001 - truncated, not a zip, any failure to parse
        raise CheckpointError(path, f"{unreadable} ({type(e).__name__}: {e})") from None


def _read_payload(data: bytes, path: Path) -> Dict[str, Any]:
    state = _torch_load(io.BytesIO(data), path, "the state cannot be read")
    if not isinstance(state, dict):
        raise CheckpointError(path, f"the state is a {type(state).__name__}, not a dict")
    return state


def _verified_payload(path: Path) -> bytes:
    """The payload bytes of ``path`` after checking the envelope and the checksum."""
    env = _torch_load(path, path, "not a readable checkpoint")
    if not isinstance(env, dict) or env.get("format") != FORMAT:
        raise CheckpointError(path, f"not a {FORMAT} file (checkpoints written before pmptrain 0.2 "
                              "cannot be read safely: rerun without --resume)")
    if env.get("version") != VERSION:
        raise CheckpointError(path, f"format version {env.get('version')!r}; this pmptrain reads version {VERSION}")
    payload, digest = env.get("payload"), env.get("sha256")
    if not (isinstance(payload, torch.Tensor) and payload.dtype == torch.uint8 and payload.dim() == 1
            and isinstance(digest, str)):
        raise CheckpointError(path, "malformed envelope (payload or sha256 missing)")
    data = bytes(payload.numpy())
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(path, "checksum mismatch: the file was modified or damaged after it was "
                              "written")
    return data


def load(path) -> Dict[str, Any]:
    """The state saved in ``path``, after checking the envelope and the checksum.

    Raises :class:`CheckpointError` naming the file: not a pmptrain checkpoint, written by another
    format version, holding anything but plain data (nothing in it is run), or a checksum mismatch.
    """
    path = Path(path)
    return _read_payload(_verified_payload(path), path)


def load_latest(path) -> Optional[Tuple[Dict[str, Any], Path]]:
    """``(state, file)`` of the newest good checkpoint among ``path`` and :func:`previous_path`, or
    None if neither exists. A damaged newest file is reported with ``warnings.warn`` (naming it and
    the reason) and the previous one is used; if every existing file is damaged, raises
    :class:`CheckpointError` listing each."""
    errors = []
    for p in (Path(path), previous_path(path)):
        if not p.is_file():
            continue
        try:
            state = load(p)
        except CheckpointError as e:
            errors.append(e)
            continue
        for e in errors:
            warnings.warn(f"{e}; resuming from the previous checkpoint {os.fspath(p)!r} instead "
                          "(one epoch is repeated)", stacklevel=2)
        return state, p
    if errors:
        raise CheckpointError(errors[0].path, "; ".join(
            [errors[0].reason] + [f"and {os.fspath(e.path)!r}: {e.reason}" for e in errors[1:]]))
    return None
