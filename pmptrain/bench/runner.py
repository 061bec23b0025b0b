"""One bench run: train and evaluate one model with one optimizer setting and one seed, with
timing, checkpoints, exact resume, logging and ranks. :mod:`pmptrain.bench.sweep` runs many.

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

Measurements (per run):

* ``step_time``: the time of one training step (zero_grad, forward, backward, optimizer step) on
  the bench's clock (``cfg.clock``, :mod:`pmptrain.bench.clock`): wall-clock (``time.perf_counter``,
  the default) or process CPU time (``time.process_time``, with one thread); the run reports the
  median over all its steps. The ratio to SGD uses SGD's
  median step time measured in the same bench (the ``sgd`` runs, or a 30-step SGD reference on the
  same model, data and seed when ``sgd`` is not benchmarked).
* ``seconds``: cumulative training time on that clock at the end of each epoch (evaluation
  excluded); ``epochs_to_target`` / ``seconds_to_target``: first epoch whose test accuracy ≥
  ``target_acc``. With ``cfg.eval_every = K`` the test set is also evaluated after every K-th step
  of the run (not timed): each epoch's ``probes`` list ``{step, seconds, test_acc}`` for those
  steps, which :func:`pmptrain.bench.report.time_to_final_acc` uses for a finer time to target.
* ``peak_rss_mb``: peak resident set size of the whole process during the run: the kernel's
  high-water mark (``VmHWM``), reset when the run starts (Linux; :mod:`pmptrain.bench.memory`;
  sampled every 10 ms where the reset is not allowed); ``rss_increase_mb`` is that peak
  minus the RSS when the run started, i.e. the run's own high-water mark above what the process
  already held (data set, earlier runs' freed-but-cached memory is *not* subtracted). Without
  ``/proc`` both fall back to ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the process's lifetime
  high-water mark. ``optimizer_state_mb`` is exact: the bytes of every tensor in the optimizer's
  ``state_dict()`` (latents, moments, accumulators, running statistics).
* PMP diagnostics: the epoch means of :meth:`pmptrain.optim.StepInfo.scalars` over the steps that
  reported them (``hamiltonian_gain``, ``flip_ratio``, ``density``; skipped steps report none), and
  ``skipped_steps``, the optimizer's running count. Optimizers that are not pmptrain's report none.

Distributed. Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) :func:`pmptrain.bench.ranks.init_distributed`
starts a gloo group; each global batch is split across ranks (``make_loader(rank, world_size)``), the
model is wrapped in ``DistributedDataParallel``, and each rank's loss is ``Σ_local ℓ · world/B_global``,
so the averaged gradient equals the single-process one (with equal shards this is the local mean,
which is what the PMP optimizers' costate scaling assumes; they refuse unequal shards under DDP).
``--batch-size`` must be divisible by the number of ranks, and a final global batch that cannot be
split into equal shards is dropped. Only rank 0 writes files, logs and prints.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..export import density
from ..optim.shell import PMPOptimizer
from . import checkpoint
from .clock import clock_fn
from .config import BenchConfig
from .data import ArrayDataset, load_dataset, make_loader
from .losses import LOSSES
from .memory import PeakRSS, state_bytes
from .models import build_model
from .ranks import dist_info
from .records import atomic_write_json, versions
from .registry import OptimizerSpec, get_spec
from .schema import refused_as
from .seeding import rng_state, seed_all, set_rng_state

__all__ = ["load_data", "build_run", "preflight", "evaluate", "run_one", "step_scalars", "progress_bar"]


# --------------------------------------------------------------------------------------------
# data, model, optimizer


def load_data(cfg: BenchConfig) -> ArrayDataset:
    """The :class:`~pmptrain.bench.data.ArrayDataset` of ``cfg``."""
    return load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download,
                        val_fraction=cfg.effective_val_fraction(), max_train=cfg.max_train,
                        max_test=cfg.max_test, mnist1d_samples=cfg.mnist1d_samples)


def build_run(cfg: BenchConfig, data, spec: OptimizerSpec, overrides: Dict[str, Any], seed: int,
              world: int = 1):
    """``(module, wrapped, optimizer)`` for one run: seeded model, discretised if the optimizer
    needs it, wrapped in DDP when ``world > 1``."""
    seed_all(seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes, **cfg.model_args)
    if spec.discrete:
        from ..quant import discretize_

        gen = torch.Generator().manual_seed(seed)
        discretize_(model, levels=spec.levels, keep=tuple(cfg.keep), init=cfg.init, scale=cfg.scale,
                    generator=gen)
    wrapped = model
    if world > 1 and cfg.fsdp:
        shard_model(model)
    elif world > 1:
        wrapped = nn.parallel.DistributedDataParallel(model)
    try:
        opt = spec.build(wrapped if spec.takes_wrapper else model, **overrides)
    except TypeError as e:
        raise ValueError(f"--opt-arg: bad option for optimizer {spec.name!r}: {e}") from e
    return model, wrapped, opt


def shard_model(model: nn.Module) -> None:
    """FSDP2: ``fully_shard`` every module that holds parameters of its own (innermost first), then
    the root, so each layer's parameters are all-gathered only around its own forward and backward."""
    from torch.distributed.fsdp import fully_shard

    for _, m in reversed(list(model.named_modules())):
        if m is not model and any(True for _ in m.parameters(recurse=False)):
            fully_shard(m)
    fully_shard(model)


