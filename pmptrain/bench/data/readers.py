"""Readers of the distribution formats: IDX (MNIST, Fashion-MNIST), CIFAR-10's python pickles,
SVHN's MATLAB files. Each validates what it reads and raises :class:`CorruptDataError` naming the file."""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from .catalog import CIFAR_BATCH_ROWS, CIFAR_BATCHES, CIFAR_DIR
from .errors import CorruptDataError, DataError

# --------------------------------------------------------------------------------------------
# readers

# IDX dtype codes (LeCun's format description): code -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


#: Largest IDX payload a header may declare (MNIST's training images are 47 MB).
MAX_IDX_BYTES = 1 << 30
_CHUNK = 1 << 20


def _read_exactly(f, n: int) -> bytes:
    """Up to ``n`` bytes of the (possibly decompressing) stream ``f``, read in chunks of at most 1 MiB."""
    parts, got = [], 0
    while got < n:
        b = f.read(min(_CHUNK, n - got))
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def read_idx(path: os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip), validating its header against its length.

    Format: two zero bytes, a dtype code (0x08 ubyte, 0x09 byte, 0x0B short, 0x0C int,
    0x0D float, 0x0E double), the number of dimensions ``n``, ``n`` big-endian uint32 sizes,
    then the data in C order, big-endian.

    The header is read first, from a streaming decompressor for a gzip file (recognised by its
    magic, not its suffix); the payload it declares must be at most :data:`MAX_IDX_BYTES`, and
    exactly that many bytes are decompressed, plus one to detect trailing data: a small ``.gz``
    that inflates to gigabytes is refused after reading what its header promises.

    Returns:
        The array in native byte order. Raises :class:`CorruptDataError` naming the file if the
        magic, dtype code or dimensions are invalid or the payload length does not match.
    """
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            f = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
            head4 = _read_exactly(f, 4)
            if len(head4) < 4:
                raise CorruptDataError(f"{path}: {len(head4)} bytes, too short for an IDX header")
            if head4[0] != 0 or head4[1] != 0:
                raise CorruptDataError(f"{path}: bad IDX magic {head4.hex()} (must start with 0000)")
            code, ndim = head4[2], head4[3]
            if code not in _IDX_DTYPES:
                raise CorruptDataError(f"{path}: unknown IDX dtype code 0x{code:02x}")
            if ndim == 0:
                raise CorruptDataError(f"{path}: IDX header declares 0 dimensions")
            head = 4 + 4 * ndim
            dbytes = _read_exactly(f, 4 * ndim)
            if len(dbytes) < 4 * ndim:
                raise CorruptDataError(f"{path}: truncated IDX header ({4 + len(dbytes)} < {head} bytes)")
            dims = tuple(int(d) for d in np.frombuffer(dbytes, ">u4", count=ndim))
            dtype = np.dtype(_IDX_DTYPES[code])
            nbytes = math.prod(dims) * dtype.itemsize
            if nbytes > MAX_IDX_BYTES:
                raise CorruptDataError(f"{path}: IDX dims {dims} of {dtype} declare {nbytes} bytes, larger than "
                                       f"the {MAX_IDX_BYTES} allowed; refused before reading them")
            size = None if gz else os.fstat(raw.fileno()).st_size
            if size is not None and size != head + nbytes:
                raise CorruptDataError(
                    f"{path}: IDX dims {dims} of {dtype} need {head + nbytes} bytes, file has {size} "
                    f"({'truncated' if size < head + nbytes else 'trailing bytes'})")
            buf = _read_exactly(f, nbytes)
            extra = f.read(1)
    except CorruptDataError:
        raise
    except (EOFError, OSError, zlib.error) as e:
        raise CorruptDataError(f"{path}: cannot decompress ({e}); the file is truncated or corrupt") from e
    if len(buf) != nbytes or extra:
        has = f"more than {head + nbytes}" if extra else str(head + len(buf))
        raise CorruptDataError(
            f"{path}: IDX dims {dims} of {dtype} need {head + nbytes} bytes, file has {has} "
            f"({'truncated' if len(buf) < nbytes else 'trailing bytes'})")
    arr = np.frombuffer(buf, dtype).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def _check_labels(path: object, y: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    if y.ndim != 1 or len(y) != n:
        raise CorruptDataError(f"{path}: {y.shape} labels for {n} images")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise CorruptDataError(f"{path}: labels outside [0, {num_classes}): min {y.min()}, max {y.max()}")
    return y.astype(np.int64)


def read_idx_pair(images: Path, labels: Path) -> Tuple[np.ndarray, np.ndarray]:
    x = read_idx(images)
    if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8:
        raise CorruptDataError(f"{images}: expected uint8 images (N, 28, 28), got {x.dtype} {x.shape}")
    y = read_idx(labels)
    return x, _check_labels(labels, y, len(x), 10)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy names needed to rebuild an ndarray."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how Python 3's protocol-2 pickles store bytes; side-effect free
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]  # numpy 2 moved numpy.core
        return super().find_class(module, name)


def _load_cifar_batch(blob: bytes, where: str) -> Tuple[np.ndarray, np.ndarray]:
    try:
        d = _RestrictedUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as e:
        raise CorruptDataError(f"{where}: not a readable CIFAR-10 batch pickle ({e})") from e
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise CorruptDataError(f"{where}: CIFAR-10 batch must be a dict with b'data' and b'labels'")
    # checked before anything is converted: a pickle can repeat one object many times by reference,
    # so a list turned into an array can be far larger than the file
    x, labels = d[b"data"], d[b"labels"]
    if not isinstance(x, np.ndarray):
        raise CorruptDataError(f"{where}: b'data' must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or x.shape[0] > CIFAR_BATCH_ROWS:
        raise CorruptDataError(f"{where}: data must be uint8 (N ≤ {CIFAR_BATCH_ROWS}, 3072), got {x.dtype} {x.shape}")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(x):
        raise CorruptDataError(f"{where}: b'labels' must be a list of {len(x)} labels, got "
                               f"{type(labels).__name__} of length {len(labels) if hasattr(labels, '__len__') else '?'}")
    if isinstance(labels, list) and not all(type(v) is int for v in labels):
        raise CorruptDataError(f"{where}: b'labels' must hold integers")
    y = _check_labels(where, np.asarray(labels), len(x), 10)
    return x.reshape(-1, 3, 32, 32), y


def read_cifar10(path: os.PathLike) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read CIFAR-10 in its python distribution format.

    Args:
        path: the extracted ``cifar-10-batches-py`` directory or the ``cifar-10-python.tar.gz``
            tarball (read in place, not extracted).

    Returns:
        ``(train_x, train_y, test_x, test_y)``: uint8 images ``(N, 3, 32, 32)`` and int64 labels,
        train = ``data_batch_1..5`` concatenated, test = ``test_batch``.
    """
    path = Path(path)
    blobs: Dict[str, bytes] = {}
    if path.is_dir():
        for b in CIFAR_BATCHES:
            p = path / b
            if not p.is_file():
                raise CorruptDataError(f"{path}: missing CIFAR-10 batch {b}")
            blobs[b] = p.read_bytes()
    else:
        try:
            with tarfile.open(path, "r:*") as tar:
                members = {m.name.split("/")[-1]: m for m in tar.getmembers() if m.isfile()}
                for b in CIFAR_BATCHES:
                    if b not in members:
                        raise CorruptDataError(f"{path}: tarball lacks {CIFAR_DIR}/{b}")
                    f = tar.extractfile(members[b])
                    blobs[b] = f.read()
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise CorruptDataError(f"{path}: unreadable tarball ({e}); truncated or corrupt") from e
    parts = [_load_cifar_batch(blobs[b], f"{path}:{b}") for b in CIFAR_BATCHES]
    train_x = np.concatenate([p[0] for p in parts[:-1]])
    train_y = np.concatenate([p[1] for p in parts[:-1]])
    return train_x, train_y, parts[-1][0], parts[-1][1]


