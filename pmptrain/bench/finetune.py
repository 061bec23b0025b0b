"""``pmptrain bench --task finetune``: fine-tuning by control, offline.

A byte-level :class:`~pmptrain.bench.models.GPT` is pretrained once on one corpus (``pysrc``, the
Python standard library's sources, as ``pmptrain bench --model gpt``) with AdamW, warmup and cosine
decay, and cached under ``<cache>/finetune/<key>/`` with the command, the configuration, the
corpus checksum and the SHA-256 of the checkpoint (a cached checkpoint whose checksum does not
match is retrained). Every row then fine-tunes a copy on a shifted task — a second corpus, by default
``licenses``: the licence texts of ``/usr/share/common-licenses`` (Debian's ``base-files``, present on
every Debian system; its SHA-256 is recorded) — for the same seeded batches:

* ``full-adamw``, ``full-emsa`` — every parameter (E-MSA in the transformer setting);
* ``lora-adamw``, ``lora-emsa`` — ``kind="lora"`` on every Linear of every block;
* ``parallel-adamw``, ``parallel-emsa`` — ``kind="parallel"`` around every block, rank chosen for the
  same trainable parameters as LoRA;
* ``parallel2-adamw``, ``parallel2-emsa`` — ``kind="parallel"`` around each residual branch of every
  block (the attention and the MLP module: two controls per block, the "double control" of the
  ICML 2025 paper), rank for the same trainable parameters as LoRA;
* ``nonlinear-adamw`` — the ICML 2024 controller (causal) around every block, rank as parallel;
* ``binary-dmsa``, ``ternary-dmsa`` — discrete controls on the same Linears as LoRA (the ECCV 2024
  binary controller), trained by :class:`~pmptrain.DiscreteMSA`, the highest rank whose bit-packed
  codes and scales take at most 1/8 of LoRA's bytes (just under 4r binary, 2r ternary).

``--model mnist1d`` runs the same rows on a classifier instead: a residual MLP (blocks
``x + fc2(GELU(fc1(LN(x))))``) pretrained on MNIST-1D's classes 0–4 and tuned on the held-out classes
5–9 with the same 5-way head (:func:`mnist1d_task`; accuracy columns added).

Columns: trainable parameters; final new-task validation loss; old-task validation loss (the
pretraining corpus: forgetting); memory — the bytes autograd saves for one training step
(:func:`pmptrain.control.saved_tensor_bytes`, deterministic) and the training footprint (every
parameter + gradients + optimizer state + saved activations), plus ``torch.cuda.max_memory_allocated``
on a GPU; adapter file bytes (``export_controls``; the full packed model for full fine-tuning), whether
the export → load round trip onto a fresh base reproduces the outputs exactly; median step time and
its ratio to ``full-adamw`` in the same bench; steps to reach the reference loss (the first row of the
same kind trained by AdamW, e.g. ``lora-adamw`` for ``lora-emsa``).

Distributed (``torchrun --nproc-per-node N -m pmptrain bench --task finetune --fsdp ...``, gloo, CPU):
the pretrained model is trained (or read from the cache) by rank 0 alone, then read from the cache
by the other ranks; every row's model (the base with its controls) has its blocks, then the root,
wrapped by FSDP2's ``fully_shard`` (the frozen base weights are sharded too) before its optimizer is
built; every rank draws the same global batch of ``batch_size`` rows (divisible by N) and trains on
its rows; the validation losses and accuracies are those of the whole validation batches (each rank
evaluates its rows; sums and counts are added over the ranks). The memory columns are then per rank
(local shards of the parameters, gradients and optimizer state; the activations of the rank's rows);
the adapter file and its round trip are made on an unsharded copy loaded from the gathered state
dict. Only rank 0 writes and logs.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import hashlib
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .records import check_out_dir, open_outputs

__all__ = ["FinetuneConfig", "METHODS", "Task", "load_licenses", "pretrained", "gpt_task", "mnist1d_task",
           "run_finetune_bench", "merge_benches", "main"]

_LICENSES = Path("/usr/share/common-licenses")

#: rows: method -> (control kind or None for full fine-tuning, optimizer)
METHODS: Dict[str, tuple] = {
    "full-adamw": (None, "adamw"),
    "full-emsa": (None, "emsa"),
    "lora-adamw": ("lora", "adamw"),
    "lora-emsa": ("lora", "emsa"),
    "parallel-adamw": ("parallel", "adamw"),
    "parallel-emsa": ("parallel", "emsa"),
    "parallel2-adamw": ("parallel2", "adamw"),
    "parallel2-emsa": ("parallel2", "emsa"),
    "nonlinear-adamw": ("nonlinear", "adamw"),
    "binary-dmsa": ("binary", "dmsa"),
    "ternary-dmsa": ("ternary", "dmsa"),
}
DEFAULT_METHODS = ("full-adamw", "full-emsa", "lora-adamw", "lora-emsa", "parallel-adamw", "parallel-emsa",
                   "parallel2-adamw", "nonlinear-adamw", "binary-dmsa", "ternary-dmsa")
_LINEARS = ["c_attn", "c_proj", "mlp.0", "mlp.2"]
_BLOCKS = r"re:h\.\d+"
_SUBBLOCKS = r"re:h\.\d+\.(attn|mlp)"


@dataclasses.dataclass
class FinetuneConfig:
    """Settings of the fine-tuning bench (the CLI options of ``pmptrain bench --task finetune``)."""

    model: str = "gpt"
    pretrain_corpus: str = "pysrc"
    tune_corpus: str = "licenses"
    max_bytes: int = 2_000_000
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    seq_len: int = 128
    batch_size: int = 16
    pretrain_steps: int = 300
    pretrain_lr: float = 3e-3
    steps: int = 100
    eval_every: int = 10
    eval_batches: int = 4
    rank: int = 8
    methods: tuple = DEFAULT_METHODS
    seeds: tuple = (0, 1, 2)
    lr_full: float = 1e-3
    lr_adapter: float = 1e-2
    emsa_lr: float = 1e3
    emsa_rho: float = 5.0
    dmsa_rho: float = 0.5
    dmsa_decay: float = 0.99
    dmsa_scale_lr: float = 1e-2
    warmup: float = 0.1
    clip: float = 1.0
    threads: Optional[int] = None
    tensorboard: bool = True
    cache_dir: Optional[str] = None
    fsdp: bool = False

    def validate(self) -> None:
        for k in ("n_layer", "n_head", "n_embd", "seq_len", "batch_size", "pretrain_steps", "steps", "eval_every",
                  "eval_batches", "rank", "max_bytes"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{k.replace('_', '-')}: expected an integer >= 1, got {v!r}")
        if self.model not in ("gpt", "mnist1d"):
            raise ValueError(f"--model: expected 'gpt' or 'mnist1d', got {self.model!r}")
        if self.model == "gpt" and self.n_embd % self.n_head:
            raise ValueError(f"--n-embd {self.n_embd} must be a multiple of --n-head {self.n_head}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"--methods: unknown {unknown or 'empty'}; valid: {', '.join(METHODS)}")
        for k in ("lr_full", "lr_adapter", "emsa_lr", "pretrain_lr", "dmsa_scale_lr"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"--{k.replace('_', '-')}: expected a positive number, got {v!r}")
        if not 0 <= self.dmsa_decay <= 1:
            raise ValueError(f"--dmsa-decay: expected a number in [0, 1], got {self.dmsa_decay!r}")
        if not self.seeds:
            raise ValueError("--seeds: at least one seed")


# -------------------------------------------------------------------------------------- data


def load_licenses(max_bytes: int = 2_000_000):
    """The licence texts of ``/usr/share/common-licenses`` (each file once, sorted by name) as a
    :class:`~pmptrain.bench.lm.Corpus`."""
    from .lm import Corpus

    if not _LICENSES.is_dir():
        raise FileNotFoundError(f"corpus 'licenses': {_LICENSES} not found (Debian's base-files); pass "
                                "--tune-corpus FILE")
    seen, chunks = set(), []
    for p in sorted(_LICENSES.iterdir()):
        real = p.resolve()
        if not real.is_file() or real in seen:
            continue
        seen.add(real)
        chunks.append(real.read_bytes())
    blob = b"\n".join(chunks)[:max_bytes]
    if len(blob) < 10_000:
        raise ValueError(f"corpus 'licenses': only {len(blob)} bytes of text")
    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()
    return Corpus("licenses", data, f"{_LICENSES} ({len(chunks)} files)", hashlib.sha256(blob).hexdigest())


def _corpus(name: str, max_bytes: int):
    from .lm import load_corpus

    return load_licenses(max_bytes) if name == "licenses" else load_corpus(name, max_bytes)


def _split(corpus, cfg: FinetuneConfig, seed: int = 12345):
    from .lm import _batch

    n_val = max(cfg.seq_len + 2, len(corpus.data) // 10)
    train, val = corpus.data[:-n_val], corpus.data[-n_val:]
    gen = torch.Generator().manual_seed(seed)
    return train, [_batch(val, cfg.seq_len, cfg.batch_size, gen) for _ in range(cfg.eval_batches)]


def _loss(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _part(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a batch (contiguous, as equal as possible; all of it in one process)."""
    from .ranks import dist_info

    rank, world = dist_info()
    return t if world == 1 else torch.tensor_split(t, world)[rank]


