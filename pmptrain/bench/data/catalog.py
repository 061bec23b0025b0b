"""The data-set catalog: canonical names and aliases, normalisation constants, the official
files with their MD5s, and the file names each reader expects."""

from __future__ import annotations

import dataclasses
from typing import Dict, Sequence, Tuple


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

#: Shape of one example of each data set, channels first (what :func:`load_dataset` gives), known
#: before anything is loaded: the bench sizes its model with it while validating the configuration.
INPUT_SHAPES: Dict[str, Tuple[int, ...]] = {
    "mnist1d": (1, 40), "mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32),
    "svhn": (3, 32, 32),
}

DEBIAN_PACKAGE = {"fashion-mnist": "dataset-fashion-mnist"}
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

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_BATCH_ROWS = 10000  # images per file of the python distribution (5 train batches + test)
CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def canonical_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in _ALIASES:
        raise ValueError(f"name: unknown data set {name!r}; valid names: {', '.join(DATASETS)}")
    return _ALIASES[name.lower()]
