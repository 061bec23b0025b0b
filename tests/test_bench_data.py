"""Tests of pmptrain.bench.data on small files the tests write themselves (no network)."""

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pmptrain.bench import data as D
from pmptrain.bench.data import catalog, readers, sources


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Empty cache, no $PMPTRAIN_DATA, no Debian dirs, downloads off unless a test enables them."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("PMPTRAIN_DATA", raising=False)
    monkeypatch.delenv("PMPTRAIN_DOWNLOAD", raising=False)
    monkeypatch.setattr(sources, "DEBIAN_DIRS", {"fashion-mnist": (str(tmp_path / "debian-fmnist"),)})


# ------------------------------------------------------------------ writers of tiny test files


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    dt = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[code]
    head = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(dt).tobytes()


def write_idx_set(d: Path, n_train=6, n_test=4, seed=0, gz=True):
    """Write the four MNIST-style IDX files; return the arrays written."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, a in arrays.items():
        raw = idx_bytes(a)
        if gz:
            (d / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (d / name).write_bytes(raw)
    return arrays


def cifar_blob(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    y = [int(v) for v in rng.integers(0, 10, n)]
    return pickle.dumps({b"batch_label": b"x", b"labels": y, b"data": x}, protocol=2), x, y


def write_cifar_tarball(path: Path, n=3):
    path.parent.mkdir(parents=True, exist_ok=True)
    written = {}
    with tarfile.open(path, "w:gz") as tar:
        for i, b in enumerate(catalog.CIFAR_BATCHES):
            blob, x, y = cifar_blob(n, i)
            written[b] = (x, y)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{b}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return written


# ------------------------------------------------------------------ IDX


def test_idx_roundtrip_gz_and_raw(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(a)))
    (tmp_path / "a").write_bytes(idx_bytes(a))
    np.testing.assert_array_equal(D.read_idx(tmp_path / "a.gz"), a)
    np.testing.assert_array_equal(D.read_idx(tmp_path / "a"), a)
    f = np.array([[0.0, -1.5], [2.25, 3.0]], dtype=np.float32)
    (tmp_path / "f").write_bytes(idx_bytes(f, 0x0D))
    np.testing.assert_array_equal(D.read_idx(tmp_path / "f"), f)


@pytest.mark.parametrize("damage", ["truncated", "trailing", "magic", "dtype", "gz-truncated"])
def test_idx_corrupt(tmp_path, damage):
    raw = idx_bytes(np.zeros((3, 28, 28), np.uint8))
    p = tmp_path / "bad-idx"
    if damage == "truncated":
        p.write_bytes(raw[:-5])
    elif damage == "trailing":
        p.write_bytes(raw + b"\0")
    elif damage == "magic":
        p.write_bytes(b"\x01" + raw[1:])
    elif damage == "dtype":
        p.write_bytes(raw[:2] + b"\x07" + raw[3:])
    else:
        p.write_bytes(gzip.compress(raw)[:-20])
    with pytest.raises(D.CorruptDataError, match="bad-idx"):
        D.read_idx(p)


def test_load_idx_dataset_values_and_normalisation(tmp_path):
    arrays = write_idx_set(tmp_path / "fm", gz=False)
    ds = D.load_dataset("fashion-mnist", data_dir=tmp_path / "fm")
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    mean, std = D.NORMALIZATION["fashion-mnist"]
    pix = ds.train_x[:, 0] * std[0] + mean[0]
    np.testing.assert_allclose((pix * 255).round().numpy(), arrays["train-images-idx3-ubyte"], atol=0)
    np.testing.assert_array_equal(ds.test_y.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_idx_dataset_bad_labels_and_shapes(tmp_path):
    d = tmp_path / "mnist"
    write_idx_set(d)
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.full(6, 11, np.uint8))))
    with pytest.raises(D.CorruptDataError, match="labels"):
        D.load_dataset("mnist", data_dir=tmp_path)
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(5, np.uint8))))
    with pytest.raises(D.CorruptDataError, match="labels for 6 images"):
        D.load_dataset("mnist", data_dir=tmp_path)


# ------------------------------------------------------------------ lookup order and errors


def test_lookup_order(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "arg" / "fashion-mnist", seed=1)
    write_idx_set(tmp_path / "env", seed=2)
    write_idx_set(tmp_path / "debian-fmnist", seed=3)
    write_idx_set(tmp_path / "xdg" / "pmptrain" / "fashion-mnist", seed=4)
    monkeypatch.setenv("PMPTRAIN_DATA", str(tmp_path / "env"))

    def source(**kw):
        return Path(D.load_dataset("fashion-mnist", **kw).meta["source"])

    assert source(data_dir=tmp_path / "arg") == tmp_path / "arg" / "fashion-mnist"
    assert source() == tmp_path / "env"
    monkeypatch.delenv("PMPTRAIN_DATA")
    assert source() == tmp_path / "debian-fmnist"
    monkeypatch.setattr(sources, "DEBIAN_DIRS", {})
    assert source() == tmp_path / "xdg" / "pmptrain" / "fashion-mnist"


def test_not_found_lists_directories(tmp_path, monkeypatch):
    monkeypatch.setenv("PMPTRAIN_DATA", str(tmp_path / "env"))
    with pytest.raises(D.DatasetNotFoundError) as e:
        D.load_dataset("fashion-mnist", data_dir=tmp_path / "arg", download=False)
    msg = str(e.value)
    for where in (tmp_path / "arg", tmp_path / "env", tmp_path / "debian-fmnist",
                  tmp_path / "xdg" / "pmptrain" / "fashion-mnist"):
        assert str(where) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--download" in msg


def test_unknown_name_and_bad_args():
    with pytest.raises(ValueError, match="fashion-mnist"):
        D.load_dataset("imagenet")
    with pytest.raises(ValueError, match="val_fraction"):
        D.load_dataset("mnist1d", val_fraction=1.0)


# ------------------------------------------------------------------ download


def fake_fetch_from(files):
    """A fetch function serving bytes from a dict filename -> bytes (instead of the network)."""
    calls = []

    def fetch(url, out, desc):
        calls.append(url)
        out.write(files[url.rsplit("/", 1)[-1]])

    fetch.calls = calls
    return fetch


def test_download_checksum_ok_and_mismatch(tmp_path, monkeypatch):
    src = write_idx_set(tmp_path / "src")
    blobs = {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()}
    res = tuple(D.Resource(f, (f"https://example.invalid/{f}",), hashlib.md5(b).hexdigest())
                for f, b in blobs.items())
    monkeypatch.setitem(D.RESOURCES, "mnist", res)
    fetch = fake_fetch_from(blobs)
    ds = D.load_dataset("mnist", data_dir=tmp_path / "root", download=True, fetch=fetch)
    assert len(fetch.calls) == 4 and len(ds.train_x) == 6
    assert sorted(os.listdir(tmp_path / "root" / "mnist")) == sorted(blobs)  # no temp files left
    np.testing.assert_array_equal(ds.train_y.numpy(), src["train-labels-idx1-ubyte"])

    bad = tuple(D.Resource(r.filename, r.urls, "0" * 32) for r in res)
    monkeypatch.setitem(D.RESOURCES, "mnist", bad)
    with pytest.raises(D.ChecksumError, match="differs from the published"):
        D.load_dataset("mnist", data_dir=tmp_path / "root2", download=True, fetch=fetch)
    assert os.listdir(tmp_path / "root2" / "mnist") == []  # mismatching file removed


def test_download_file_url(tmp_path):
    """The default fetcher works with file:// URLs (no network) and tries mirrors in order."""
    payload = b"hello" * 100
    (tmp_path / "blob").write_bytes(payload)
    res = D.Resource("blob", ((tmp_path / "missing").as_uri(), (tmp_path / "blob").as_uri()),
                     hashlib.md5(payload).hexdigest())
    out = D.download_resource(res, tmp_path / "dst")
    assert out.read_bytes() == payload
    res_bad = D.Resource("blob", ((tmp_path / "blob").as_uri(),), "f" * 32)
    with pytest.raises(D.ChecksumError):
        D.download_resource(res_bad, tmp_path / "dst2")
    assert not (tmp_path / "dst2" / "blob").exists()