def _add_over_ranks(t: torch.Tensor) -> torch.Tensor:
    from .ranks import dist_info

    if dist_info()[1] > 1:
        torch.distributed.all_reduce(t)
    return t


@torch.no_grad()
def _val_plain(model, batches, device) -> float:
    """:func:`_val` of an unsharded model in this process alone (no collective)."""
    was = model.training
    model.eval()
    v = sum(float(_loss(model, x.to(device), y.to(device))) for x, y in batches) / len(batches)
    model.train(was)
    return v


@torch.no_grad()
def _val(model, batches, device) -> float:
    """The mean over ``batches`` of each batch's mean loss (with several ranks: the sums and counts of
    the ranks' rows, added over the ranks — the loss of the whole batch)."""
    from .ranks import dist_info

    if dist_info()[1] == 1:
        return _val_plain(model, batches, device)
    was = model.training
    model.eval()
    sums = torch.zeros(len(batches), 2, dtype=torch.float64)
    for i, (x, y) in enumerate(batches):
        logits = model(_part(x).to(device))
        sums[i, 0] = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), _part(y).to(device).reshape(-1),
                                           reduction="sum"))
        sums[i, 1] = _part(y).numel()
    _add_over_ranks(sums)
    model.train(was)
    return float((sums[:, 0] / sums[:, 1]).mean())


def _sched(opt, total: int, warmup: float):
    from .lm import lr_multiplier

    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, total, warmup, 0.1))


# ------------------------------------------------------------------------------------- tasks


@dataclasses.dataclass
class Task:
    """One fine-tuning problem: the model builder, batch samplers of the old (pretraining) and new
    task, fixed validation batches, where the controls go and the cache key of the pretrained model.

    ``per_block`` is ``Σ (d_in + d_out)/d`` over the Linears of one block that LoRA controls (LoRA
    has ``per_block·d·r`` parameters per block); ``classify`` adds accuracy columns."""

    name: str
    build: Any
    old_batch: Any
    new_batch: Any
    old_val: list
    new_val: list
    linears: list
    blocks: str
    subblocks: Optional[str]
    per_block: int
    key: Dict[str, Any]
    data: Dict[str, Any]
    classify: bool = False


