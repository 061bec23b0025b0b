"""Train/evaluate loop of ``pmptrain bench``: timing, checkpoints, exact resume, logging, ranks.

One *run* trains one model with one optimizer setting and one seed (:func:`run_one`); a *bench*
(:func:`run_bench`) runs every optimizer × (tuning value) × seed of a :class:`BenchConfig` and
hands the results to :mod:`pmptrain.bench.report`.

Determinism. A run seeds ``torch``, ``random`` and ``numpy`` with its seed, builds the model
(same seed ⇒ same initial weights for every optimizer), discretises it if the optimizer needs it,
and draws its batches from :func:`pmptrain.bench.data.make_loader` with ``(seed, epoch)``, so the
batch order does not depend on any global RNG. Checkpoints (``checkpoint.pt``, written atomically
after every epoch by :mod:`pmptrain.bench.checkpoint`: plain data only, SHA-256-checked, the
previous good one kept as ``checkpoint.prev.pt``) hold the model and optimizer ``state_dict`` s, the
``torch``/``random``/``numpy`` RNG states, the epoch and the history; resuming restores all of
them, so an interrupted run continues to the same final numbers as an uninterrupted one (the
timings differ, of course). A killed run loses at most the epoch in progress; a damaged newest
checkpoint, at most one more.

Measurements (per run; see :func:`run_one`):

* ``step_time``: wall-clock of one training step (zero_grad, forward, backward, optimizer step),
  ``time.perf_counter``; the run reports the median over all its steps. The ratio to SGD uses SGD's
  median step time measured in the same bench (the ``sgd`` runs, or a 30-step SGD reference on the
  same model, data and seed when ``sgd`` is not benchmarked).
* ``seconds``: cumulative training wall-clock at the end of each epoch (evaluation excluded);
  ``epochs_to_target`` / ``seconds_to_target``: first epoch whose test accuracy ≥ ``target_acc``.
* ``peak_rss_mb``: peak resident set size of the whole process during the run, sampled every
  10 ms from ``/proc/self/statm`` by a background thread (Linux); ``rss_increase_mb`` is that peak
  minus the RSS when the run started, i.e. the run's own high-water mark above what the process
  already held (data set, earlier runs' freed-but-cached memory is *not* subtracted). Without
  ``/proc`` both fall back to ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the process's lifetime
  high-water mark. ``optimizer_state_mb`` is exact: the bytes of every tensor in the optimizer's
  ``state_dict()`` (latents, moments, accumulators, running statistics).

Distributed. Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) :func:`init_distributed` starts a
gloo group; each global batch is split across ranks (``make_loader(rank, world_size)``), the model
is wrapped in ``DistributedDataParallel``, and each rank's loss is ``Σ_local ℓ · world/B_global``,
so the averaged gradient equals the single-process one (with equal shards this is the local mean,
which is what the PMP optimizers' costate scaling assumes; they refuse unequal shards under DDP).
``--batch-size`` must be divisible by the number of ranks, and a final global batch that cannot be
split into equal shards is dropped. Only rank 0 writes files, logs and prints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._io import atomic_write
from . import checkpoint
from .registry import OptimizerSpec, get_spec

__all__ = ["BenchConfig", "LOSSES", "squared_hinge_loss", "run_one", "run_bench", "init_distributed",
           "dist_info", "versions", "git_hash", "DEFAULT_OPTIMIZERS"]

#: Optimizers of the default ``pmptrain bench`` (MNIST-1D, ~2 minutes on 2 cores).
DEFAULT_OPTIMIZERS: Tuple[str, ...] = ("sgd", "adam", "emsa", "binary-msa", "binaryconnect")


# --------------------------------------------------------------------------------------------
# losses


def squared_hinge_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample squared hinge loss on one-hot ±1 targets (Courbariaux et al.; Li & Hao 2018).

    With ``t_k = +1`` for the true class and ``−1`` otherwise,
    ``ℓ_s = (1/K) Σ_k max(0, 1 − t_k · logits_sk)²``; the batch mean of ``ℓ_s`` is then the mean
    over all ``B·K`` entries, as in the reference code ``mean(sqr(maximum(0, 1 − t·y)))``.
    """
    t = torch.full_like(logits, -1.0).scatter_(1, y.view(-1, 1), 1.0)
    return torch.clamp(1.0 - t * logits, min=0.0).pow(2).mean(dim=1)


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