def full_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's state dict with every sharded tensor gathered whole (a collective under FSDP2:
    every rank calls it); a plain model's state dict as it is."""
    from .. import distributed as pdist

    return {k: pdist.full_tensor(v) for k, v in model.state_dict().items()}


def load_full_state_dict(model: nn.Module, sd: Dict[str, torch.Tensor]) -> None:
    """Load whole tensors into ``model``, into each rank's shard under FSDP2."""
    from .. import distributed as pdist

    if not any(pdist.is_sharded(v) for v in model.state_dict().values()):
        model.load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True))


def _torch_opt_under_fsdp(model: nn.Module, opt) -> bool:
    from .. import distributed as pdist

    return not isinstance(opt, PMPOptimizer) and any(pdist.is_sharded(p) for p in model.parameters())


def optimizer_state_dict(model: nn.Module, opt) -> Dict[str, Any]:
    """The optimizer's state dict with whole tensors. Under FSDP2 the per-parameter state is held as
    DTensor shards, by torch's optimizers and by pmptrain's (pmptrain.optim.sharded), gathered here
    (a collective: every rank calls it)."""
    if _torch_opt_under_fsdp(model, opt):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    from ..optim.sharded import whole_state_dict

    return whole_state_dict(opt.state_dict())


def load_optimizer_state_dict(model: nn.Module, opt, sd: Dict[str, Any]) -> None:
    """Load what :func:`optimizer_state_dict` returned (into each rank's shards for torch's optimizers
    under FSDP2)."""
    if _torch_opt_under_fsdp(model, opt):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, sd, options=StateDictOptions(full_state_dict=True))
        return
    opt.load_state_dict(sd)


def preflight(cfg: BenchConfig, data, settings: Dict[str, List[Dict[str, Any]]]) -> None:
    """Build the model and every optimizer setting once, before any training, so that a value
    only the model builder or the optimizer can judge (``model_args``, ``--opt-arg`` ranges) is
    refused up front with the option named, instead of after the runs before it have trained.

    Raises:
        ConfigError: naming ``--model-args`` or ``--opt-arg <optimizer>``, with the builder's or
        the optimizer's own message.
    """
    with refused_as(f"--model-args: model {cfg.model!r} refuses {cfg.model_args}"):
        build_model(cfg.model, data.input_shape, data.num_classes, **cfg.model_args)
    for name, per in settings.items():
        spec = get_spec(name)
        for overrides in per:
            with refused_as(f"--opt-arg {spec.name}"):
                _, _, opt = build_run(cfg, data, spec, overrides, cfg.seeds[0], world=1)
            _detach(opt)


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


