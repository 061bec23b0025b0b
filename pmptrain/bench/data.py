"""Data sets for ``pmptrain bench``: one small interface, deterministic splits, seeded batches.

Every data set is returned as an :class:`ArrayDataset` of in-memory torch tensors::

    ds = load_dataset("fashion-mnist", data_dir=None, download=None, val_fraction=0.1)
    for xb, yb in make_loader(ds.train_x, ds.train_y, batch_size=100, seed=0, epoch=3):
        ...

Data sets (``DATASETS``) and their tensors (inputs float32, labels int64):

===============  ======================  =============  =============================================
name             source                  input_shape    normalisation ``x = (p/255 - mean) / std``
===============  ======================  =============  =============================================
mnist1d          ``mnist1d`` package     (1, 40)        none: mnist1d already standardises (mean 0, std 1)
mnist            IDX files               (1, 28, 28)    mean 0.1307, std 0.3081
fashion-mnist    IDX files               (1, 28, 28)    mean 0.2860, std 0.3530
cifar10          python pickle tarball   (3, 32, 32)    mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616)
svhn             MATLAB v5 ``.mat``      (3, 32, 32)    mean (0.4377, 0.4438, 0.4728), std (0.1980, 0.2010, 0.1970)
===============  ======================  =============  =============================================

The constants are the per-channel mean and (population) standard deviation of the training set
pixels scaled to [0, 1] (Fashion-MNIST's were recomputed here from the Debian copy: 0.28604,
0.35302); they are recorded in ``ArrayDataset.meta``.

Lookup order for file-based data sets (the first directory holding *all* required files wins;
each root is tried first with a ``<name>/`` sub-directory, then as given — MNIST and
Fashion-MNIST share file names, so keep them in separate sub-directories):

1. ``data_dir`` (the CLI's ``--data-dir``),
2. ``$PMPTRAIN_DATA``,
3. the Debian package location (``/usr/share/datasets/fashion-mnist`` for fashion-mnist only,
   from ``apt-get install dataset-fashion-mnist``),
4. the user cache :func:`cache_dir` ``/<name>`` (``$XDG_CACHE_HOME/pmptrain`` or ``~/.cache/pmptrain``).

If nothing is found and downloading is allowed (``download=True``, or ``download=None`` with
``$PMPTRAIN_DOWNLOAD=1``) the official files are fetched into ``<root>/<name>`` where root is the
first of ``data_dir``, ``$PMPTRAIN_DATA``, the user cache; each file is written to a temporary
name, its MD5 is checked against the published value (``RESOURCES``; the same values torchvision
lists), and only then renamed into place — a mismatch removes the file and raises
:class:`ChecksumError`. Offline and absent raises :class:`DatasetNotFoundError`, naming every
directory searched and how to get the files.

Every reader validates what it reads (IDX magic, dtype code and dimensions against the file
length; pickle/.mat array shapes and label ranges); truncated or corrupt files raise
:class:`CorruptDataError` naming the file, never silently yield fewer examples.

note: CIFAR-10's python batches are pickles. They are read with a restricted unpickler that only
resolves the few numpy names an array needs, so a malicious file cannot run code through
``find_class``; still, only use files from sources you trust. SVHN's ``.mat`` files are read with
``scipy.io.loadmat`` (scipy comes with ``mnist1d``).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import math
import os
import pickle
import random
import tarfile
import urllib.request
import zlib
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .._io import atomic_write

__all__ = [
    "DATASETS",
    "RESOURCES",
    "NORMALIZATION",
    "DataError",
    "DatasetNotFoundError",
    "CorruptDataError",
    "ChecksumError",
    "ArrayDataset",
    "Resource",
    "BatchLoader",
    "load_dataset",
    "make_loader",
    "cache_dir",
    "search_dirs",
    "read_idx",
    "read_cifar10",
    "read_svhn",
    "download_resource",
    "file_md5",
]


# --------------------------------------------------------------------------------------------
# errors


class DataError(RuntimeError):
    """Base class of the data errors of :mod:`pmptrain.bench.data`."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """The data set's files are in none of the searched directories (and were not downloaded)."""