#: Per-sample losses by name: ``fn(logits, labels) -> (B,)``.
LOSSES: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross-entropy": _cross_entropy,
    "squared-hinge": squared_hinge_loss,
}


# --------------------------------------------------------------------------------------------
# configuration


@dataclasses.dataclass
class BenchConfig:
    """Everything that determines a bench; the fields of ``pmptrain train --config X.yaml``.

    Attributes (defaults in brackets; the CLI option is ``--`` + the name with ``-``):
        dataset: data-set name [``"mnist1d"``]. model: model name [``"mlp"``].
        model_args: keyword arguments of the model builder [``{}``].
        optimizers: registry names [:data:`DEFAULT_OPTIMIZERS`].
        optimizer_args: per-optimizer keyword overrides, ``{name: {key: value}}`` [``{}``].
        epochs: training epochs [20]. seeds: seeds, one run each [``[0, 1, 2]``].
        batch_size: global batch size [128]. eval_batch_size: evaluation batch [1000].
        lr: value of each optimizer's step-size hyper-parameter (``spec.lr_key``), either one
            number for all or ``{name: value}`` [None: registry defaults].
        tune: ``None`` or ``"lr"``: run every value of each optimizer's grid, keep the best
            (median final validation accuracy over seeds) [None].
        val_fraction: validation split carved from the training set; ``None`` means 0.1 when
            tuning and 0 otherwise [None].
        target_acc: test accuracy (fraction) for epochs/seconds-to-target [0.6].
        loss: ``"cross-entropy"`` or ``"squared-hinge"`` [``"cross-entropy"``].
        keep: layers left full precision in discrete runs, subset of ``["first", "last"]``
            [``["first", "last"]``]. scale: ``None``, ``"tensor"`` or ``"channel"`` [``"tensor"``].
        init: ``"sign"`` or ``"uniform"`` discretisation of the initial weights [``"sign"``].
        max_train, max_test: truncate the splits (smoke runs) [None]. mnist1d_samples: size of
            the generated MNIST-1D set [5000]. data_dir, download: see :mod:`pmptrain.bench.data`.
        tensorboard: write TensorBoard logs [True]. threads: ``torch.set_num_threads`` [None].
        preset: name of the preset the config came from, for the record [None].
    """

    dataset: str = "mnist1d"
    model: str = "mlp"
    model_args: Dict[str, Any] = dataclasses.field(default_factory=dict)
    optimizers: List[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_OPTIMIZERS))
    optimizer_args: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    epochs: int = 20
    seeds: List[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    batch_size: int = 128
    eval_batch_size: int = 1000
    lr: Any = None
    tune: Optional[str] = None
    val_fraction: Optional[float] = None
    target_acc: float = 0.6
    loss: str = "cross-entropy"
    keep: List[str] = dataclasses.field(default_factory=lambda: ["first", "last"])
    scale: Optional[str] = "tensor"
    init: str = "sign"
    max_train: Optional[int] = None
    max_test: Optional[int] = None
    mnist1d_samples: int = 5000
    data_dir: Optional[str] = None
    download: Optional[bool] = None
    tensorboard: bool = True
    threads: Optional[int] = None
    preset: Optional[str] = None

    @classmethod
    def from_dict(cls, d: Dict[str, Any], where: str = "config") -> "BenchConfig":
        """Build from a mapping (YAML/JSON); unknown keys raise ``ValueError`` naming them."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a mapping of options, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k.replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{where}: unknown option(s) {unknown}; valid: {sorted(names)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    # ---------------------------------------------------------------- validation
    def validate(self) -> "BenchConfig":
        """Check every field; raise ``ValueError`` naming the option and the value."""
        def bad(opt, msg):
            raise ValueError(f"--{opt.replace('_', '-')}: {msg}")

        def pos_int(opt, v, allow_none=False):
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(opt, f"must be a positive integer, got {v!r}")

        from .data import DATASETS, _canonical
        from .models import MODELS

        try:
            _canonical(self.dataset)
        except ValueError:
            bad("dataset", f"unknown data set {self.dataset!r}; valid: {', '.join(DATASETS)}")
        if str(self.model).strip().lower().replace("-", "_") not in MODELS:
            bad("model", f"unknown model {self.model!r}; valid: {', '.join(sorted(MODELS))}")
        if not isinstance(self.model_args, dict):
            bad("model_args", f"must be a mapping, got {self.model_args!r}")
        if isinstance(self.optimizers, str):
            self.optimizers = [s for s in self.optimizers.split(",") if s.strip()]
        if not self.optimizers:
            bad("optimizers", "needs at least one optimizer")
        self.optimizers = [get_spec(n).name for n in self.optimizers]  # raises with valid names
        if len(set(self.optimizers)) != len(self.optimizers):
            bad("optimizers", f"names repeated: {self.optimizers}")
        if not isinstance(self.optimizer_args, dict):
            bad("optimizer_args", f"must be a mapping {{optimizer: {{key: value}}}}, got {self.optimizer_args!r}")
        self.optimizer_args = {get_spec(k).name: dict(v or {}) for k, v in self.optimizer_args.items()}
        pos_int("epochs", self.epochs)
        if isinstance(self.seeds, int) and not isinstance(self.seeds, bool):
            self.seeds = list(range(self.seeds))
        if (not isinstance(self.seeds, (list, tuple)) or not self.seeds
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds)):
            bad("seeds", f"must be a count or a non-empty list of non-negative integers, got {self.seeds!r}")
        self.seeds = list(self.seeds)
        if len(set(self.seeds)) != len(self.seeds):
            bad("seeds", f"seeds repeated: {self.seeds}")
        pos_int("batch_size", self.batch_size)
        pos_int("eval_batch_size", self.eval_batch_size)
        if self.lr is not None:
            if isinstance(self.lr, dict):
                self.lr = {get_spec(k).name: v for k, v in self.lr.items()}
                vals = list(self.lr.values())
            else:
                vals = [self.lr]
            for v in vals:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                    bad("lr", f"must be a finite number >= 0 (or name=value pairs), got {self.lr!r}")
        if self.tune not in (None, "lr"):
            bad("tune", f"only 'lr' can be tuned, got {self.tune!r}")
        if self.tune and self.lr is not None:
            bad("tune", "--tune lr and --lr are exclusive")
        if self.val_fraction is not None and (
                not isinstance(self.val_fraction, (int, float)) or not 0 <= self.val_fraction < 1):
            bad("val_fraction", f"must be in [0, 1), got {self.val_fraction!r}")
        if not isinstance(self.target_acc, (int, float)) or not 0 < self.target_acc <= 1:
            bad("target_acc", f"must be a fraction in (0, 1], got {self.target_acc!r}")
        if self.loss not in LOSSES:
            bad("loss", f"unknown loss {self.loss!r}; valid: {', '.join(LOSSES)}")
        if isinstance(self.keep, str):
            self.keep = [] if self.keep.lower() in ("", "none") else self.keep.split(",")
        if not isinstance(self.keep, (list, tuple)) or set(self.keep) - {"first", "last"}:
            bad("keep", f"must be a subset of first,last (or none), got {self.keep!r}")
        self.keep = list(self.keep)
        if isinstance(self.scale, str) and self.scale.lower() == "none":
            self.scale = None
        if self.scale not in (None, "tensor", "channel"):
            bad("scale", f"must be none, tensor or channel, got {self.scale!r}")
        if self.init not in ("sign", "uniform"):
            bad("init", f"must be sign or uniform, got {self.init!r}")
        pos_int("max_train", self.max_train, allow_none=True)
        pos_int("max_test", self.max_test, allow_none=True)
        if isinstance(self.mnist1d_samples, bool) or not isinstance(self.mnist1d_samples, int) \
                or self.mnist1d_samples < 10:
            bad("mnist1d_samples", f"must be an integer >= 10, got {self.mnist1d_samples!r}")
        pos_int("threads", self.threads, allow_none=True)
        return self

    # ---------------------------------------------------------------- derived
    def effective_val_fraction(self) -> float:
        if self.val_fraction is not None:
            return float(self.val_fraction)
        return 0.1 if self.tune else 0.0

    def settings(self, name: str) -> List[Dict[str, Any]]:
        """The hyper-parameter settings (keyword overrides) run for optimizer ``name``."""
        spec = get_spec(name)
        base = dict(self.optimizer_args.get(spec.name, {}))
        if self.tune:
            return [dict(base, **{spec.lr_key: v}) for v in spec.tune_grid]
        lr = self.lr.get(spec.name) if isinstance(self.lr, dict) else self.lr
        if lr is not None:
            base[spec.lr_key] = lr
        return [base]


# --------------------------------------------------------------------------------------------
# environment, records, files


def dist_info() -> Tuple[int, int]:
    """``(rank, world_size)``: from an initialised process group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed() -> Tuple[int, int]:
    """Start a gloo process group if launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the
    environment) and none is running; return ``(rank, world_size)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return dist_info()


def git_hash(path: Optional[Path] = None) -> Optional[str]:
    """The git commit of the source tree (``+dirty`` if modified), or None if unavailable."""
    cwd = str(path or Path(__file__).resolve().parent)
    try:
        h = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                           timeout=10)
        if h.returncode != 0:
            return None
        d = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                           capture_output=True, text=True, timeout=10)
        return h.stdout.strip() + ("+dirty" if d.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> Dict[str, Any]:
    """Python, torch, numpy and pmptrain versions, platform, and the git hash."""
    from .. import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "pmptrain": __version__, "platform": platform.platform(), "git": git_hash()}


def atomic_write_json(obj: Any, path: Path) -> None:
    """Write JSON atomically (temporary file + ``os.replace``)."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


class PeakRSS:
    """Context manager sampling the process RSS every ``interval`` s; see the module docstring."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.start = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = None

    def _loop(self):
        while not self._stop.wait(self.interval):
            r = _rss_bytes()
            if r is not None and r > self.peak:
                self.peak = r

    def __enter__(self):
        if self.start is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            r = _rss_bytes()
            self.peak = max(self.peak, r or 0)
        return False

    def result_mb(self) -> Tuple[float, float]:
        """``(peak_rss_mb, rss_increase_mb)``."""
        if self.start is None:
            m = _maxrss_bytes() / 2**20
            return m, float("nan")
        return self.peak / 2**20, (self.peak - self.start) / 2**20


def _state_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v) for v in obj)
    return 0


def _rng_state() -> Dict[str, Any]:
    """The global RNG states as plain data (tensors, ints, floats, strings: what a checkpoint may
    hold, docs/cli.md)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss},
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}


