"""``export_controls`` / ``load_controls``: only the adapters, in the ``.pmp`` packed format.

The file is a :func:`pmptrain.export_packed` file of a small module holding the controls' ``A`` and
``B`` pieces (module ``"c<i>.A"``, ``"c<i>.B"``; discrete codes bit-packed, everything else raw),
with the manifest's ``metadata`` describing where each control goes::

    {"format": "pmptrain-controls", "version": 1,
     "controls": [{"name": "h.0.attn.c_attn", "config": {"kind": "lora", "rank": 8, ...},
                   "base_type": "Linear", "base_sha256": "…"}, ...]}

Every check of the packed format applies (magic, version, manifest and payload SHA-256, field
types, offsets, codes on their grid). ``base_sha256`` fingerprints the frozen base module's
tensors, so loading onto a different base is refused unless ``check_base=False``.
"""

from __future__ import annotations

import hashlib
from typing import List, Tuple

import torch
from torch import nn

from ..export import PackedFileError, export_packed, load_packed, packed_metadata
from .attach import _set_module, build_control, controls, freeze_base
from .modules import ControlBase

__all__ = ["export_controls", "load_controls", "base_fingerprint"]

_FORMAT = "pmptrain-controls"
_VERSION = 1


def base_fingerprint(module: nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, dtypes, shapes, raw bytes)."""
    h = hashlib.sha256()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _bundle(found: List[Tuple[str, ControlBase]]) -> nn.Module:
    root = nn.Module()
    for i, (_, ctrl) in enumerate(found):
        piece = nn.Module()
        piece.A, piece.B = ctrl.A, ctrl.B  # the same modules: discrete specs and scales travel
        root.add_module(f"c{i}", piece)
    return root


def export_controls(model: nn.Module, path) -> dict:
    """Write only the controls of ``model`` to ``path`` (see the module docstring); returns the
    manifest. Raises ``ValueError`` when ``model`` has no control."""
    found = controls(model)
    if not found:
        raise ValueError("export_controls: the model has no control (pmptrain.control.attach adds them)")
    meta = {"format": _FORMAT, "version": _VERSION,
            "controls": [{"name": n, "config": c.config(), "base_type": type(c.base).__name__,
                          "base_sha256": base_fingerprint(c.base)} for n, c in found]}
    return export_packed(_bundle(found), path, metadata=meta)


def _check_meta(meta) -> list:
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise PackedFileError("load_controls: the file is a packed model, not a controls file "
                              "(written by export_controls)")
    if meta.get("version") != _VERSION:
        raise PackedFileError(f"load_controls: unsupported controls version {meta.get('version')!r}")
    entries = meta.get("controls")
    if not isinstance(entries, list) or not entries or not all(
            isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("config"), dict)
            for e in entries):
        raise PackedFileError("load_controls: malformed 'controls' list in the metadata")
    return entries


def load_controls(path, model: nn.Module, check_base: bool = True, freeze: bool = True) -> nn.Module:
    """Attach the controls stored in ``path`` to ``model`` (a fresh copy of the base) and load
    their weights bit for bit; returns ``model``. Its outputs then equal those of the model the
    file was exported from exactly.

    All or nothing: on any error (corrupt file, a module missing, another base), ``model`` is left
    as it was.

    Args:
        check_base: refuse a base module whose tensors differ from the exported one's (SHA-256;
            default True).
        freeze: freeze every parameter outside the controls (default True), as ``attach`` does.
    """
    entries = _check_meta(packed_metadata(path))
    modules = dict(model.named_modules())
    for e in entries:
        name = e["name"]
        if name not in modules:
            raise ValueError(f"load_controls: the model has no module {name!r} (the file controls it)")
        m = modules[name]
        if isinstance(m, ControlBase):
            raise ValueError(f"load_controls: module {name!r} already carries a control; load onto a fresh base")
        if type(m).__name__ != e.get("base_type"):
            raise ValueError(f"load_controls: module {name!r} is a {type(m).__name__}, the file's base is a "
                             f"{e.get('base_type')}")
        if check_base and base_fingerprint(m) != e.get("base_sha256"):
            raise ValueError(f"load_controls: module {name!r} differs from the base the controls were trained on "
                             "(SHA-256 of its tensors); pass check_base=False to load anyway")
    built = []
    for e in entries:
        cfg = dict(e["config"])
        kind = cfg.pop("kind")
        try:
            ctrl = build_control(kind, modules[e["name"]], int(cfg.pop("rank")), alpha=cfg.get("alpha"),
                                 dropout=float(cfg.get("dropout", 0.0)), dim=cfg.get("dim"),
                                 causal=bool(cfg.get("causal", False)), seed=int(cfg.get("seed", 0)),
                                 levels=cfg.get("levels"))
        except (KeyError, TypeError, ValueError) as err:
            raise PackedFileError(f"load_controls: bad config for {e['name']!r}: {err}") from None
        built.append((e["name"], ctrl))
    load_packed(path, _bundle(built))  # checked and rehearsed: raises before anything is attached
    for name, ctrl in built:
        _set_module(model, name, ctrl)
    if freeze:
        freeze_base(model)
    return model
