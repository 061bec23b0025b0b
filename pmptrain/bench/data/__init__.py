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
import os
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from .catalog import IDX_FILES, DATASETS, NORMALIZATION, RESOURCES, Resource, canonical_name
from .errors import ChecksumError, CorruptDataError, DataError, DatasetNotFoundError
from .loader import BatchLoader, make_loader
from .sources import Fetch, locate, cache_dir, download_resource, file_md5, search_dirs
from .mnist1d import mnist1d_arrays
from .readers import read_idx_pair, read_cifar10, read_idx, read_svhn

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
# per-data-set loaders → (train_x, train_y, test_x, test_y, source)


def _normalise(x: np.ndarray, name: str) -> torch.Tensor:
    mean, std = NORMALIZATION[name]
    t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).div_(255.0)
    shape = (1, -1) + (1,) * (t.dim() - 2)
    return (t - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


def _load_raw(name: str, data_dir, download, fetch, mnist1d_samples: int, mnist1d_seed: int):
    if name == "mnist1d":
        a, src = mnist1d_arrays(mnist1d_samples, mnist1d_seed)
        tx = torch.from_numpy(a["x"]).to(torch.float32).unsqueeze(1)
        vx = torch.from_numpy(a["x_test"]).to(torch.float32).unsqueeze(1)
        return tx, torch.from_numpy(a["y"]).long(), vx, torch.from_numpy(a["y_test"]).long(), src
    files, where = locate(name, data_dir, download, fetch)
    if name in ("mnist", "fashion-mnist"):
        trx, try_ = read_idx_pair(files[IDX_FILES[0]], files[IDX_FILES[1]])
        tex, tey = read_idx_pair(files[IDX_FILES[2]], files[IDX_FILES[3]])
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
    name = canonical_name(name)
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