def _set_rng_state(st: Dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    py, npy = st["python"], st["numpy"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


# --------------------------------------------------------------------------------------------
# data, model, optimizer


def load_data(cfg: BenchConfig):
    """The :class:`~pmptrain.bench.data.ArrayDataset` of ``cfg``."""
    from .data import load_dataset

    return load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download,
                        val_fraction=cfg.effective_val_fraction(), max_train=cfg.max_train,
                        max_test=cfg.max_test, mnist1d_samples=cfg.mnist1d_samples)


def build_run(cfg: BenchConfig, data, spec: OptimizerSpec, overrides: Dict[str, Any], seed: int,
              world: int = 1):
    """``(module, wrapped, optimizer)`` for one run: seeded model, discretised if the optimizer
    needs it, wrapped in DDP when ``world > 1``."""
    from .models import build_model

    _seed_all(seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes, **cfg.model_args)
    if spec.discrete:
        from ..quant import discretize_

        gen = torch.Generator().manual_seed(seed)
        discretize_(model, levels=spec.levels, keep=tuple(cfg.keep), init=cfg.init, scale=cfg.scale,
                    generator=gen)
    wrapped = model
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(model)
    try:
        opt = spec.build(wrapped if spec.takes_wrapper else model, **overrides)
    except TypeError as e:
        raise ValueError(f"--opt-arg: bad option for optimizer {spec.name!r}: {e}") from e
    return model, wrapped, opt


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, batch_size: int
             ) -> Tuple[float, float]:
    """``(mean loss, accuracy)`` of ``model`` (in eval mode) on ``(x, y)``."""
    was = model.training
    model.eval()
    total, correct, n = 0.0, 0, 0
    for i in range(0, len(x), batch_size):
        out = model(x[i:i + batch_size])
        yb = y[i:i + batch_size]
        total += float(loss_fn(out, yb).double().sum())
        correct += int((out.argmax(1) == yb).sum())
        n += len(yb)
    model.train(was)
    return total / max(n, 1), correct / max(n, 1)