class CorruptDataError(DataError, ValueError):
    """A data file exists but is truncated, has a wrong header, or holds inconsistent arrays."""


class ChecksumError(CorruptDataError):
    """A downloaded file's checksum differs from the published one (the file has been removed)."""


# --------------------------------------------------------------------------------------------
# constants

#: Canonical data-set names; aliases are accepted by :func:`load_dataset`.
DATASETS: Tuple[str, ...] = ("mnist1d", "mnist", "fashion-mnist", "cifar10", "svhn")

_ALIASES: Dict[str, str] = {
    "mnist1d": "mnist1d", "mnist-1d": "mnist1d", "mnist_1d": "mnist1d",
    "mnist": "mnist",
    "fashion-mnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar10": "cifar10", "cifar-10": "cifar10", "cifar_10": "cifar10",
    "svhn": "svhn",
}

#: Per-channel (mean, std) of training pixels in [0, 1]; inputs are ``(p/255 - mean) / std``.
NORMALIZATION: Dict[str, Tuple[Tuple[float, ...], Tuple[float, ...]]] = {
    "mnist1d": ((0.0,), (1.0,)),  # mnist1d.make_dataset already standardises the whole set
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}

_DEBIAN_PACKAGE = {"fashion-mnist": "dataset-fashion-mnist"}
#: System-wide directories searched after ``$PMPTRAIN_DATA`` (Debian's dataset packages).
DEBIAN_DIRS: Dict[str, Tuple[str, ...]] = {"fashion-mnist": ("/usr/share/datasets/fashion-mnist",)}


@dataclasses.dataclass(frozen=True)
class Resource:
    """One downloadable file: its name on disk, mirror URLs tried in order, and its MD5."""

    filename: str
    urls: Tuple[str, ...]
    md5: str


def _idx_resources(mirrors: Sequence[str], md5s: Dict[str, str]) -> Tuple[Resource, ...]:
    return tuple(Resource(f, tuple(m + f for m in mirrors), h) for f, h in md5s.items())