def step_scalars(opt: torch.optim.Optimizer) -> Dict[str, float]:
    """The last step's declared scalar diagnostics (:meth:`pmptrain.optim.StepInfo.scalars`) of a
    pmptrain optimizer; ``{}`` for any other optimizer."""
    return opt.last_step.scalars() if isinstance(opt, PMPOptimizer) else {}


def progress_bar(total: int, desc: str, rank: int):
    """A tqdm bar on rank 0 when stderr is a terminal (disabled otherwise)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True,
                disable=(rank != 0) or not sys.stderr.isatty())


# --------------------------------------------------------------------------------------------
# one epoch


@dataclasses.dataclass
class _EpochStats:
    """What one training epoch measured (sums over the global batches)."""

    step_times: List[float] = dataclasses.field(default_factory=list)
    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0
    diag_sum: Dict[str, float] = dataclasses.field(default_factory=dict)
    diag_n: Dict[str, int] = dataclasses.field(default_factory=dict)
    probes: List[Dict[str, float]] = dataclasses.field(default_factory=list)

    def add_scalars(self, diag: Dict[str, float]) -> None:
        for k, v in diag.items():
            self.diag_sum[k] = self.diag_sum.get(k, 0.0) + v
            self.diag_n[k] = self.diag_n.get(k, 0) + 1

    def diag_means(self) -> Dict[str, float]:
        return {k: v / self.diag_n[k] for k, v in self.diag_sum.items()}


def _uneven_tail(cfg: BenchConfig, data, world: int) -> bool:
    """Whether the final global batch cannot be split into equal shards across ``world`` ranks; it is
    then dropped (DDP averages the ranks' gradients uniformly, so the PMP optimizers refuse unequal
    per-rank batches)."""
    return world > 1 and (len(data.train_x) % cfg.batch_size) % world != 0


def _train_epoch(cfg: BenchConfig, data, opt, wrapped: nn.Module, loss_fn, seed: int, epoch: int,
                 rank: int, world: int, desc: str, writer=None, max_steps: Optional[int] = None,
                 probe=None, steps_before: int = 0, seconds_before: float = 0.0) -> _EpochStats:
    """Train one epoch of global batches (stop after ``max_steps`` steps if given). With
    ``cfg.eval_every = K`` and ``probe`` (a function returning the test accuracy), after every
    K-th step of the run (``steps_before`` steps and ``seconds_before`` seconds precede this epoch)
    but the epoch's last, ``probe()`` is recorded in ``probes`` with the run's step and training
    seconds; its own time is not counted."""
    loader = make_loader(data.train_x, data.train_y, cfg.batch_size, shuffle=cfg.shuffle,
                         seed=seed, epoch=epoch, rank=rank, world_size=world,
                         drop_last=_uneven_tail(cfg, data, world))
    batches = loader.global_batches()
    wrapped.train()
    st = _EpochStats()
    bar = progress_bar(len(batches), desc, rank)
    now = clock_fn(cfg.clock)
    for i, (xb, yb) in enumerate(loader):
        gb = len(batches[i])
        t0 = now()
        opt.zero_grad(set_to_none=True)
        out = wrapped(xb)
        per = loss_fn(out, yb)
        loss = per.mean() if world == 1 else per.sum() * (world / gb)
        loss.backward()
        opt.step()
        dt = now() - t0
        st.step_times.append(dt)
        sums = torch.stack([per.detach().sum().double(), (out.detach().argmax(1) == yb).sum().double()])
        if world > 1:
            torch.distributed.all_reduce(sums)
        st.loss_sum += float(sums[0])
        st.correct += int(sums[1])
        st.count += gb
        diag = step_scalars(opt)
        st.add_scalars(diag)
        bar.update(1)
        if writer is not None:
            gstep = epoch * len(batches) + i
            writer.add_scalar("train/loss", float(sums[0]) / gb, gstep)
            writer.add_scalar("train/acc", float(sums[1]) / gb, gstep)
            writer.add_scalar("train/step_time_ms", dt * 1e3, gstep)
            for k, v in diag.items():
                writer.add_scalar(f"pmp/{k}", v, gstep)
        if max_steps is not None and len(st.step_times) >= max_steps:
            break
        step = steps_before + len(st.step_times)
        if probe is not None and cfg.eval_every and step % cfg.eval_every == 0 and i + 1 < len(batches):
            st.probes.append({"step": step, "seconds": seconds_before + sum(st.step_times), "test_acc": probe()})
    bar.close()
    return st


def _epoch_record(cfg: BenchConfig, data, model: nn.Module, opt, loss_fn, spec: OptimizerSpec,
                  epoch: int, seconds: float, st: _EpochStats) -> Dict[str, Any]:
    """The history entry of one epoch: training sums, evaluation, diagnostics."""
    test_loss, test_acc = evaluate(model, data.test_x, data.test_y, loss_fn, cfg.eval_batch_size)
    h = {"epoch": epoch, "train_loss": st.loss_sum / max(st.count, 1),
         "train_acc": st.correct / max(st.count, 1), "test_loss": test_loss, "test_acc": test_acc,
         "seconds": seconds, "epoch_seconds": sum(st.step_times), "step_times": st.step_times,
         "skipped_steps": opt.skipped_steps if isinstance(opt, PMPOptimizer) else 0}
    if cfg.eval_every:
        h["probes"] = st.probes
    if data.val_x is not None:
        h["val_loss"], h["val_acc"] = evaluate(model, data.val_x, data.val_y, loss_fn, cfg.eval_batch_size)
    h.update(st.diag_means())
    if spec.discrete:
        dens = density(model, cfg.density_convention)
        if dens is not None:
            h["density"] = dens  # of the whole model, after the epoch (not the per-step mean)
    return h


def _log_epoch(writer, h: Dict[str, Any], epoch: int) -> None:
    for k in ("train_loss", "train_acc", "test_loss", "test_acc", "val_loss", "val_acc", "density"):
        if k in h:
            part, _, metric = k.partition("_")
            writer.add_scalar(f"epoch/{part}_{metric}", h[k], epoch)
    writer.add_scalar("epoch/seconds", h["seconds"], epoch)
    writer.flush()


# --------------------------------------------------------------------------------------------
# one run


def _after_checkpoint(run_dir: Path, epoch: int) -> None:
    """Called after each epoch's checkpoint is written (tests patch it to simulate a kill)."""


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