def _float(v) -> Optional[float]:
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        v = v.detach()
        return float(v.item()) if v.numel() == 1 else None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _diagnostics(opt) -> Dict[str, float]:
    """PMP diagnostics of the last step: ``hamiltonian_gain``, ``flip_ratio``, ``density``."""
    out: Dict[str, float] = {}
    last = getattr(opt, "last_step", None)
    if isinstance(last, dict):
        for k in ("hamiltonian_gain", "flip_ratio", "density"):
            v = _float(last.get(k))
            if v is not None and math.isfinite(v):
                out[k] = v
        disc = last.get("discrete")
        if disc is not None and "flip_ratio" not in out and disc["layers"]:
            out["flip_ratio"] = float(disc["total"]["flip_ratio"])
    return out


def _density(model: nn.Module) -> Optional[float]:
    """Fraction of non-zero discrete weights (None for full-precision models)."""
    from ..quant import discrete_parameters

    dts = discrete_parameters(model)
    if not dts:
        return None
    nz = sum(int((d.param != 0).sum()) for d in dts)
    return nz / sum(d.param.numel() for d in dts)


# --------------------------------------------------------------------------------------------
# one run


def _after_checkpoint(run_dir: Path, epoch: int) -> None:
    """Called after each epoch's checkpoint is written (tests patch it to simulate a kill)."""