def test_download_env_switch_and_failure(tmp_path, monkeypatch):
    def failing(url, out, desc):
        raise OSError("network unreachable")

    with pytest.raises(D.DatasetNotFoundError, match="network unreachable"):
        D.load_dataset("mnist", download=True, fetch=failing)
    monkeypatch.setenv("PMPTRAIN_DOWNLOAD", "1")
    with pytest.raises(D.DatasetNotFoundError, match="Download failed"):
        D.load_dataset("mnist", fetch=failing)
    monkeypatch.setenv("PMPTRAIN_DOWNLOAD", "0")
    with pytest.raises(D.DatasetNotFoundError) as e:
        D.load_dataset("mnist", fetch=failing)
    assert "Download failed" not in str(e.value)


# ------------------------------------------------------------------ CIFAR-10 and SVHN


def test_cifar_tarball_and_directory(tmp_path):
    written = write_cifar_tarball(tmp_path / "c" / "cifar-10-python.tar.gz")
    ds = D.load_dataset("cifar10", data_dir=tmp_path / "c")
    assert ds.input_shape == (3, 32, 32) and len(ds.train_x) == 15 and len(ds.test_x) == 3
    x0, y0 = written["data_batch_1"]
    mean, std = D.NORMALIZATION["cifar10"]
    pix = ds.train_x[:3] * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    np.testing.assert_array_equal((pix * 255).round().to(torch.uint8).numpy().reshape(3, 3072), x0)
    assert ds.train_y[:3].tolist() == y0
    # the extracted directory gives the same arrays
    ext = tmp_path / "e" / "cifar-10-batches-py"
    ext.mkdir(parents=True)
    with tarfile.open(tmp_path / "c" / "cifar-10-python.tar.gz") as tar:
        for m in tar.getmembers():
            (ext / Path(m.name).name).write_bytes(tar.extractfile(m).read())
    a, b = D.read_cifar10(tmp_path / "e" / "cifar-10-batches-py"), D.read_cifar10(
        tmp_path / "c" / "cifar-10-python.tar.gz")
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def test_cifar_corrupt(tmp_path):
    p = tmp_path / "cifar-10-python.tar.gz"
    write_cifar_tarball(p)
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(D.CorruptDataError, match="cifar-10-python.tar.gz"):
        D.read_cifar10(p)
    # wrong shape inside a pickle
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for b in catalog.CIFAR_BATCHES:
        (d / b).write_bytes(cifar_blob(2, 0)[0])
    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8),
                                                 b"labels": [0, 1]}))
    with pytest.raises(D.CorruptDataError, match="test_batch"):
        D.read_cifar10(d)