def gpt_task(cfg: FinetuneConfig) -> Task:
    """The byte-level GPT: pretrained on ``pretrain_corpus``, tuned on ``tune_corpus``."""
    from .lm import _batch

    old = _corpus(cfg.pretrain_corpus, cfg.max_bytes)
    new = _corpus(cfg.tune_corpus, cfg.max_bytes)
    old_train, old_val = _split(old, cfg)
    new_train, new_val = _split(new, cfg)
    return Task(
        "gpt", lambda: _build_gpt(cfg), lambda g: _batch(old_train, cfg.seq_len, cfg.batch_size, g),
        lambda g: _batch(new_train, cfg.seq_len, cfg.batch_size, g), old_val, new_val, _LINEARS, _BLOCKS,
        _SUBBLOCKS, 16, _pretrain_key(cfg, old.sha256),
        {k: {"name": c.name, "source": c.source, "bytes": len(c.data), "sha256": c.sha256}
         for k, c in (("old", old), ("new", new))})


class ResMLPBlock(nn.Module):
    """``x + fc2(GELU(fc1(LN(x))))``: a pre-LayerNorm residual MLP block."""

    def __init__(self, d: int):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))


class ResMLP(nn.Module):
    """``head(LN(blocks(stem(flatten(x)))))``: a small residual MLP classifier."""

    def __init__(self, n_in: int, d: int, n_block: int, n_out: int):
        super().__init__()
        self.stem = nn.Linear(n_in, d)
        self.blocks = nn.ModuleList(ResMLPBlock(d) for _ in range(n_block))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_out)

    def forward(self, x):
        h = self.stem(x.flatten(1))
        for b in self.blocks:
            h = b(h)
        return self.head(self.ln_f(h))


def mnist1d_task(cfg: FinetuneConfig) -> Task:
    """MNIST-1D (generated by the ``mnist1d`` package, no download): a residual MLP (width
    ``n_embd``, ``n_layer`` blocks, 5 outputs) pretrained on classes 0–4 and tuned on classes 5–9,
    relabelled 0–4 — the same head must serve the held-out half of the classes. The old-task
    validation set is the test split's classes 0–4 (forgetting), the new one its classes 5–9."""
    from .data import load_dataset

    ds = load_dataset("mnist1d")
    x, y, tx, ty = ds.train_x.flatten(1), ds.train_y, ds.test_x.flatten(1), ds.test_y
    sha = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()

    def half(xx, yy, new):
        keep = (yy >= 5) if new else (yy < 5)
        return xx[keep], yy[keep] - (5 if new else 0)

    def sampler(xx, yy):
        def batch(g):
            idx = torch.randint(0, len(xx), (cfg.batch_size,), generator=g)
            return xx[idx], yy[idx]
        return batch

    def val(xx, yy):
        return [(xx[i:i + 256], yy[i:i + 256]) for i in range(0, len(xx), 256)]

    (ox, oy), (nx, ny) = half(x, y, False), half(x, y, True)
    key = {"data": "mnist1d", "sha256": sha, "model": "resmlp", "d": cfg.n_embd, "n_block": cfg.n_layer,
           "steps": cfg.pretrain_steps, "lr": cfg.pretrain_lr, "batch_size": cfg.batch_size, "seed": 0,
           "classes": "0-4 pretrain, 5-9 tune (relabelled 0-4)"}
    data = {"old": {"name": "mnist1d classes 0-4", "source": "mnist1d package (seed 42)", "bytes": int(len(ox)),
                    "sha256": sha},
            "new": {"name": "mnist1d classes 5-9", "source": "mnist1d package (seed 42)", "bytes": int(len(nx)),
                    "sha256": sha}}
    return Task("mnist1d", lambda: ResMLP(x.shape[1], cfg.n_embd, cfg.n_layer, 5), sampler(ox, oy),
                sampler(nx, ny), val(*half(tx, ty, False)), val(*half(tx, ty, True)), ["fc1", "fc2"],
                r"re:blocks\.\d+", None, 10, key, data, classify=True)


@torch.no_grad()
def _acc(model, batches, device) -> float:
    was = model.training
    model.eval()
    hit = n = 0
    for x, y in batches:
        x, y = _part(x), _part(y)
        hit += int((model(x.to(device)).argmax(-1) == y.to(device)).sum())
        n += y.numel()
    hit, n = _add_over_ranks(torch.tensor([hit, n], dtype=torch.int64)).tolist()
    model.train(was)
    return hit / n


# --------------------------------------------------------------------------------- pretraining


def _pretrain_key(cfg: FinetuneConfig, corpus_sha: str) -> Dict[str, Any]:
    return {"corpus": cfg.pretrain_corpus, "corpus_sha256": corpus_sha, "max_bytes": cfg.max_bytes,
            "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "seq_len": cfg.seq_len,
            "batch_size": cfg.batch_size, "steps": cfg.pretrain_steps, "lr": cfg.pretrain_lr, "seed": 0,
            "optimizer": "adamw (betas 0.9/0.95, wd 0.1 on matrices), warmup 0.1 + cosine to 0.1, clip 1"}


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _build_gpt(cfg: FinetuneConfig):
    from .models import gpt

    return gpt((cfg.seq_len,), 256, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)