def _progress(total: int, desc: str, rank: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True,
                disable=(rank != 0) or not sys.stderr.isatty())


def _summarise(history: List[Dict[str, Any]], target: float, extra: Dict[str, Any]) -> Dict[str, Any]:
    steps = [t for h in history for t in h["step_times"]]
    reach = next((h for h in history if h["test_acc"] >= target), None)
    out = {
        "final_test_acc": history[-1]["test_acc"] if history else None,
        "final_test_loss": history[-1]["test_loss"] if history else None,
        "best_test_acc": max(h["test_acc"] for h in history) if history else None,
        "final_val_acc": history[-1].get("val_acc") if history else None,
        "epochs_to_target": reach["epoch"] + 1 if reach else None,
        "seconds_to_target": reach["seconds"] if reach else None,
        "median_step_time": statistics.median(steps) if steps else None,
        "train_seconds": history[-1]["seconds"] if history else 0.0,
        "skipped_steps": history[-1]["skipped_steps"] if history else 0,
    }
    out.update(extra)
    return out


def run_one(cfg: BenchConfig, data, name: str, overrides: Dict[str, Any], seed: int,
            run_dir: Optional[Path], tb_dir: Optional[Path] = None, resume: bool = False,
            max_steps: Optional[int] = None, desc: str = "") -> Dict[str, Any]:
    """Train one (optimizer setting, seed) for ``cfg.epochs`` epochs.

    Args:
        cfg: the bench configuration. data: the loaded :class:`ArrayDataset`.
        name: optimizer registry name. overrides: keyword overrides of its defaults.
        seed: model-initialisation and batch-order seed.
        run_dir: where ``checkpoint.pt`` and ``run.json`` go (rank 0 only); None writes nothing.
        tb_dir: TensorBoard log directory (None: no logging).
        resume: continue from ``run_dir/checkpoint.pt`` if it exists (a finished run is read
            back from ``run.json`` without training).
        max_steps: stop after this many steps of the first epoch, write nothing (timing
            reference); default None.
        desc: progress-bar label.

    Returns:
        the run record: ``optimizer``, ``hparams``, ``seed``, ``history`` (one dict per epoch:
        ``epoch, train_loss, train_acc, test_loss, test_acc, [val_loss, val_acc], seconds,
        epoch_seconds, step_times, skipped_steps, [density, hamiltonian_gain, flip_ratio]``) and
        ``summary`` (see :func:`_summarise`).
    """
    rank, world = dist_info()
    spec = get_spec(name)
    writes = run_dir is not None and rank == 0 and max_steps is None
    ckpt_path = Path(run_dir) / "checkpoint.pt" if run_dir is not None else None
    record_path = Path(run_dir) / "run.json" if run_dir is not None else None
    if resume and record_path is not None and record_path.is_file():
        rec = json.loads(record_path.read_text())
        if rec.get("status") == "done" and rec.get("epochs") == cfg.epochs:
            return rec

    loss_fn = LOSSES[cfg.loss]
    model, wrapped, opt = build_run(cfg, data, spec, overrides, seed, world)
    hparams = dict(spec.defaults, **overrides)

    history: List[Dict[str, Any]] = []
    start_epoch, peak_prev, inc_prev = 0, 0.0, 0.0
    found = checkpoint.load_latest(ckpt_path) if resume and ckpt_path is not None else None
    if found is not None:
        ck, _ = found
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        _set_rng_state(ck["rng"])
        history = ck["history"]
        start_epoch = ck["epoch"] + 1
        peak_prev, inc_prev = ck.get("peak_rss_mb", 0.0), ck.get("rss_increase_mb", 0.0)

    record = {"optimizer": spec.name, "hparams": hparams, "lr_key": spec.lr_key, "seed": seed,
              "epochs": cfg.epochs, "world_size": world, "config": cfg.to_dict(),
              "versions": versions() if writes else None, "status": "running", "history": history}
    if writes:
        Path(run_dir).mkdir(parents=True, exist_ok=True)

    # a final global batch that cannot be split into equal shards is dropped (DDP averages the
    # ranks' gradients uniformly: the PMP optimizers refuse unequal per-rank batches)
    uneven_tail = world > 1 and (len(data.train_x) % cfg.batch_size) % world != 0
    writer = None
    if tb_dir is not None and rank == 0 and max_steps is None:
        from torch.utils.tensorboard import SummaryWriter  # lazy: heavy import

        steps_per_epoch = -(-len(data.train_x) // cfg.batch_size) - int(uneven_tail)
        writer = SummaryWriter(str(tb_dir), purge_step=start_epoch * steps_per_epoch)

    from .data import make_loader

    state_mb = _state_bytes(opt.state_dict()) / 2**20
    seconds = history[-1]["seconds"] if history else 0.0
    all_step_times: List[float] = []
    try:
        with PeakRSS() as mem:
            for epoch in range(start_epoch, cfg.epochs):
                loader = make_loader(data.train_x, data.train_y, cfg.batch_size, shuffle=True,
                                     seed=seed, epoch=epoch, rank=rank, world_size=world, drop_last=uneven_tail)
                batches = loader.global_batches()
                wrapped.train()
                step_times, diag_sum, diag_n = [], {}, 0
                loss_sum, correct, count = 0.0, 0, 0
                bar = _progress(len(batches), desc or f"{spec.name} seed {seed} ep {epoch + 1}", rank)
                for i, (xb, yb) in enumerate(loader):
                    gb = len(batches[i])
                    t0 = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                    out = wrapped(xb)
                    per = loss_fn(out, yb)
                    loss = per.mean() if world == 1 else per.sum() * (world / gb)
                    loss.backward()
                    opt.step()
                    dt = time.perf_counter() - t0
                    step_times.append(dt)
                    stats = torch.stack([per.detach().sum().double(),
                                         (out.detach().argmax(1) == yb).sum().double()])
                    if world > 1:
                        torch.distributed.all_reduce(stats)
                    loss_sum += float(stats[0])
                    correct += int(stats[1])
                    count += gb
                    diag = _diagnostics(opt)
                    for k, v in diag.items():
                        diag_sum[k] = diag_sum.get(k, 0.0) + v
                    diag_n += 1
                    bar.update(1)
                    if writer is not None:
                        gstep = epoch * len(batches) + i
                        writer.add_scalar("train/loss", float(stats[0]) / gb, gstep)
                        writer.add_scalar("train/acc", float(stats[1]) / gb, gstep)
                        writer.add_scalar("train/step_time_ms", dt * 1e3, gstep)
                        for k, v in diag.items():
                            writer.add_scalar(f"pmp/{k}", v, gstep)
                    if max_steps is not None and len(step_times) >= max_steps:
                        break
                bar.close()
                if max_steps is None and callable(getattr(opt, "end_epoch", None)):
                    opt.end_epoch()  # e.g. DiscreteMSA: 1 - decay shrinks by decay_gamma
                if max_steps is not None:
                    if hasattr(opt, "detach"):
                        opt.detach()
                    return {"optimizer": spec.name, "step_times": step_times,
                            "median_step_time": statistics.median(step_times)}
                seconds += sum(step_times)
                all_step_times += step_times
                test_loss, test_acc = evaluate(model, data.test_x, data.test_y, loss_fn,
                                               cfg.eval_batch_size)
                h = {"epoch": epoch, "train_loss": loss_sum / max(count, 1),
                     "train_acc": correct / max(count, 1), "test_loss": test_loss,
                     "test_acc": test_acc, "seconds": seconds, "epoch_seconds": sum(step_times),
                     "step_times": step_times,
                     "skipped_steps": int(getattr(opt, "skipped_steps", 0))}
                if data.val_x is not None:
                    h["val_loss"], h["val_acc"] = evaluate(model, data.val_x, data.val_y, loss_fn,
                                                           cfg.eval_batch_size)
                for k, v in diag_sum.items():
                    h[k] = v / max(diag_n, 1)
                if spec.discrete:
                    dens = _density(model)
                    if dens is not None:
                        h["density"] = dens
                history.append(h)
                if writer is not None:
                    for k in ("train_loss", "train_acc", "test_loss", "test_acc", "val_loss",
                              "val_acc", "density"):
                        if k in h:
                            part, _, metric = k.partition("_")
                            writer.add_scalar(f"epoch/{part}_{metric}", h[k], epoch)
                    writer.add_scalar("epoch/seconds", seconds, epoch)
                    writer.flush()
                if writes:
                    pk, ic = mem.result_mb()
                    checkpoint.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                 "rng": _rng_state(), "epoch": epoch, "history": history,
                                 "config": cfg.to_dict(), "optimizer_name": spec.name,
                                 "hparams": hparams, "seed": seed,
                                 "peak_rss_mb": max(pk, peak_prev),
                                 "rss_increase_mb": max(ic, inc_prev)}, ckpt_path)
                    atomic_write_json(record, record_path)
                _after_checkpoint(Path(run_dir) if run_dir is not None else None, epoch)
    finally:
        if writer is not None:
            writer.close()

    pk, ic = mem.result_mb()
    extra = {"peak_rss_mb": max(pk, peak_prev), "rss_increase_mb": max(ic, inc_prev),
             "optimizer_state_mb": _state_bytes(opt.state_dict()) / 2**20 or state_mb}
    record["summary"] = _summarise(history, cfg.target_acc, extra)
    record["status"] = "done"
    if writes:
        atomic_write_json(record, record_path)
    if hasattr(opt, "detach"):
        opt.detach()
    return record