# MD5s of the official distribution files, as published by the data sets' authors and listed in
# torchvision's dataset classes (MNIST, FashionMNIST, CIFAR10, SVHN).
RESOURCES: Dict[str, Tuple[Resource, ...]] = {
    "mnist": _idx_resources(
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion-mnist": _idx_resources(
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
    "cifar10": (
        Resource(
            "cifar-10-python.tar.gz",
            ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
            "c58f30108f718f92721af3b95e74349a",
        ),
    ),
    "svhn": (
        Resource("train_32x32.mat", ("http://ufldl.stanford.edu/housenumbers/train_32x32.mat",),
                 "e26dedcc434d2e4c54c9b2d4a06d8373"),
        Resource("test_32x32.mat", ("http://ufldl.stanford.edu/housenumbers/test_32x32.mat",),
                 "eb5a983be6a315427106f1b164d9cef3"),
    ),
}

_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_BATCH_ROWS = 10000  # images per file of the python distribution (5 train batches + test)
_CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def _canonical(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in _ALIASES:
        raise ValueError(f"name: unknown data set {name!r}; valid names: {', '.join(DATASETS)}")
    return _ALIASES[name.lower()]


# --------------------------------------------------------------------------------------------
# container


@dataclasses.dataclass
class ArrayDataset:
    """A classification data set held in memory as torch tensors.

    Attributes:
        train_x, test_x: float32 inputs of shape ``(N, *input_shape)``, normalised (see module doc).
        train_y, test_y: int64 labels in ``[0, num_classes)``.
        num_classes: number of classes.
        input_shape: shape of one example, channels first (``(1, 40)``, ``(1, 28, 28)``, ``(3, 32, 32)``).
        name: canonical data-set name.
        val_x, val_y: the validation split carved from the training set (``None`` if
            ``val_fraction == 0``).
        meta: provenance: normalisation constants, the directory or cache file read, split seed.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: Tuple[int, ...]
    name: str
    val_x: Optional[torch.Tensor] = None
    val_y: Optional[torch.Tensor] = None
    meta: Dict[str, object] = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        nval = 0 if self.val_x is None else len(self.val_x)
        return (f"ArrayDataset({self.name!r}, train={len(self.train_x)}, val={nval}, "
                f"test={len(self.test_x)}, input_shape={self.input_shape}, "
                f"num_classes={self.num_classes})")


# --------------------------------------------------------------------------------------------
# directories


def cache_dir() -> Path:
    """The user cache: ``$XDG_CACHE_HOME/pmptrain`` if set, else ``~/.cache/pmptrain``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "pmptrain"


def search_dirs(name: str, data_dir: Optional[os.PathLike] = None) -> List[Tuple[Path, str]]:
    """Directories searched for data set ``name``, in order, each with where it came from.

    Each root (``data_dir``, ``$PMPTRAIN_DATA``) is tried with a ``<name>/`` sub-directory,
    then as given; then the Debian location (fashion-mnist), then ``cache_dir()/<name>``.
    """
    name = _canonical(name)
    out: List[Tuple[Path, str]] = []
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        out += [(root / name, "--data-dir"), (root, "--data-dir")]
    env = os.environ.get("PMPTRAIN_DATA")
    if env:
        root = Path(env).expanduser()
        out += [(root / name, "$PMPTRAIN_DATA"), (root, "$PMPTRAIN_DATA")]
    for d in DEBIAN_DIRS.get(name, ()):
        out.append((Path(d), f"Debian package {_DEBIAN_PACKAGE.get(name, '')}".strip()))
    out.append((cache_dir() / name, "user cache"))
    return out


def _download_root(name: str, data_dir: Optional[os.PathLike]) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser() / name
    env = os.environ.get("PMPTRAIN_DATA")
    if env:
        return Path(env).expanduser() / name
    return cache_dir() / name


def _find_files(name: str, d: Path) -> Optional[Dict[str, Path]]:
    """The files of ``name`` in ``d`` (a dict role → path) if all are there, else ``None``."""
    if not d.is_dir():
        return None
    found: Dict[str, Path] = {}
    if name in ("mnist", "fashion-mnist"):
        for base in _IDX_FILES:
            for cand in (d / (base + ".gz"), d / base):
                if cand.is_file():
                    found[base] = cand
                    break
            else:
                return None
    elif name == "cifar10":
        ext = d / _CIFAR_DIR
        if all((ext / b).is_file() for b in _CIFAR_BATCHES):
            found["batches"] = ext
        elif (d / "cifar-10-python.tar.gz").is_file():
            found["batches"] = d / "cifar-10-python.tar.gz"
        else:
            return None
    elif name == "svhn":
        for split in ("train", "test"):
            p = d / f"{split}_32x32.mat"
            if not p.is_file():
                return None
            found[split] = p
    return found


def _expected_files(name: str) -> str:
    if name in ("mnist", "fashion-mnist"):
        return ", ".join(b + "[.gz]" for b in _IDX_FILES)
    if name == "cifar10":
        return f"{_CIFAR_DIR}/ (extracted) or cifar-10-python.tar.gz"
    return "train_32x32.mat, test_32x32.mat"


def _not_found_message(name: str, searched: List[Tuple[Path, str]], target: Path,
                       extra: str = "") -> str:
    lines = [f"data set {name!r} not found: looked for {_expected_files(name)} in"]
    lines += [f"  - {p}  ({why}{'' if p.is_dir() else ', does not exist'})" for p, why in searched]
    lines.append("To get it:")
    if name in _DEBIAN_PACKAGE:
        lines.append(f"  - on Debian/Ubuntu: apt-get install {_DEBIAN_PACKAGE[name]}")
    urls = ", ".join(r.urls[0] for r in RESOURCES[name])
    lines.append(f"  - copy the files ({urls}) into one of the directories above, or set $PMPTRAIN_DATA;")
    lines.append(f"  - or allow downloading (--download, download=True or $PMPTRAIN_DOWNLOAD=1): "
                 f"files go to {target} and are checked against their published MD5.")
    if extra:
        lines.append(extra)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# download


def file_md5(path: os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex MD5 digest of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _urlopen_fetch(url: str, out: io.BufferedWriter, desc: str) -> None:
    """Default fetcher: stream ``url`` into ``out`` with a tqdm bar (quiet when not a TTY)."""
    import sys

    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=30) as resp:  # noqa: S310 (fixed official URLs)
        total = resp.headers.get("Content-Length")
        with tqdm(total=int(total) if total else None, unit="B", unit_scale=True, desc=desc,
                  disable=not sys.stderr.isatty(), leave=False) as bar:
            for block in iter(lambda: resp.read(1 << 16), b""):
                out.write(block)
                bar.update(len(block))


Fetch = Callable[[str, io.BufferedWriter, str], None]


def download_resource(resource: Resource, dest_dir: os.PathLike, fetch: Optional[Fetch] = None) -> Path:
    """Download ``resource`` into ``dest_dir`` atomically and verify its MD5.

    Each URL in ``resource.urls`` is tried in order. The bytes go to a temporary file in
    ``dest_dir``, which is renamed to ``resource.filename`` only after its MD5 equals
    ``resource.md5``; a mismatch deletes the temporary file and raises :class:`ChecksumError`.

    Args:
        resource: what to fetch.
        dest_dir: target directory (created if needed).
        fetch: ``fetch(url, binary_file, description)`` writing the body to the file; default
            streams with :mod:`urllib` and a tqdm progress bar. Tests pass a local fake.

    Returns:
        The final path. Raises :class:`DataError` if every URL failed.
    """
    fetch = fetch or _urlopen_fetch
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / resource.filename
    errors = []
    for url in resource.urls:
        def verify(tmp: str, url: str = url) -> None:
            got = file_md5(tmp)
            if got != resource.md5:
                raise ChecksumError(
                    f"{resource.filename}: MD5 {got} of the file downloaded from {url} differs from "
                    f"the published {resource.md5}; the file was removed")

        try:
            with atomic_write(final, verify=verify) as f:
                fetch(url, f, resource.filename)
            return final
        except ChecksumError:
            raise
        except Exception as e:  # network/OS errors: try the next mirror
            errors.append(f"{url}: {e}")
    raise DataError(f"could not download {resource.filename}:\n  " + "\n  ".join(errors))


def _download_allowed(download: Optional[bool]) -> bool:
    if download is None:
        return os.environ.get("PMPTRAIN_DOWNLOAD", "0").strip().lower() in ("1", "true", "yes")
    return bool(download)


def _locate(name: str, data_dir: Optional[os.PathLike], download: Optional[bool],
            fetch: Optional[Fetch]) -> Tuple[Dict[str, Path], Path]:
    searched = search_dirs(name, data_dir)
    for d, _ in searched:
        files = _find_files(name, d)
        if files is not None:
            return files, d
    target = _download_root(name, data_dir)
    if not _download_allowed(download):
        raise DatasetNotFoundError(_not_found_message(name, searched, target))
    try:
        for res in RESOURCES[name]:
            if not (target / res.filename).is_file():
                download_resource(res, target, fetch)
    except ChecksumError:
        raise
    except DataError as e:
        raise DatasetNotFoundError(_not_found_message(name, searched, target, f"Download failed: {e}")) from e
    files = _find_files(name, target)
    if files is None:  # pragma: no cover - download_resource guarantees the files
        raise DatasetNotFoundError(_not_found_message(name, searched, target))
    return files, target


# --------------------------------------------------------------------------------------------
# readers

# IDX dtype codes (LeCun's format description): code -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    """Whole file contents, gunzipped if the file is gzip (by magic, not by suffix)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            return gzip.decompress(raw)
        return raw
    except (EOFError, OSError, zlib.error) as e:
        raise CorruptDataError(f"{path}: cannot decompress ({e}); the file is truncated or corrupt") from e


def read_idx(path: os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip), validating its header against its length.

    Format: two zero bytes, a dtype code (0x08 ubyte, 0x09 byte, 0x0B short, 0x0C int,
    0x0D float, 0x0E double), the number of dimensions ``n``, ``n`` big-endian uint32 sizes,
    then the data in C order, big-endian.

    Returns:
        The array in native byte order. Raises :class:`CorruptDataError` naming the file if the
        magic, dtype code or dimensions are invalid or the payload length does not match.
    """
    path = Path(path)
    buf = _read_bytes(path)
    if len(buf) < 4:
        raise CorruptDataError(f"{path}: {len(buf)} bytes, too short for an IDX header")
    if buf[0] != 0 or buf[1] != 0:
        raise CorruptDataError(f"{path}: bad IDX magic {buf[:4].hex()} (must start with 0000)")
    code, ndim = buf[2], buf[3]
    if code not in _IDX_DTYPES:
        raise CorruptDataError(f"{path}: unknown IDX dtype code 0x{code:02x}")
    if ndim == 0:
        raise CorruptDataError(f"{path}: IDX header declares 0 dimensions")
    head = 4 + 4 * ndim
    if len(buf) < head:
        raise CorruptDataError(f"{path}: truncated IDX header ({len(buf)} < {head} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(buf, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = head + math.prod(dims) * dtype.itemsize
    if len(buf) != expected:
        raise CorruptDataError(
            f"{path}: IDX dims {dims} of {dtype} need {expected} bytes, file has {len(buf)} "
            f"({'truncated' if len(buf) < expected else 'trailing bytes'})")
    arr = np.frombuffer(buf, dtype, offset=head).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def _check_labels(path: object, y: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    if y.ndim != 1 or len(y) != n:
        raise CorruptDataError(f"{path}: {y.shape} labels for {n} images")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise CorruptDataError(f"{path}: labels outside [0, {num_classes}): min {y.min()}, max {y.max()}")
    return y.astype(np.int64)


def _read_idx_pair(images: Path, labels: Path) -> Tuple[np.ndarray, np.ndarray]:
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
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or x.shape[0] > _CIFAR_BATCH_ROWS:
        raise CorruptDataError(f"{where}: data must be uint8 (N ≤ {_CIFAR_BATCH_ROWS}, 3072), got {x.dtype} {x.shape}")
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
        for b in _CIFAR_BATCHES:
            p = path / b
            if not p.is_file():
                raise CorruptDataError(f"{path}: missing CIFAR-10 batch {b}")
            blobs[b] = p.read_bytes()
    else:
        try:
            with tarfile.open(path, "r:*") as tar:
                members = {m.name.split("/")[-1]: m for m in tar.getmembers() if m.isfile()}
                for b in _CIFAR_BATCHES:
                    if b not in members:
                        raise CorruptDataError(f"{path}: tarball lacks {_CIFAR_DIR}/{b}")
                    f = tar.extractfile(members[b])
                    blobs[b] = f.read()
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise CorruptDataError(f"{path}: unreadable tarball ({e}); truncated or corrupt") from e
    parts = [_load_cifar_batch(blobs[b], f"{path}:{b}") for b in _CIFAR_BATCHES]
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


# --------------------------------------------------------------------------------------------
# per-data-set loaders → (train_x, train_y, test_x, test_y, source)


def _normalise(x: np.ndarray, name: str) -> torch.Tensor:
    mean, std = NORMALIZATION[name]
    t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).div_(255.0)
    shape = (1, -1) + (1,) * (t.dim() - 2)
    return (t - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


def _mnist1d_arrays(num_samples: int, seed: int) -> Tuple[Dict[str, np.ndarray], str]:
    path = cache_dir() / "mnist1d" / f"mnist1d_n{num_samples}_seed{seed}.npz"
    keys = ("x", "y", "x_test", "y_test")
    if path.is_file():
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in keys}
            return arrays, str(path)
        except Exception:
            pass  # unreadable cache: regenerate and overwrite
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    # make_dataset reseeds the global `random` and numpy generators: keep the caller's streams.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    arrays = {k: np.asarray(d[k]) for k in keys}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            np.savez(f, **arrays)
    except OSError:
        pass  # a read-only cache only costs the ~1 s regeneration
    return arrays, f"mnist1d.make_dataset(num_samples={num_samples}, seed={seed})"


def _load_raw(name: str, data_dir, download, fetch, mnist1d_samples: int, mnist1d_seed: int):
    if name == "mnist1d":
        a, src = _mnist1d_arrays(mnist1d_samples, mnist1d_seed)
        tx = torch.from_numpy(a["x"]).to(torch.float32).unsqueeze(1)
        vx = torch.from_numpy(a["x_test"]).to(torch.float32).unsqueeze(1)
        return tx, torch.from_numpy(a["y"]).long(), vx, torch.from_numpy(a["y_test"]).long(), src
    files, where = _locate(name, data_dir, download, fetch)
    if name in ("mnist", "fashion-mnist"):
        trx, try_ = _read_idx_pair(files[_IDX_FILES[0]], files[_IDX_FILES[1]])
        tex, tey = _read_idx_pair(files[_IDX_FILES[2]], files[_IDX_FILES[3]])
        trx, tex = trx[:, None], tex[:, None]
    elif name == "cifar10":
        trx, try_, tex, tey = read_cifar10(files["batches"])
    else:
        trx, try_ = read_svhn(files["train"])
        tex, tey = read_svhn(files["test"])
    return (_normalise(trx, name), torch.from_numpy(try_), _normalise(tex, name),
            torch.from_numpy(tey), str(where))


def load_dataset(
    name: str = "mnist1d",
    data_dir: Optional[os.PathLike] = None,
    download: Optional[bool] = None,
    val_fraction: float = 0.0,
    split_seed: int = 0,
    max_train: Optional[int] = None,
    max_test: Optional[int] = None,
    fetch: Optional[Fetch] = None,
    mnist1d_samples: int = 5000,
    mnist1d_seed: int = 42,
) -> ArrayDataset:
    """Load a data set by name into memory as normalised tensors.

    Args:
        name: one of ``DATASETS`` (aliases like ``mnist-1d``, ``fashion_mnist``, ``cifar-10``
            accepted). Default ``"mnist1d"``.
        data_dir: first directory searched (``--data-dir``); default ``None``. MNIST-1D ignores
            ``data_dir``, ``download`` and ``fetch`` (it is generated, cached in ``cache_dir()``).
        download: fetch missing files from the official URLs (MD5-checked). ``None`` (default)
            means "only if ``$PMPTRAIN_DOWNLOAD`` is 1/true/yes".
        val_fraction: fraction in ``[0, 1)`` of the training set moved to ``val_x/val_y``,
            chosen by a permutation seeded with ``split_seed``; default 0 (no validation set).
        split_seed: seed of that permutation; default 0. The split does not depend on torch's
            global RNG.
        max_train, max_test: keep only the first ``n`` training (after the split) / test
            examples, for smoke runs; default ``None`` (all).
        fetch: custom downloader ``fetch(url, binary_file, description)``; default urllib + tqdm.
        mnist1d_samples, mnist1d_seed: generator arguments of MNIST-1D (default 5000 examples,
            80/20 train/test as in the mnist1d package, seed 42 — the package defaults).

    Returns:
        An :class:`ArrayDataset`.

    Raises:
        ValueError: bad argument (named). DatasetNotFoundError: files absent and not downloaded.
        CorruptDataError / ChecksumError: unreadable or mismatching files.
    """
    name = _canonical(name)
    if not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    for arg, v in (("max_train", max_train), ("max_test", max_test)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"{arg} must be a positive int or None, got {v!r}")
    if not isinstance(mnist1d_samples, int) or mnist1d_samples < 10:
        raise ValueError(f"mnist1d_samples must be an int >= 10, got {mnist1d_samples!r}")

    train_x, train_y, test_x, test_y, source = _load_raw(
        name, data_dir, download, fetch, mnist1d_samples, mnist1d_seed)
    val_x = val_y = None
    if val_fraction > 0:
        n_val = int(round(len(train_x) * val_fraction))
        if not 0 < n_val < len(train_x):
            raise ValueError(f"val_fraction={val_fraction} leaves an empty train or val split "
                             f"of {len(train_x)} examples")
        perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(split_seed))
        vidx, tidx = perm[:n_val].sort().values, perm[n_val:].sort().values
        val_x, val_y = train_x[vidx], train_y[vidx]
        train_x, train_y = train_x[tidx], train_y[tidx]
    if max_train is not None:
        train_x, train_y = train_x[:max_train], train_y[:max_train]
    if max_test is not None:
        test_x, test_y = test_x[:max_test], test_y[:max_test]
    mean, std = NORMALIZATION[name]
    return ArrayDataset(
        train_x=train_x.contiguous(), train_y=train_y.long(), test_x=test_x.contiguous(),
        test_y=test_y.long(), num_classes=10, input_shape=tuple(train_x.shape[1:]), name=name,
        val_x=val_x, val_y=val_y,
        meta={"source": source, "mean": mean, "std": std, "val_fraction": val_fraction,
              "split_seed": split_seed},
    )


# --------------------------------------------------------------------------------------------
# batches


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed mixing ``seed`` and ``epoch`` (SplitMix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 64)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return (z ^ (z >> 31)) >> 1


class BatchLoader:
    """Iterable over ``(x_batch, y_batch)`` shards of seeded global batches.

    The global order is ``randperm(N)`` from a generator seeded by ``(seed, epoch)`` (natural
    order if not shuffled), cut into global batches of ``batch_size``. With ``world_size > 1``
    each global batch is split into ``world_size`` contiguous shards (``torch.tensor_split``;
    sizes differ by at most one) and rank ``r`` yields shard ``r``, so the ranks' shards are
    disjoint and their union is exactly the single-process batch. Use
    :meth:`global_batch_size` to weight per-rank losses (sum / global size) so that averaged
    gradients equal the single-process ones. Independent of torch's global RNG.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = True,
                 seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False):
        if len(x) != len(y):
            raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        if batch_size < world_size:
            raise ValueError(f"batch_size={batch_size} must be >= world_size={world_size} "
                             "(batch_size is the global batch, split across ranks)")
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, epoch
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (as ``DistributedSampler.set_epoch``)."""
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self) -> torch.Tensor:
        """The global index order of this epoch."""
        n = len(self.x)
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        return torch.randperm(n, generator=g)

    def global_batches(self) -> List[torch.Tensor]:
        """Index tensors of this epoch's global batches (identical on every rank)."""
        batches = list(torch.split(self.order(), self.batch_size))
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def global_batch_size(self, i: int) -> int:
        """Size of global batch ``i`` (sum of all ranks' shard sizes)."""
        return len(self.global_batches()[i])

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for idx in self.global_batches():
            if self.world_size > 1:
                idx = torch.tensor_split(idx, self.world_size)[self.rank]
            yield self.x[idx], self.y[idx]


def make_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = True,
                seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                drop_last: bool = False) -> BatchLoader:
    """Seeded batch iterator over in-memory tensors, optionally sharded across ranks.

    Args:
        x, y: inputs and labels (same first dimension).
        batch_size: the *global* batch size; default none (required).
        shuffle: permute each epoch (default True); deterministic per ``(seed, epoch)``.
        seed, epoch: select the permutation (defaults 0, 0); change ``epoch`` each epoch, or call
            ``set_epoch``.
        rank, world_size: this process's shard (defaults 0, 1); see :class:`BatchLoader`.
        drop_last: drop a final incomplete global batch (default False).
    """
    return BatchLoader(x, y, batch_size, shuffle, seed, epoch, rank, world_size, drop_last)