def pretrained(cfg: FinetuneConfig, task: Task, device, log=print):
    """The pretrained model of ``task`` (from the cache when its checksum matches, else trained with
    AdamW and cached); returns ``(model, meta)``."""
    from .data.sources import cache_dir
    from .records import versions
    from .registry import get_spec
    from .seeding import seed_all

    key = task.key
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cfg.cache_dir) if cfg.cache_dir else cache_dir() / "finetune"
    d = root / digest
    ckpt, meta_path = d / "pretrained.pt", d / "meta.json"
    if ckpt.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("checkpoint_sha256") == _file_sha(ckpt) and meta.get("key") == key:
            model = task.build()
            model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
            log(f"pretrained model: cached {ckpt} (sha256 {meta['checkpoint_sha256'][:12]}, "
                f"old-task val loss {meta['val_loss']:.4f})")
            return model.to(device), meta
        log(f"pretrained model: {ckpt} does not match its recorded checksum/config; retraining")
    seed_all(0)
    model = task.build().to(device)
    opt = get_spec("adamw").build(model, lr=cfg.pretrain_lr)
    sched = _sched(opt, cfg.pretrain_steps, 0.1)
    gen = torch.Generator().manual_seed(777)
    t0 = time.perf_counter()
    for _ in range(cfg.pretrain_steps):
        x, y = task.old_batch(gen)
        opt.zero_grad(set_to_none=True)
        _loss(model, x.to(device), y.to(device)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    v = _val_plain(model, task.old_val, device)  # (rank 0 alone under torchrun: no collective)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "pretrained.pt.tmp"
    torch.save({k: t.detach().cpu() for k, t in model.state_dict().items()}, tmp)
    os.replace(tmp, ckpt)
    meta = {"key": key, "checkpoint_sha256": _file_sha(ckpt), "val_loss": v,
            "seconds": time.perf_counter() - t0, "command": " ".join(shlex.quote(a) for a in sys.argv),
            "versions": versions()}
    meta_path.write_text(json.dumps(meta, indent=1, sort_keys=True))
    log(f"pretrained model: {cfg.pretrain_steps} steps in {meta['seconds']:.0f} s, old-task val loss {v:.4f}; "
        f"cached {ckpt}")
    return model, meta


# ---------------------------------------------------------------------------------- the rows


def _rank_for(kind: str, cfg: FinetuneConfig, task: Task) -> int:
    """The rank of a control at LoRA's budget. LoRA on a block's Linears has ``per_block·d·r``
    parameters (GPT block: ``r(d+3d) + r(d+d) + r(d+4d) + r(4d+d) = 16·d·r``; MLP block: ``10·d·r``).
    Parallel / nonlinear around the block (``2·d·R``): ``R = per_block·r/2``; around each of its two
    residual branches (``2·2·d·R``): half that. Discrete controls on the same Linears
    (``per_block·d·R`` codes of 1 or 2 bits, two float32 scales per control): the highest rank whose
    codes and scales fit in 1/8 of LoRA's float32 bytes."""
    d, r = cfg.n_embd, cfg.rank
    lora = task.per_block * d * r
    if kind in ("parallel", "nonlinear"):
        return max(1, lora // (2 * d))
    if kind == "parallel2":  # two controls per block, one across each residual branch (attn, mlp)
        return max(1, lora // (4 * d))
    bits = 1 if kind == "binary" else 2
    budget_bits = lora * 4 - 8 * 8 * len(task.linears)  # 1/8 of LoRA's bytes, in bits, less the scales
    return max(1, budget_bits // (task.per_block * d * bits))


def _shard(model, task: Task) -> None:
    """FSDP2: ``fully_shard`` every block (the modules named by ``task.blocks``, controls included),
    then the root."""
    import re

    from torch.distributed.fsdp import fully_shard

    pattern = re.compile(task.blocks[3:] if task.blocks.startswith("re:") else re.escape(task.blocks))
    # FSDP2 shards no 0-dim parameter (a discrete control's trainable scale α): those stay plain
    # tensors on every rank, their gradients averaged by :func:`_average_plain_grads`
    scalars = {p for p in model.parameters() if p.dim() == 0}
    for name, m in list(model.named_modules()):
        if name and pattern.fullmatch(name):
            fully_shard(m, ignored_params=scalars)
    fully_shard(model, ignored_params=scalars)


def _average_plain_grads(params) -> None:
    """Under FSDP2: average over the ranks the gradients of the parameters FSDP2 does not shard (its
    ignored 0-dim ones), before clipping — FSDP2 averages only its own (pmptrain's optimizers would
    average them too, but after the clip). Nothing in one process."""
    from pmptrain import distributed as pdist

    if pdist.world_size() > 1:
        pdist.all_reduce_mean_([p.grad for p in params if p.grad is not None and not pdist.is_sharded(p)])


def _attach_controls(model, kind: str, cfg: FinetuneConfig, task: Task) -> None:
    """Attach a method's controls (``kind``: its :data:`METHODS` entry) to ``model``: LoRA and the
    binary/ternary adapters on the task's linears, ``parallel2`` on its sub-blocks, the rest on its
    blocks (causal on the GPT)."""
    from pmptrain import control

    if kind == "lora":
        control.attach(model, task.linears, kind="lora", rank=cfg.rank)
    elif kind in ("binary", "ternary"):
        control.attach(model, task.linears, kind=kind, rank=_rank_for(kind, cfg, task))
    elif kind == "parallel2":
        control.attach(model, task.subblocks, kind="parallel", rank=_rank_for(kind, cfg, task))
    else:
        control.attach(model, task.blocks, kind=kind, rank=_rank_for(kind, cfg, task), causal=task.name == "gpt")


def _make(method: str, base, cfg: FinetuneConfig, task: Task, shard: bool = False):
    """``(model, optimizer)`` of one row on a copy of ``base`` (``shard``: the model wrapped by FSDP2
    before the optimizer is built)."""
    import pmptrain

    from .registry import get_spec

    kind, optname = METHODS[method]
    model = copy.deepcopy(base)
    if kind is None:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        _attach_controls(model, kind, cfg, task)
    if shard:
        _shard(model, task)
    if optname == "adamw":
        lr = cfg.lr_full if kind is None else cfg.lr_adapter
        opt = get_spec("adamw").build(model, lr=lr) if kind is None else \
            torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95),
                              weight_decay=0.0)
    elif optname == "emsa":
        opt = pmptrain.EMSA(model, lr=cfg.emsa_lr, rho=cfg.emsa_rho, rho_scale="costate",
                            strict=kind is not None)
    else:
        opt = pmptrain.DiscreteMSA(model, rho=cfg.dmsa_rho, decay=cfg.dmsa_decay, fallback_lr=cfg.dmsa_scale_lr)
    return model, opt


def _optimizer_state_bytes(opt) -> int:
    from .memory import state_bytes

    sd = opt.state_dict()
    return state_bytes(sd.get("state", {})) + state_bytes(sd.get("pmptrain", {}))


def _local_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t``, of its local shard for a DTensor."""
    from pmptrain import distributed as pdist

    if pdist.is_sharded(t):
        t = t.to_local()
    return t.numel() * t.element_size()


def _memory(model, opt, x, y, device) -> Dict[str, Any]:
    """Saved-activation bytes of one training forward; the training footprint; CUDA peak (per rank
    under FSDP2: local shards, the rank's rows)."""
    from pmptrain.control import saved_tensor_bytes
    from pmptrain.optim.sharded import has_sharded_params, state_bytes

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    opt.zero_grad(set_to_none=True)
    loss, act = saved_tensor_bytes(lambda: _loss(model, x, y), model)
    loss.backward()
    cuda_peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        cuda_peak = (torch.cuda.max_memory_allocated(device)) / 2**20
        cuda_peak_delta = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    params = sum(_local_bytes(p) for p in {id(p): p for p in model.parameters()}.values())
    grads = sum(_local_bytes(p) for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad)
    if has_sharded_params(model.parameters()):
        state = sum(state_bytes(opt).values())  # this rank's (the local shards of DTensor state)
    else:
        state = _optimizer_state_bytes(opt)
    opt.zero_grad(set_to_none=True)
    out = {"activation_mb": act / 2**20, "train_memory_mb": (params + grads + state + act) / 2**20,
           "optimizer_state_mb": state / 2**20, "cuda_peak_mb": cuda_peak}
    if cuda_peak is not None:
        out["cuda_peak_delta_mb"] = cuda_peak_delta
    return out


def _adapter_bytes_and_roundtrip(method: str, model, base, probe, tmp: Path):
    """Bytes of the adapter file, of its payload (tensors and packed codes, without the manifest)
    and whether loading it onto a fresh base reproduces the outputs exactly."""
    import pmptrain
    from pmptrain import control

    kind = METHODS[method][0]
    path = tmp / f"{method}.pmp"
    was = model.training
    model.eval()
    with torch.no_grad():
        ref = model(probe)
        if kind is None:
            manifest = pmptrain.export_packed(model, path)
            fresh = pmptrain.load_packed(path, copy.deepcopy(base))
        else:
            manifest = control.export_controls(model, path)
            fresh = control.load_controls(path, copy.deepcopy(base))
        fresh.eval()
        exact = bool(torch.equal(fresh(probe), ref))
    model.train(was)
    size = path.stat().st_size
    path.unlink()
    return size, manifest["payload_nbytes"], exact


def _unsharded_copy(method: str, model, base, cfg: FinetuneConfig, task: Task):
    """A plain (one-process) model of the row, loaded with ``model``'s whole state dict (gathered:
    every rank calls it)."""
    from .runner import full_state_dict

    sd = full_state_dict(model)
    kind = METHODS[method][0]
    twin = copy.deepcopy(base)
    if kind is not None:
        _attach_controls(twin, kind, cfg, task)
    twin.load_state_dict(sd)
    return twin


def run_one(method: str, seed: int, base, cfg: FinetuneConfig, task: Task, device, tmp: Path,
            writer=None) -> Dict[str, Any]:
    from pmptrain import control
    from pmptrain import distributed as pdist
    from pmptrain.optim.shell import PMPOptimizer

    from .ranks import dist_info
    from .runner import progress_bar
    from .seeding import seed_all

    rank, world = dist_info()
    seed_all(seed)
    new_val, old_val = task.new_val, task.old_val
    model, opt = _make(method, base, cfg, task, shard=world > 1)
    model.train()
    frozen = {n: pdist.full_tensor(p).detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    sched = _sched(opt, cfg.steps, cfg.warmup)
    gen = torch.Generator().manual_seed(10_000 + seed)
    # before any forward: after an eval forward (no backward) FSDP2's root keeps its parameters
    # unsharded, and model.parameters() would list those plain tensors, not the sharded parameters
    # that receive the gradients (the clip would skip them)
    trainable = [p for p in model.parameters() if p.requires_grad]
    history = [{"step": 0, "seconds": 0.0, "val_loss": _val(model, new_val, device)}]
    clock, times = 0.0, []
    bar = progress_bar(cfg.steps, f"{method} seed {seed}", rank)
    first = None
    for step in range(1, cfg.steps + 1):
        x, y = task.new_batch(gen)  # the global batch: every rank draws it, and trains on its rows
        x, y = _part(x).to(device), _part(y).to(device)
        if first is None:
            first = (x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, x, y)
        loss.backward()
        _average_plain_grads(trainable)
        torch.nn.utils.clip_grad_norm_(trainable, cfg.clip)
        opt.step()
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        clock += dt
        times.append(dt)
        train_loss = float(_add_over_ranks(torch.tensor([loss.item()], dtype=torch.float64))) / world
        if step % cfg.eval_every == 0 or step == cfg.steps:
            v = _val(model, new_val, device)
            history.append({"step": step, "seconds": clock, "val_loss": v, "train_loss": train_loss})
            bar.set_postfix(val=f"{v:.3f}")
            if writer is not None:
                writer.add_scalar(f"{method}/seed{seed}/val_loss", v, step)
        if writer is not None:
            writer.add_scalar(f"{method}/seed{seed}/train_loss", train_loss, step)
        bar.update(1)
    bar.close()
    mem = _memory(model, opt, first[0], first[1], device)
    base_untouched = all(torch.equal(pdist.full_tensor(p), frozen[n]) for n, p in model.named_parameters()
                         if n in frozen)
    probe = task.new_batch(torch.Generator().manual_seed(10_000 + seed))[0][:2].to(device)  # = the first batch's
    plain = model if world == 1 else _unsharded_copy(method, model, base, cfg, task)
    size, payload, exact = _adapter_bytes_and_roundtrip(method, plain, base, probe, tmp)
    skipped = opt.skipped_steps if isinstance(opt, PMPOptimizer) else 0
    if isinstance(opt, PMPOptimizer):
        opt.detach()
    acc = {"final_val_acc": _acc(model, new_val, device), "old_val_acc": _acc(model, old_val, device)} \
        if task.classify else {}
    return {"method": method, "seed": seed, "trainable_params": control.trainable_parameters(model), **acc,
            "final_val_loss": history[-1]["val_loss"], "old_val_loss": _val(model, old_val, device),
            "history": history, "median_step_ms": 1e3 * statistics.median(times), "adapter_bytes": size,
            "adapter_payload_bytes": payload, "roundtrip_exact": exact, "frozen_base_untouched": base_untouched,
            "skipped_steps": skipped, "world_size": world, **mem}


# ------------------------------------------------------------------------------------- report


def _reference_of(method: str, methods) -> Optional[str]:
    """The AdamW row of the same kind (``lora-adamw`` for ``lora-emsa``), if in the bench."""
    kind = METHODS[method][0]
    for m in methods:
        if METHODS[m][0] == kind and METHODS[m][1] == "adamw":
            return m
    return None


def _first_reach(history, target):
    for h in history:
        if h["val_loss"] <= target:
            return h["step"]
    return None


def aggregate(cfg: FinetuneConfig, runs: List[Dict[str, Any]], pre_old: float) -> Dict[str, Any]:
    by: Dict[str, List[Dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)
    base_ms = statistics.median(r["median_step_ms"] for r in by[cfg.methods[0]])
    finals_of = {m: statistics.median(r["final_val_loss"] for r in rs) for m, rs in by.items()}
    rows = []
    for m in cfg.methods:
        rs = by[m]
        finals = [r["final_val_loss"] for r in rs]
        ref = _reference_of(m, cfg.methods)
        steps_to_ref = None
        if ref is not None and ref != m:
            hits = [_first_reach(r["history"], finals_of[ref]) for r in rs]
            hits = [h for h in hits if h is not None]
            steps_to_ref = statistics.median(hits) if len(hits) * 2 > len(rs) else None
        med = lambda k: statistics.median(r[k] for r in rs) if rs[0].get(k) is not None else None
        rows.append({
            "method": m, "kind": METHODS[m][0] or "full", "optimizer": METHODS[m][1], "seeds": len(rs),
            "trainable_params": rs[0]["trainable_params"],
            "final_val_loss": statistics.median(finals), "final_val_loss_min": min(finals),
            "final_val_loss_max": max(finals), "old_val_loss": med("old_val_loss"),
            "final_val_acc": med("final_val_acc"), "old_val_acc": med("old_val_acc"),
            "forgetting": med("old_val_loss") - pre_old,
            "activation_mb": med("activation_mb"), "train_memory_mb": med("train_memory_mb"),
            "cuda_peak_mb": med("cuda_peak_mb"), "adapter_bytes": rs[0]["adapter_bytes"],
            "adapter_payload_bytes": rs[0]["adapter_payload_bytes"],
            "roundtrip_exact": all(r["roundtrip_exact"] for r in rs),
            "frozen_base_untouched": all(r["frozen_base_untouched"] for r in rs),
            "median_step_ms": med("median_step_ms"), "step_ratio": med("median_step_ms") / base_ms,
            "reference": ref, "steps_to_reference": steps_to_ref, "steps": cfg.steps,
            "curve_steps": [h["step"] for h in rs[0]["history"]],
            "curve_val_loss": [statistics.median(r["history"][i]["val_loss"] for r in rs)
                               for i in range(len(rs[0]["history"]))],
            "skipped_steps": sum(r["skipped_steps"] for r in rs),
        })
    return {"reference_time": cfg.methods[0], "pretrain_old_val_loss": pre_old, "rows": rows}


CSV_FIELDS = ("method", "kind", "optimizer", "seeds", "trainable_params", "final_val_loss", "final_val_loss_min",
              "final_val_loss_max", "old_val_loss", "forgetting", "final_val_acc", "old_val_acc", "activation_mb",
              "train_memory_mb", "cuda_peak_mb", "adapter_bytes", "adapter_payload_bytes", "roundtrip_exact",
              "median_step_ms", "step_ratio", "reference", "steps_to_reference")


def format_table(summary: Dict[str, Any], cfg: FinetuneConfig, corpora: Dict[str, Any]) -> str:
    head = ["method", "trainable", "new-task val [min-max]", "old-task val", "act MB", "train MB",
            "adapter B (payload)", "exact", f"step ×{summary['reference_time']}", "steps→ref"]
    lines = [head]
    for r in summary["rows"]:
        lines.append([
            r["method"], f"{r['trainable_params']}",
            f"{r['final_val_loss']:.3f} [{r['final_val_loss_min']:.3f}-{r['final_val_loss_max']:.3f}]"
            + (f" ({100 * r['final_val_acc']:.1f}%)" if r["final_val_acc"] is not None else ""),
            f"{r['old_val_loss']:.3f}" + (f" ({100 * r['old_val_acc']:.1f}%)" if r["old_val_acc"] is not None else ""),
            f"{r['activation_mb']:.1f}", f"{r['train_memory_mb']:.1f}"
            + (f" (cuda {r['cuda_peak_mb']:.0f})" if r["cuda_peak_mb"] is not None else ""),
            f"{r['adapter_bytes']} ({r['adapter_payload_bytes']})", "yes" if r["roundtrip_exact"] else "NO",
            f"{r['step_ratio']:.2f}",
            (f"{r['steps_to_reference']:.0f}/{r['steps']} ({r['reference']})" if r["steps_to_reference"] is not None
             else ("-" if r["reference"] in (None, r["method"]) else f"not reached ({r['reference']})"))])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    what = f"GPT {cfg.n_layer}x{cfg.n_embd}" if cfg.model == "gpt" else \
        f"residual MLP {cfg.n_layer}x{cfg.n_embd} (accuracy in parentheses)"
    unit = f"{cfg.batch_size}x{cfg.seq_len} bytes" if cfg.model == "gpt" else f"{cfg.batch_size} examples"
    out.append(f"\n{what} pretrained {cfg.pretrain_steps} steps on {corpora['old']} "
               f"(old-task val {summary['pretrain_old_val_loss']:.3f}), fine-tuned {cfg.steps} steps of "
               f"{unit} on {corpora['new']}; LoRA rank {cfg.rank}; seeds "
               f"{list(cfg.seeds)}; medians over seeds. act MB: bytes autograd saves for one step; train MB: "
               "parameters + gradients + optimizer state + saved activations.")
    return "\n".join(out)


def _plots(summary, out_dir: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in summary["rows"]:
        ax.plot(r["curve_steps"], r["curve_val_loss"], label=r["method"])
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("new-task validation loss (nats/byte)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p1 = out_dir / "val_loss_vs_step.png"
    fig.savefig(p1, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in summary["rows"]:
        ax.scatter(r["train_memory_mb"], r["final_val_loss"])
        ax.annotate(r["method"], (r["train_memory_mb"], r["final_val_loss"]), fontsize=7)
    ax.set_xlabel("training memory (MB)")
    ax.set_ylabel("final new-task validation loss")
    fig.tight_layout()
    p2 = out_dir / "loss_vs_memory.png"
    fig.savefig(p2, dpi=120)
    plt.close(fig)
    return [p1, p2]


def run_finetune_bench(cfg: FinetuneConfig, out_dir: Path, log=print, device=None) -> Dict[str, Any]:
    """Pretrain (or load the cached model), run every method × seed interleaved (seed-major), write
    ``results.txt/json/csv``, ``config.json``, plots and TensorBoard logs under ``out_dir``."""
    import tempfile

    from .ranks import dist_info

    cfg.validate()
    rank, world = dist_info()
    if world > 1:
        if not cfg.fsdp:
            raise ValueError(f"--fsdp: under torchrun ({world} ranks) the fine-tuning bench shards every row's model "
                             "with FSDP2 and needs --fsdp (it has no DDP path)")
        if cfg.batch_size % world:
            raise ValueError(f"--batch-size: {cfg.batch_size} rows cannot be split evenly across {world} ranks")
        if device not in (None, "cpu"):
            raise ValueError(f"--device {device}: under torchrun the fine-tuning bench runs on the CPU (gloo); "
                             "untested on NCCL")
        device = "cpu"
        if rank != 0:
            log = _silent
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    task = gpt_task(cfg) if cfg.model == "gpt" else mnist1d_task(cfg)
    for m in cfg.methods:
        if METHODS[m][0] == "parallel2" and task.subblocks is None:
            raise ValueError(f"--methods: {m} needs blocks with two residual branches (the GPT); "
                             f"--model {cfg.model} has one per block")
    old, new = task.data["old"], task.data["new"]
    log(f"old task: {old['name']} ({old['bytes']} {'bytes' if cfg.model == 'gpt' else 'examples'}, {old['source']}, "
        f"sha256 {old['sha256'][:12]}); new task: {new['name']} ({new['bytes']}, {new['source']}, "
        f"sha256 {new['sha256'][:12]}); device {device}")
    if world > 1 and rank != 0:
        torch.distributed.barrier()  # rank 0 pretrains (or reads the cache) first; then the others read the cache
    base, pre_meta = pretrained(cfg, task, device, log)
    if world > 1 and rank == 0:
        torch.distributed.barrier()
    for p in base.parameters():
        p.requires_grad_(False)
    pre_old = _val_plain(base, task.old_val, device)
    out_dir, writer = open_outputs(out_dir, cfg.tensorboard, rank)
    runs = []
    try:
        with tempfile.TemporaryDirectory(dir=out_dir if rank == 0 else None) as tmp:
            for seed in cfg.seeds:
                for m in cfg.methods:
                    r = run_one(m, seed, base, cfg, task, device, Path(tmp), writer)
                    runs.append(r)
                    log(f"  {m:<16} seed {seed}: new {r['final_val_loss']:.4f}  old {r['old_val_loss']:.4f}  "
                        f"trainable {r['trainable_params']}  act {r['activation_mb']:.1f} MB  "
                        f"step {r['median_step_ms']:.1f} ms")
    finally:
        if writer is not None:
            writer.close()
    corpora = task.data
    if rank != 0:
        return {"runs": runs, "world_size": world}
    return write_report(cfg, runs, pre_old, corpora, pre_meta, str(device), out_dir, log)


def _silent(*args, **kwargs) -> None:
    """The log of ranks other than 0."""


def write_report(cfg: FinetuneConfig, runs, pre_old: float, corpora, pre_meta, device: str, out_dir: Path,
                 log=print) -> Dict[str, Any]:
    """Aggregate ``runs`` and write ``results.json/csv/txt``, ``config.json`` and the plots."""
    from .records import atomic_write_json, versions

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = aggregate(cfg, runs, pre_old)
    names = {k: f"{v['name']} (sha256 {v['sha256'][:12]})" for k, v in corpora.items()}
    results = {"kind": "finetune", "config": dataclasses.asdict(cfg), "device": device, "corpora": corpora,
               "pretrained": pre_meta, "summary": summary, "runs": runs, "versions": versions(),
               "world_size": max([r.get("world_size", 1) for r in runs] or [1])}
    atomic_write_json(results, out_dir / "results.json")
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for r in summary["rows"]:
            w.writerow([r[k] for k in CSV_FIELDS])
    plots = _plots(summary, out_dir)
    table = format_table(summary, cfg, names)
    (out_dir / "results.txt").write_text(table + "\n")
    atomic_write_json({"kind": "finetune", "config": dataclasses.asdict(cfg), "command": sys.argv,
                       "versions": versions()}, out_dir / "config.json")
    log(table)
    log(f"results: {out_dir / 'results.txt'}, results.json, results.csv, plots: {', '.join(p.name for p in plots)}")
    return results


def merge_benches(dirs: List[Path], out_dir: Path, log=print) -> Dict[str, Any]:
    """One report from several fine-tuning benches that differ only in their seeds (e.g. one
    process per seed): their runs are pooled and aggregated as if run together."""
    loaded = []
    for d in dirs:
        p = Path(d) / "results.json"
        if not p.is_file():
            raise ValueError(f"--merge: {d} holds no results.json of a fine-tuning bench")
        res = json.loads(p.read_text())
        if res.get("kind") != "finetune":
            raise ValueError(f"--merge: {p} is not a fine-tuning bench")
        loaded.append(res)
    first = dict(loaded[0]["config"])
    for d, res in zip(dirs, loaded):
        other = dict(res["config"])
        diff = sorted(k for k in first if k not in ("seeds", "threads", "tensorboard", "cache_dir")
                      and first[k] != other.get(k))
        if diff or res["corpora"] != loaded[0]["corpora"] or \
                res["pretrained"]["checkpoint_sha256"] != loaded[0]["pretrained"]["checkpoint_sha256"]:
            raise ValueError(f"--merge: {d} differs from {dirs[0]} in {diff or 'its corpora / pretrained model'}")
    runs = [r for res in loaded for r in res["runs"]]
    seeds = sorted({r["seed"] for r in runs})
    if len({(r["method"], r["seed"]) for r in runs}) != len(runs):
        raise ValueError("--merge: the benches share a (method, seed) run")
    first["seeds"] = tuple(seeds)
    first["methods"] = tuple(first["methods"])
    cfg = FinetuneConfig(**first)
    return write_report(cfg, runs, loaded[0]["summary"]["pretrain_old_val_loss"], loaded[0]["corpora"],
                        loaded[0]["pretrained"], loaded[0]["device"], out_dir, log)


# ------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    d = FinetuneConfig()
    p = argparse.ArgumentParser(
        prog="pmptrain bench --task finetune",
        description="Fine-tuning by control: pretrain a byte-level GPT once (cached) on --pretrain-corpus, "
                    "fine-tune it on --tune-corpus with full fine-tuning, LoRA, parallel, nonlinear and "
                    "binary/ternary controls, report loss, forgetting, memory, adapter bytes and step time.",
        epilog="methods: " + ", ".join(f"{m} ({k or 'full'} by {o})" for m, (k, o) in METHODS.items())
               + "\nexample: pmptrain bench --task finetune --seeds 0,1,2 --out runs/finetune",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--out", default=None, help="output directory (default runs/finetune-<timestamp>)")
    a("--methods", default=",".join(d.methods), help=f"comma-separated rows (default {','.join(d.methods)})")
    a("--seeds", default=",".join(map(str, d.seeds)), help="comma-separated seeds (default 0,1,2)")
    a("--model", default=d.model, help="gpt (default: byte-level GPT, corpora below) or mnist1d (a residual MLP "
      "pretrained on MNIST-1D classes 0-4, tuned on classes 5-9)")
    a("--pretrain-corpus", default=d.pretrain_corpus, help="pysrc (default), fortunes or a text file")
    a("--tune-corpus", default=d.tune_corpus, help="licenses (default: /usr/share/common-licenses) or a text file")
    for k in ("max_bytes", "n_layer", "n_head", "n_embd", "seq_len", "batch_size", "pretrain_steps", "steps",
              "eval_every", "eval_batches", "rank"):
        a(f"--{k.replace('_', '-')}", type=int, default=getattr(d, k), help=f"(default {getattr(d, k)})")
    for k in ("pretrain_lr", "lr_full", "lr_adapter", "emsa_lr", "emsa_rho", "dmsa_rho", "dmsa_decay",
              "dmsa_scale_lr", "warmup", "clip"):
        a(f"--{k.replace('_', '-')}", type=float, default=getattr(d, k), help=f"(default {getattr(d, k):g})")
    a("--threads", type=int, default=None, help="torch intra-op threads")
    a("--no-tensorboard", action="store_true", help="do not write TensorBoard logs")
    a("--cache-dir", default=None, help="where the pretrained model is cached (default ~/.cache/pmptrain/finetune)")
    a("--device", default=None, help="cpu / cuda (default: cuda when available; cpu under torchrun)")
    a("--fsdp", action="store_true", help="under torchrun: shard every row's model with FSDP2 (fully_shard on "
      "each block, then the root), each rank training on its rows of every batch (required there)")
    a("--merge", default=None, metavar="DIR,DIR,...",
      help="do not train: pool the runs of benches that differ only in --seeds (e.g. one process per seed) "
           "into one report in --out")
    return p


def _seeds(text: str):
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--seeds: expected a comma-separated list of integers, got {text!r}") from None


def main(argv: List[str]) -> int:
    """``pmptrain bench --task finetune ...`` (``argv`` without ``--task finetune``); exit status."""
    ns = build_parser().parse_args(argv)
    try:
        if ns.merge:
            if not ns.out:
                raise ValueError("--merge: needs --out for the merged report")
            merge_benches([Path(d) for d in ns.merge.split(",") if d.strip()], Path(ns.out))
            return 0
        fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
        kw = {k: v for k, v in vars(ns).items() if k in fields and k not in ("methods", "seeds")}
        cfg = FinetuneConfig(**kw, methods=tuple(m.strip() for m in ns.methods.split(",") if m.strip()),
                             seeds=_seeds(ns.seeds), tensorboard=not ns.no_tensorboard)
        cfg.validate()
        out = Path(ns.out) if ns.out else Path("runs") / time.strftime("finetune-%Y%m%d-%H%M%S")
        check_out_dir(out)  # the classifier bench's check: exit 2 before anything is loaded
    except (ValueError, FileNotFoundError) as e:
        print(f"pmptrain bench --task finetune: error: {e}", file=sys.stderr)
        return 2
    from .ranks import run_ranked

    return run_ranked("pmptrain bench --task finetune", out, lambda o: run_finetune_bench(cfg, o, device=ns.device))
