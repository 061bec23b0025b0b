"""Bit-packed export of discrete models, the loader, and the bits/bytes/compression summary.

File format (version 1, all integers little-endian)::

    offset 0   8 bytes   magic  b"PMPPACK\\0"
           8   u32       format version (1)
          12   u64       L = manifest length in bytes
          20   32 bytes  sha256 of the manifest bytes
          52   L bytes   manifest: UTF-8 JSON (below)
        52+L   P bytes   payload: the blobs, concatenated; the file ends exactly here

Manifest keys: ``format`` ("pmptrain-packed"), ``version``, ``byteorder`` ("little"),
``payload_nbytes`` (P), ``payload_sha256``, ``discrete`` (one entry per discrete weight: ``module``,
``key`` (its state_dict key), ``spec`` (grid values/name/bits, scale mode, train_scale), ``shape``,
``dtype``, ``bits``, ``numel``, ``offset``, ``nbytes``) and ``tensors`` (every other state_dict entry —
full-precision parameters, scales α, buffers such as BatchNorm statistics: ``key``, ``kind``,
``dtype``, ``shape``, ``offset``, ``nbytes``; raw native bytes). Offsets are relative to the payload.
A discrete blob holds the grid *indices* of the codes, bit-packed by
:func:`pmptrain.discrete.pack_codes` (LSB-first stream, ``ceil(numel·bits/8)`` bytes).

The file is written to a temporary file in the target directory and moved into place with
``os.replace`` (atomic on POSIX). Every structural problem on reading (short file, wrong magic,
unknown version, checksum mismatch, inconsistent offsets, bad JSON) raises :class:`PackedFileError`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import struct
import sys
from dataclasses import dataclass, field
from typing import List, Optional, TextIO

import torch
from torch import Tensor, nn

from ._io import atomic_write
from .discrete import grid_indices, pack_codes, packed_nbytes, unpack_codes
from .quant import DiscreteSpec, attach_discrete, discrete_parameters, is_discrete_module

__all__ = ["PackedFileError", "SummaryRow", "SummaryTable", "summary", "density", "DENSITY_CONVENTIONS",
           "export_packed", "load_packed", "packed_metadata"]

#: Denominators of :func:`density` / :meth:`SummaryTable.density`.
DENSITY_CONVENTIONS = ("discrete", "trainable")


def _check_convention(convention: str) -> None:
    if convention not in DENSITY_CONVENTIONS:
        raise ValueError(f"convention: expected 'discrete' or 'trainable', got {convention!r}")


def density(model: nn.Module, convention: str = "discrete") -> Optional[float]:
    """Fraction of non-zero discrete weights of ``model`` (None if it has no discrete weight).

    ``convention="discrete"`` (default): non-zero discrete codes / discrete codes.
    ``"trainable"``: non-zero discrete codes / *all* trainable parameters (``requires_grad``; BatchNorm
    affine, biases, scales and kept layers included) — the "sparsity fraction" the Li & Hao tables
    report (LiQianxiao/discrete-MSA ``utils.py``, ``get_sparsity_frac``: the denominator is
    ``tf.trainable_variables()``). Parameters shared between modules are counted once.
    """
    _check_convention(convention)
    dts = discrete_parameters(model)
    if not dts:
        return None
    nz = sum(int(torch.count_nonzero(d.param)) for d in dts)
    if convention == "discrete":
        den = sum(d.param.numel() for d in dts)
    else:
        den = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return nz / den if den else None

MAGIC = b"PMPPACK\x00"
VERSION = 1
_HEADER = struct.Struct("<8sIQ32s")  # magic, version, manifest length, manifest sha256


class PackedFileError(ValueError):
    """A packed file is corrupt, truncated, of another format or of an unsupported version."""


# ----------------------------------------------------------------------------------- summary


@dataclass
class SummaryRow:
    """One parameter tensor: ``grid`` is the grid name for discrete weights, else the dtype name.
    ``float32_bytes = 4·numel``; ``packed_bytes = ceil(numel·bits/8)`` (discrete) or the native size."""

    name: str
    shape: tuple
    grid: str
    bits: int
    numel: int
    float32_bytes: int
    packed_bytes: int
    discrete: bool
    nonzero: int = -1  # non-zero entries (-1: not counted)
    trainable: bool = True

    @property
    def compression(self) -> float:
        return self.float32_bytes / self.packed_bytes if self.packed_bytes else float("inf")


@dataclass
class SummaryTable:
    """Per-tensor rows and totals over all parameters (buffers, e.g. BatchNorm statistics, are not
    counted). ``str(table)`` is the printable table."""

    rows: List[SummaryRow] = field(default_factory=list)

    @property
    def total_float32_bytes(self) -> int:
        return sum(r.float32_bytes for r in self.rows)

    @property
    def total_packed_bytes(self) -> int:
        return sum(r.packed_bytes for r in self.rows)

    @property
    def compression(self) -> float:
        p = self.total_packed_bytes
        return self.total_float32_bytes / p if p else float("inf")

    @property
    def discrete_fraction(self) -> float:
        """Fraction of parameters (by count) that are discrete."""
        n = sum(r.numel for r in self.rows)
        return sum(r.numel for r in self.rows if r.discrete) / n if n else 0.0

    def density(self, convention: str = "discrete") -> Optional[float]:
        """Non-zero discrete weights over the discrete weights (``"discrete"``) or over all
        trainable parameters (``"trainable"``, Li & Hao's convention; see :func:`density`)."""
        _check_convention(convention)
        disc = [r for r in self.rows if r.discrete]
        if not disc:
            return None
        nz = sum(r.nonzero for r in disc)
        den = (sum(r.numel for r in disc) if convention == "discrete"
               else sum(r.numel for r in self.rows if r.trainable))
        return nz / den if den else None

    def __str__(self) -> str:
        head = ("name", "shape", "grid", "bits", "float32 B", "packed B", "compression")
        body = [
            (r.name, "x".join(map(str, r.shape)) or "scalar", r.grid, str(r.bits), str(r.float32_bytes),
             str(r.packed_bytes), f"{r.compression:.1f}x")
            for r in self.rows
        ]
        foot = ("total", f"{sum(r.numel for r in self.rows)} params", f"{100 * self.discrete_fraction:.1f}% discrete",
                "", str(self.total_float32_bytes), str(self.total_packed_bytes), f"{self.compression:.1f}x")
        widths = [max(len(row[i]) for row in [head, *body, foot]) for i in range(len(head))]
        fmt = lambda row: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        rule = "-" * len(fmt(head))
        return "\n".join([fmt(head), rule, *map(fmt, body), rule, fmt(foot)])

    def __repr__(self) -> str:
        return f"<SummaryTable: {len(self.rows)} tensors, {self.total_float32_bytes} B float32 -> {self.total_packed_bytes} B packed ({self.compression:.1f}x)>"


def summary(model: nn.Module, file: Optional[TextIO] = None) -> SummaryTable:
    """Per-tensor bits, bytes and compression of ``model``'s parameters, printed to ``file``
    (default ``sys.stdout``) and returned. Discrete weights are reported under their module name
    with their grid and bits per weight; every other parameter (biases, norm affines, kept
    full-precision layers, trainable scales) at its native size."""
    dts = {id(d.param): d for d in discrete_parameters(model)}
    rows = []
    for key, p in model.named_parameters():
        d = dts.get(id(p))
        n = p.numel()
        if d is not None:
            rows.append(SummaryRow(d.name or "<root>", tuple(p.shape), d.grid.name, d.grid.bits, n, 4 * n,
                                   packed_nbytes(n, d.grid.bits), True, int(torch.count_nonzero(p)), p.requires_grad))
        else:
            rows.append(SummaryRow(key, tuple(p.shape), str(p.dtype).replace("torch.", ""), 8 * p.element_size(), n,
                                   4 * n, n * p.element_size(), False, int(torch.count_nonzero(p)), p.requires_grad))
    table = SummaryTable(rows)
    print(str(table), file=file if file is not None else sys.stdout)
    return table


# ------------------------------------------------------------------------------------ export


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise PackedFileError(f"manifest: unknown dtype {name!r}")
    return dt


def _raw_bytes(t: Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.numel() == 0:
        return b""
    return t.view(torch.uint8).numpy().tobytes()


def export_packed(model: nn.Module, path, metadata: Optional[dict] = None) -> dict:
    """Write ``model`` to ``path`` in the packed format described in this module's docstring.

    ``metadata`` (optional, JSON-serialisable) is stored under the manifest key ``"metadata"``
    (covered by the manifest checksum) and read back by :func:`packed_metadata`.

    Discrete weights (see :func:`pmptrain.quant.discrete_parameters`) are stored as bit-packed grid
    indices; every other ``state_dict`` entry (full-precision parameters, scales, buffers) as raw
    bytes. Raises ``ValueError`` if a discrete weight is off its grid.

    Returns:
        The manifest (a dict).
    """
    if sys.byteorder != "little":
        raise RuntimeError("export_packed: only little-endian hosts are supported")
    state = model.state_dict()
    params = {k for k, _ in model.named_parameters()}
    blobs: List[bytes] = []
    offset = 0
    discrete, tensors = [], []
    dkeys = set()
    for d in discrete_parameters(model):
        key = d.param_key
        dkeys.add(key)
        idx = grid_indices(d.param.detach(), d.grid)
        blob = pack_codes(idx, d.grid.bits).numpy().tobytes()
        discrete.append({"module": d.name, "key": key, "spec": d.spec.to_dict(), "shape": list(d.param.shape),
                         "dtype": _dtype_name(d.param.dtype), "bits": d.grid.bits, "numel": d.param.numel(),
                         "offset": offset, "nbytes": len(blob)})
        blobs.append(blob)
        offset += len(blob)
    for key, t in state.items():
        if key in dkeys:
            continue
        blob = _raw_bytes(t)
        kind = "scale" if key.endswith("parametrizations.weight.0.alpha") else ("parameter" if key in params else "buffer")
        tensors.append({"key": key, "kind": kind, "dtype": _dtype_name(t.dtype), "shape": list(t.shape),
                        "offset": offset, "nbytes": len(blob)})
        blobs.append(blob)
        offset += len(blob)
    payload = b"".join(blobs)
    manifest = {"format": "pmptrain-packed", "version": VERSION, "byteorder": "little",
                "payload_nbytes": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest(),
                "discrete": discrete, "tensors": tensors}
    if metadata is not None:
        manifest["metadata"] = metadata
    mbytes = json.dumps(manifest, sort_keys=True).encode("utf-8")
    header = _HEADER.pack(MAGIC, VERSION, len(mbytes), hashlib.sha256(mbytes).digest())

    with atomic_write(path) as f:
        f.write(header)
        f.write(mbytes)
        f.write(payload)
    return manifest


def _field(e, name: str, kind: str, where: str):
    """``e[name]`` checked to be of ``kind`` (``"count"``: an int ≥ 0; ``"shape"``: a list of counts;
    ``"str"``; ``"dict"``), else :class:`PackedFileError` naming the entry and the field."""
    if not isinstance(e, dict):
        raise PackedFileError(f"packed file: {where} is a {type(e).__name__}, not an object")
    if name not in e:
        raise PackedFileError(f"packed file: {where} lacks the field {name!r}")
    v = e[name]

    def count(x):
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    ok = {"count": lambda: count(v), "shape": lambda: isinstance(v, list) and all(count(x) for x in v),
          "str": lambda: isinstance(v, str), "dict": lambda: isinstance(v, dict)}[kind]()
    if not ok:
        raise PackedFileError(f"packed file: {where}: field {name!r} = {v!r} is not a valid {kind}")
    return v


def _read_manifest(data: bytes):
    if len(data) < _HEADER.size:
        raise PackedFileError(f"packed file: truncated header ({len(data)} bytes < {_HEADER.size})")
    magic, version, mlen, msha = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise PackedFileError(f"packed file: wrong magic {magic!r} (expected {MAGIC!r}); not a pmptrain packed file")
    if version != VERSION:
        raise PackedFileError(f"packed file: unsupported format version {version} (this reader knows {VERSION})")
    start = _HEADER.size
    if len(data) < start + mlen:
        raise PackedFileError(f"packed file: truncated manifest (need {mlen} bytes, file has {len(data) - start})")
    mbytes = data[start:start + mlen]
    if hashlib.sha256(mbytes).digest() != msha:
        raise PackedFileError("packed file: manifest checksum mismatch (corrupt file)")
    try:
        manifest = json.loads(mbytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PackedFileError(f"packed file: manifest is not valid JSON: {e}") from None
    payload = data[start + mlen:]
    pn = _field(manifest, "payload_nbytes", "count", "the manifest")
    psha = _field(manifest, "payload_sha256", "str", "the manifest")
    entries = []
    for part in ("discrete", "tensors"):
        lst = manifest.get(part) if isinstance(manifest, dict) else None
        if not isinstance(lst, list):
            raise PackedFileError(f"packed file: the manifest's {part!r} is not a list")
        entries.append(lst)
    if len(payload) < pn:
        raise PackedFileError(f"packed file: truncated payload ({len(payload)} of {pn} bytes)")
    if len(payload) > pn:
        raise PackedFileError(f"packed file: {len(payload) - pn} unexpected trailing bytes after the payload")
    if hashlib.sha256(payload).hexdigest() != psha:
        raise PackedFileError("packed file: payload checksum mismatch (corrupt file)")
    for part, lst in zip(("discrete", "tensors"), entries):
        for i, e in enumerate(lst):
            where = f"{part} entry {i}"
            key = _field(e, "key", "str", where)
            where = f"{part} entry {key!r}"
            off, nb = _field(e, "offset", "count", where), _field(e, "nbytes", "count", where)
            _field(e, "dtype", "str", where)
            _field(e, "shape", "shape", where)
            if part == "discrete":
                _field(e, "module", "str", where)
                _field(e, "spec", "dict", where)
                _field(e, "numel", "count", where)
                _field(e, "bits", "count", where)
            if off + nb > pn:
                raise PackedFileError(f"packed file: entry {key!r} lies outside the payload")
    return manifest, payload


def _decode_tensor(e: dict, payload: bytes) -> Tensor:
    dtype = _dtype_from_name(e["dtype"])
    shape = tuple(int(s) for s in e["shape"])
    blob = payload[e["offset"]:e["offset"] + e["nbytes"]]
    n = 1
    for s in shape:
        n *= s
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(blob) != n * itemsize:
        raise PackedFileError(f"packed file: entry {e['key']!r} has {len(blob)} bytes, shape {shape} needs {n * itemsize}")
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).view(dtype).reshape(shape).clone()


def load_packed(path, model: nn.Module) -> nn.Module:
    """Load a packed file into ``model``, an architecturally identical skeleton (plain or already
    discretized with the same grids and scale modes); plain modules are discretized as recorded in
    the file. The loaded model's ``state_dict`` equals the exported one bit for bit, so its outputs
    equal the original's exactly.

    All or nothing: the file is decoded and checked completely, and the load is rehearsed on a copy
    of ``model``, before ``model`` is touched; on any error ``model`` is left exactly as it was.

    Raises:
        PackedFileError: corrupt, truncated, wrong-magic, wrong-version or checksum-mismatch file, or a
            manifest whose fields are malformed (every such case; never a bare TypeError/KeyError).
        ValueError: the model does not match the file (missing module, different grid or shapes).

    Returns:
        ``model``.
    """
    with open(os.fspath(path), "rb") as f:
        data = f.read()
    manifest, payload = _read_manifest(data)
    tensors = {e["key"]: _decode_tensor(e, payload) for e in manifest["tensors"]}
    discrete = [_decode_discrete(e, payload) for e in manifest["discrete"]]
    _load_into(copy.deepcopy(model), tensors, discrete)  # a rehearsal: raises before model changes
    return _load_into(model, tensors, discrete)


def packed_metadata(path) -> Optional[dict]:
    """The ``metadata`` stored by ``export_packed(..., metadata=...)`` (None if none), after every
    check of the file (magic, version, checksums, fields): :class:`PackedFileError` otherwise."""
    with open(os.fspath(path), "rb") as f:
        data = f.read()
    manifest, _ = _read_manifest(data)
    meta = manifest.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise PackedFileError(f"packed file: the manifest's 'metadata' is a {type(meta).__name__}, not an object")
    return meta


def _decode_discrete(e: dict, payload: bytes):
    """``(module name, key, spec, codes)`` of one discrete entry (validated fields)."""
    try:
        spec = DiscreteSpec.from_dict(e["spec"])
    except (KeyError, TypeError, ValueError) as err:
        raise PackedFileError(f"packed file: bad spec for {e.get('module')!r}: {err}") from None
    numel, bits, shape = e["numel"], e["bits"], tuple(e["shape"])
    blob = payload[e["offset"]:e["offset"] + e["nbytes"]]
    n = 1
    for d in shape:
        n *= d
    if bits != spec.grid.bits or len(blob) != packed_nbytes(numel, bits) or n != numel:
        raise PackedFileError(f"packed file: entry {e['key']!r} has inconsistent shape/size/bits")
    idx = unpack_codes(torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.empty(0, dtype=torch.uint8), bits, numel)
    if numel and int(idx.max()) >= len(spec.grid):
        raise PackedFileError(f"packed file: entry {e['key']!r} has codes outside its {len(spec.grid)}-level grid")
    codes = spec.grid.tensor(_dtype_from_name(e["dtype"]))[idx].reshape(shape)
    return e["module"], e["key"], spec, codes


def _load_into(model: nn.Module, tensors: dict, discrete: list) -> nn.Module:
    modules = dict(model.named_modules())
    state = dict(tensors)
    for name, key, spec, codes in discrete:  # every check before the first change
        if name not in modules:
            raise ValueError(f"model: has no module {name!r} (the file holds a discrete weight for it)")
        module = modules[name]
        if is_discrete_module(module):
            have = getattr(module, "_pmp_discrete")
            if have != spec:
                raise ValueError(f"model: module {name!r} is discrete with {have}, the file has {spec}")
        elif getattr(module, "weight", None) is None or tuple(module.weight.shape) != tuple(codes.shape):
            raise ValueError(f"model: module {name!r} has no weight of shape {tuple(codes.shape)}")
    for name, key, spec, codes in discrete:
        state[key] = codes
        module = modules[name]
        if not is_discrete_module(module):
            alpha = tensors.get(f"{name}.parametrizations.weight.0.alpha" if name else "parametrizations.weight.0.alpha")
            attach_discrete(module, spec, codes.to(module.weight.dtype), alpha)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"model: does not match the packed file: {err}") from None
    return model