def read_svhn(path: os.PathLike) -> Tuple[np.ndarray, np.ndarray]:
    """Read one SVHN cropped-digit file (``train_32x32.mat`` / ``test_32x32.mat``).

    The files are MATLAB v5 with ``X`` uint8 of shape ``(32, 32, 3, N)`` and ``y`` of shape
    ``(N, 1)`` holding 1..10, where 10 stands for the digit 0. Read with ``scipy.io.loadmat``.

    Returns:
        ``(x, y)``: uint8 images ``(N, 3, 32, 32)`` and int64 labels in 0..9 (10 mapped to 0).
    """
    path = Path(path)
    try:
        from scipy.io import loadmat
    except ImportError as e:  # pragma: no cover - scipy comes with mnist1d
        raise DataError("reading SVHN needs scipy (pip install scipy)") from e
    try:
        m = loadmat(str(path))
    except Exception as e:
        raise CorruptDataError(f"{path}: not a readable MATLAB v5 file ({e})") from e
    if "X" not in m or "y" not in m:
        raise CorruptDataError(f"{path}: SVHN .mat must hold variables X and y, has {sorted(m)}")
    x, y = np.asarray(m["X"]), np.asarray(m["y"])
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise CorruptDataError(f"{path}: X must be uint8 (32, 32, 3, N), got {x.dtype} {x.shape}")
    y = y.reshape(-1).astype(np.int64)
    if len(y) != x.shape[3] or (len(y) and (y.min() < 1 or y.max() > 10)):
        raise CorruptDataError(f"{path}: y must hold {x.shape[3]} labels in 1..10")
    y[y == 10] = 0
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y
