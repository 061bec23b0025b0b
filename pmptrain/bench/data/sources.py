"""Where a data set's files are found, and how missing ones are downloaded (MD5-checked, atomic).

The lookup order is stated in :mod:`pmptrain.bench.data`."""

from __future__ import annotations

import hashlib
import io
import os
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from ..._io import atomic_write
from .catalog import CIFAR_BATCHES, CIFAR_DIR, DEBIAN_PACKAGE, IDX_FILES, DEBIAN_DIRS, RESOURCES, Resource, canonical_name
from .errors import ChecksumError, DataError, DatasetNotFoundError

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
    name = canonical_name(name)
    out: List[Tuple[Path, str]] = []
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        out += [(root / name, "--data-dir"), (root, "--data-dir")]
    env = os.environ.get("PMPTRAIN_DATA")
    if env:
        root = Path(env).expanduser()
        out += [(root / name, "$PMPTRAIN_DATA"), (root, "$PMPTRAIN_DATA")]
    for d in DEBIAN_DIRS.get(name, ()):
        out.append((Path(d), f"Debian package {DEBIAN_PACKAGE.get(name, '')}".strip()))
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
        for base in IDX_FILES:
            for cand in (d / (base + ".gz"), d / base):
                if cand.is_file():
                    found[base] = cand
                    break
            else:
                return None
    elif name == "cifar10":
        ext = d / CIFAR_DIR
        if all((ext / b).is_file() for b in CIFAR_BATCHES):
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


def _partial(name: str, d: Path) -> Optional[List[str]]:
    """The files of ``name`` missing from ``d`` when ``d`` holds some but not all of them, else None."""
    if not d.is_dir():
        return None
    if name in ("mnist", "fashion-mnist"):
        have = [b for b in IDX_FILES if (d / (b + ".gz")).is_file() or (d / b).is_file()]
        missing = [b + "[.gz]" for b in IDX_FILES if b not in have]
    elif name == "cifar10":
        have = [b for b in CIFAR_BATCHES if (d / CIFAR_DIR / b).is_file()]
        missing = [f"{CIFAR_DIR}/{b}" for b in CIFAR_BATCHES if b not in have]
    else:
        have = [s for s in ("train", "test") if (d / f"{s}_32x32.mat").is_file()]
        missing = [f"{s}_32x32.mat" for s in ("train", "test") if s not in have]
    return missing if have and missing else None


def _expected_files(name: str) -> str:
    if name in ("mnist", "fashion-mnist"):
        return ", ".join(b + "[.gz]" for b in IDX_FILES)
    if name == "cifar10":
        return f"{CIFAR_DIR}/ (extracted) or cifar-10-python.tar.gz"
    return "train_32x32.mat, test_32x32.mat"


def _not_found_message(name: str, searched: List[Tuple[Path, str]], target: Path,
                       extra: str = "") -> str:
    lines = [f"data set {name!r} not found: looked for {_expected_files(name)} in"]
    lines += [f"  - {p}  ({why}{'' if p.is_dir() else ', does not exist'})" for p, why in searched]
    lines.append("To get it:")
    if name in DEBIAN_PACKAGE:
        lines.append(f"  - on Debian/Ubuntu: apt-get install {DEBIAN_PACKAGE[name]}")
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


def locate(name: str, data_dir: Optional[os.PathLike], download: Optional[bool],
            fetch: Optional[Fetch]) -> Tuple[Dict[str, Path], Path]:
    searched = search_dirs(name, data_dir)
    for d, why in searched:
        files = _find_files(name, d)
        if files is not None:
            return files, d
        missing = _partial(name, d) if why in ("--data-dir", "$PMPTRAIN_DATA") else None
        if missing:  # completing it from the next directory would mix two copies of the data set
            raise DataError(f"{why} {d} holds part of data set {name!r} but lacks {', '.join(missing)}; "
                            "add the missing files there (or remove the partial copy) rather than have them "
                            "taken from another directory")
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