# --------------------------------------------------------------------------------------------
# the bench


def _fmt_value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _median(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else None


def _broadcast(obj, rank: int, world: int):
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def run_bench(cfg: BenchConfig, out_dir: Path, resume: bool = False,
              log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run every optimizer × setting × seed of ``cfg`` into ``out_dir`` and write the report.

    Layout of ``out_dir``: ``config.json`` (the config, versions, git hash, world size),
    ``runs/<optimizer>[/<key>=<value>]/seed<k>/{checkpoint.pt,run.json}``,
    ``tensorboard/<optimizer>[/<key>=<value>]/seed<k>/``, ``sgd_reference.json`` (when ``sgd`` is
    not benchmarked), and the report files of :func:`pmptrain.bench.report.write_report`.

    Returns:
        the results dict written to ``results.json``.
    """
    from . import report

    cfg.validate()
    rank, world = dist_info()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(out_dir)
    say = log if rank == 0 else (lambda *_: None)
    if world > 1 and cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {world} ranks: the PMP optimizers "
                         "refuse unequal per-rank batches under DistributedDataParallel")
    meta = {"config": cfg.to_dict(), "versions": versions(), "world_size": world,
            "command": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    data = load_data(cfg)  # before creating anything: missing data leaves no empty bench dir
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not (resume and (out_dir / "config.json").is_file()):
            atomic_write_json(meta, out_dir / "config.json")
    say(f"data: {data!r}")

    runs: List[Dict[str, Any]] = []
    chosen: Dict[str, Dict[str, Any]] = {}
    # every (optimizer, setting) × seed, interleaved seed-major (seed 0 of every optimizer, then
    # seed 1, …) so that a change of machine load does not fall on one optimizer's timings
    settings = {name: list(cfg.settings(name)) for name in cfg.optimizers}
    recs_of: Dict[Tuple[str, int], List[Dict[str, Any]]] = {}
    for seed in cfg.seeds:
        for name in cfg.optimizers:
            spec = get_spec(name)
            for i, overrides in enumerate(settings[name]):
                sub = Path("runs") / spec.name
                tb = Path("tensorboard") / spec.name
                if cfg.tune:
                    tag = f"{spec.lr_key}={_fmt_value(overrides[spec.lr_key])}"
                    sub, tb = sub / tag, tb / tag
                rec = run_one(cfg, data, spec.name, overrides, seed, out_dir / sub / f"seed{seed}",
                              (out_dir / tb / f"seed{seed}") if cfg.tensorboard else None,
                              resume=resume)
                s = rec["summary"]
                say(f"{spec.name:>15} {dict(overrides)} seed {seed}: test acc "
                    f"{s['final_test_acc']:.4f} (best {s['best_test_acc']:.4f}), "
                    f"median step {1e3 * s['median_step_time']:.2f} ms")
                recs_of.setdefault((name, i), []).append(rec)
    for name in cfg.optimizers:
        spec = get_spec(name)
        per_setting = [(o, recs_of[(name, i)]) for i, o in enumerate(settings[name])]
        if cfg.tune:
            key = "final_val_acc" if data.val_x is not None else "final_test_acc"
            best = max(per_setting, key=lambda pr: _median([r["summary"][key] for r in pr[1]]) or -1)
            chosen[spec.name] = {"tuned": True, "selected_by": f"median {key} over seeds",
                                 "grid": list(spec.tune_grid), "lr_key": spec.lr_key,
                                 "value": best[0][spec.lr_key],
                                 "grid_scores": {_fmt_value(o[spec.lr_key]):
                                                 _median([r["summary"][key] for r in rs])
                                                 for o, rs in per_setting}}
            best_recs = best[1]
        else:
            best_recs = per_setting[0][1]
            chosen[spec.name] = {"tuned": False, "lr_key": spec.lr_key,
                                 "value": dict(spec.defaults, **per_setting[0][0])[spec.lr_key]}
        for overrides, recs in per_setting:
            for r in recs:
                r["selected"] = any(r is b for b in best_recs)
                runs.append(r)

    # SGD reference step time, measured in this bench
    sgd_runs = [r for r in runs if r["optimizer"] == "sgd" and r["selected"]]
    if sgd_runs:
        sgd_time = _median([r["summary"]["median_step_time"] for r in sgd_runs])
        sgd_source = "sgd runs of this bench (median over seeds)"
    else:
        ref_path = out_dir / "sgd_reference.json"
        ref = None
        if resume and ref_path.is_file():
            ref = json.loads(ref_path.read_text())
        ref = _broadcast(ref, rank, world)
        if ref is None:
            r = run_one(cfg, data, "sgd", {}, cfg.seeds[0], None, None, max_steps=30,
                        desc="sgd timing reference")
            ref = {"median_step_time": r["median_step_time"], "steps": len(r["step_times"])}
            if rank == 0:
                atomic_write_json(ref, ref_path)
        sgd_time = ref["median_step_time"]
        sgd_source = f"{ref['steps']}-step SGD reference on the same model, data and seed"

    results = report.aggregate(runs, chosen, cfg, meta, sgd_time, sgd_source)
    if rank == 0:
        report.write_report(results, out_dir, log=say)
    return results