def test_cifar_restricted_unpickler(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for b in catalog.CIFAR_BATCHES:
        (d / b).write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(D.CorruptDataError, match="refusing to load global"):
        D.read_cifar10(d)


@pytest.mark.parametrize("kind", ["data-list", "rows", "labels"])
def test_cifar_pickle_that_would_blow_up_is_refused_before_converting(tmp_path, kind, monkeypatch):
    """A pickle repeats one object by reference: 1500 references to one 200 KB row make a 200 KB
    file that np.asarray would turn into 307 MB. Refused before any conversion."""
    row = bytes(3072 * 66)  # ~200 KB
    if kind == "data-list":
        payload = {b"data": [row] * 1500, b"labels": [0] * 1500}
    elif kind == "rows":
        payload = {b"data": np.zeros((10001, 3072), np.uint8), b"labels": [0] * 10001}
    else:
        payload = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [[0] * 100000] * 2}
    blob = pickle.dumps(payload, protocol=2)
    if kind == "data-list":
        assert len(blob) < 300_000
    calls = []
    real = np.asarray
    monkeypatch.setattr(readers.np, "asarray", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(D.CorruptDataError, match="b'data'|data must be|b'labels'"):
        readers._load_cifar_batch(blob, "crafted")
    assert not calls


def test_svhn_mat(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(0)
    d = tmp_path / "svhn"
    d.mkdir()
    arrays = {}
    for split, n in (("train", 5), ("test", 3)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [1], [9], [10], [3]][:n], dtype=np.uint8)
        scipy_io.savemat(d / f"{split}_32x32.mat", {"X": x, "y": y})
        arrays[split] = (x, y)
    x, y = D.read_svhn(d / "train_32x32.mat")
    np.testing.assert_array_equal(x, arrays["train"][0].transpose(3, 2, 0, 1))
    assert y.tolist() == [0, 1, 9, 0, 3]
    ds = D.load_dataset("svhn", data_dir=tmp_path)
    assert ds.input_shape == (3, 32, 32) and len(ds.train_x) == 5 and len(ds.test_x) == 3
    (d / "test_32x32.mat").write_bytes((d / "test_32x32.mat").read_bytes()[:200])
    with pytest.raises(D.CorruptDataError, match="test_32x32.mat"):
        D.load_dataset("svhn", data_dir=tmp_path)


# ------------------------------------------------------------------ MNIST-1D and splits


def test_mnist1d_cached_and_split():
    import random

    random.seed(5)
    np.random.seed(5)
    before = (random.random(), np.random.rand())
    random.seed(5)
    np.random.seed(5)
    ds = D.load_dataset("mnist1d", val_fraction=0.1, split_seed=3)
    assert (random.random(), np.random.rand()) == before  # caller's RNG streams untouched
    assert ds.input_shape == (1, 40) and len(ds.train_x) == 3600 and len(ds.val_x) == 400
    assert len(ds.test_x) == 1000 and ds.train_x.dtype == torch.float32
    assert (D.cache_dir() / "mnist1d").is_dir()
    again = D.load_dataset("mnist1d", val_fraction=0.1, split_seed=3)  # from the npz cache
    assert torch.equal(ds.val_x, again.val_x) and torch.equal(ds.train_y, again.train_y)
    other = D.load_dataset("mnist1d", val_fraction=0.1, split_seed=4, max_train=10)
    assert not torch.equal(ds.val_y, other.val_y) and len(other.train_x) == 10
    full = D.load_dataset("mnist1d")
    # the split is a partition of the training set
    merged = torch.cat([ds.train_x, ds.val_x]).flatten(1)
    assert torch.equal(merged[torch.argsort(merged[:, 0])], full.train_x.flatten(1)[
        torch.argsort(full.train_x.flatten(1)[:, 0])])


# ------------------------------------------------------------------ loader


def order_of(loader):
    return torch.cat([y for _, y in loader])


def test_loader_determinism():
    x = torch.arange(50).float().unsqueeze(1)
    y = torch.arange(50)
    a = order_of(D.make_loader(x, y, 8, seed=1, epoch=2))
    b = order_of(D.make_loader(x, y, 8, seed=1, epoch=2))
    c = order_of(D.make_loader(x, y, 8, seed=1, epoch=3))
    d = order_of(D.make_loader(x, y, 8, seed=2, epoch=2))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    assert sorted(a.tolist()) == list(range(50))
    torch.manual_seed(0)  # independent of the global RNG
    assert torch.equal(a, order_of(D.make_loader(x, y, 8, seed=1, epoch=2)))
    assert torch.equal(order_of(D.make_loader(x, y, 8, shuffle=False)), y)
    loader = D.make_loader(x, y, 8, seed=1, drop_last=True)
    assert len(loader) == 6 and len(list(loader)) == 6 and len(D.make_loader(x, y, 8)) == 7
    loader.set_epoch(3)
    assert torch.equal(order_of(loader), c[:48])


@pytest.mark.parametrize("world_size,n,bs", [(2, 50, 8), (3, 50, 9), (2, 7, 4)])
def test_loader_rank_sharding(world_size, n, bs):
    x = torch.arange(n).float().unsqueeze(1)
    y = torch.arange(n)
    single = [yb for _, yb in D.make_loader(x, y, bs, seed=7, epoch=1)]
    shards = [[yb for _, yb in D.make_loader(x, y, bs, seed=7, epoch=1, rank=r, world_size=world_size)]
              for r in range(world_size)]
    assert all(len(s) == len(single) for s in shards)
    for i, batch in enumerate(single):
        parts = [s[i] for s in shards]
        assert torch.equal(torch.cat(parts), batch)  # union (in rank order) == global batch
        assert sum(len(p) for p in parts) == D.make_loader(x, y, bs, seed=7, epoch=1).global_batch_size(i)
        assert len(set(torch.cat(parts).tolist())) == len(batch)  # disjoint


def test_loader_bad_args():
    x, y = torch.zeros(4, 1), torch.zeros(4)
    with pytest.raises(ValueError, match="rank"):
        D.make_loader(x, y, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        D.make_loader(x, y, 0)
    with pytest.raises(ValueError, match="same length"):
        D.make_loader(x, y[:3], 2)


# ------------------------------------------------------------------ the real Debian copy


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file(),
                    reason="dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist(monkeypatch):
    monkeypatch.setattr(sources, "DEBIAN_DIRS", {"fashion-mnist": ("/usr/share/datasets/fashion-mnist",)})
    ds = D.load_dataset("fashion-mnist")
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_y.bincount().tolist() == [6000] * 10
    assert abs(float(ds.train_x.mean())) < 1e-2 and abs(float(ds.train_x.std()) - 1) < 1e-2