def _detach(opt) -> None:
    if isinstance(opt, PMPOptimizer):
        opt.detach()


def time_steps(cfg: BenchConfig, data, name: str, seed: int, steps: int, desc: str = "") -> List[float]:
    """Seconds (on ``cfg.clock``) of the first ``steps`` training steps of optimizer ``name`` (registry
    defaults) on ``cfg``'s model and data with ``seed``; nothing is written (the SGD timing
    reference of :func:`pmptrain.bench.sweep.run_bench`)."""
    rank, world = dist_info()
    spec = get_spec(name)
    model, wrapped, opt = build_run(cfg, data, spec, {}, seed, world)
    try:
        st = _train_epoch(cfg, data, opt, wrapped, LOSSES[cfg.loss], seed, 0, rank, world,
                          desc or f"{spec.name} timing", max_steps=steps)
    finally:
        _detach(opt)
    return st.step_times


def run_one(cfg: BenchConfig, data, name: str, overrides: Dict[str, Any], seed: int,
            run_dir: Optional[Path], tb_dir: Optional[Path] = None, resume: bool = False,
            desc: str = "") -> Dict[str, Any]:
    """Train one (optimizer setting, seed) for ``cfg.epochs`` epochs.

    Args:
        cfg: the bench configuration. data: the loaded :class:`ArrayDataset`.
        name: optimizer registry name. overrides: keyword overrides of its defaults.
        seed: model-initialisation and batch-order seed.
        run_dir: where ``checkpoint.pt`` and ``run.json`` go (rank 0 only); None writes nothing.
        tb_dir: TensorBoard log directory (None: no logging).
        resume: continue from ``run_dir/checkpoint.pt`` if it exists (a finished run is read
            back from ``run.json`` without training).
        desc: progress-bar label.

    Returns:
        the run record: ``optimizer``, ``hparams``, ``seed``, ``history`` (one dict per epoch:
        ``epoch, train_loss, train_acc, test_loss, test_acc, [val_loss, val_acc], seconds,
        epoch_seconds, step_times, skipped_steps, [probes], [density, hamiltonian_gain,
        flip_ratio]``; times on ``cfg.clock``) and
        ``summary`` (see :func:`_summarise`).
    """
    rank, world = dist_info()
    spec = get_spec(name)
    writes = run_dir is not None and rank == 0
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
        load_full_state_dict(model, ck["model"])
        load_optimizer_state_dict(model, opt, ck["optimizer"])
        set_rng_state(ck["rng"])
        history = ck["history"]
        start_epoch = ck["epoch"] + 1
        peak_prev, inc_prev = ck.get("peak_rss_mb", 0.0), ck.get("rss_increase_mb", 0.0)

    record = {"optimizer": spec.name, "hparams": hparams, "lr_key": spec.lr_key, "seed": seed,
              "epochs": cfg.epochs, "world_size": world, "config": cfg.to_dict(),
              "versions": versions() if writes else None, "status": "running", "history": history}
    if writes:
        Path(run_dir).mkdir(parents=True, exist_ok=True)

    writer = None
    if tb_dir is not None and rank == 0:
        from torch.utils.tensorboard import SummaryWriter  # lazy: heavy import

        steps_per_epoch = -(-len(data.train_x) // cfg.batch_size) - int(_uneven_tail(cfg, data, world))
        writer = SummaryWriter(str(tb_dir), purge_step=start_epoch * steps_per_epoch)

    state_mb = state_bytes(opt.state_dict()) / 2**20
    seconds = history[-1]["seconds"] if history else 0.0

    def probe() -> float:
        return evaluate(model, data.test_x, data.test_y, loss_fn, cfg.eval_batch_size)[1]

    try:
        with PeakRSS() as mem:
            for epoch in range(start_epoch, cfg.epochs):
                st = _train_epoch(cfg, data, opt, wrapped, loss_fn, seed, epoch, rank, world,
                                  desc or f"{spec.name} seed {seed} ep {epoch + 1}", writer, probe=probe,
                                  steps_before=sum(len(h["step_times"]) for h in history),
                                  seconds_before=seconds)
                if isinstance(opt, PMPOptimizer):
                    opt.end_epoch()  # e.g. DiscreteMSA: 1 - decay shrinks by decay_gamma
                seconds += sum(st.step_times)
                h = _epoch_record(cfg, data, model, opt, loss_fn, spec, epoch, seconds, st)
                history.append(h)
                if writer is not None:
                    _log_epoch(writer, h, epoch)
                model_sd = full_state_dict(model)  # every rank: collectives under FSDP2
                opt_sd = optimizer_state_dict(model, opt)
                if writes:
                    pk, ic = mem.result_mb()
                    checkpoint.save({"model": model_sd, "optimizer": opt_sd,
                                     "rng": rng_state(), "epoch": epoch, "history": history,
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
             "optimizer_state_mb": state_bytes(opt.state_dict()) / 2**20 or state_mb}
    record["summary"] = _summarise(history, cfg.target_acc, extra)
    record["status"] = "done"
    if writes:
        atomic_write_json(record, record_path)
    _detach(opt)
    return record
