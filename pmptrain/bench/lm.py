"""``pmptrain bench --model gpt``: a byte-level language-model bench, trained as people train GPTs.

Every optimizer trains the same seeded :class:`~pmptrain.bench.models.GPT` (tied embeddings) on the
same seeded batches of a byte corpus, with linear warmup and cosine decay of ``lr`` (a
``LambdaLR``; pmptrain optimizers scale every step size with it) and gradient clipping. The
validation loss (and perplexity ``exp(loss)``) is measured every ``eval_every`` steps on fixed
validation batches; the training clock (``--clock``: wall-clock or process CPU time,
:mod:`pmptrain.bench.clock`) excludes evaluation. The report gives, per optimizer, the
median final validation loss over seeds, the steps and seconds to reach the reference loss (the
first optimizer's median final loss, AdamW in the default bench), the median step time and its ratio
to the first optimizer's; plots of validation loss against steps and seconds.

Corpora (``dataset``), all available offline:

* ``pysrc`` (default) — the bytes of the Python standard library's top-level modules of the running
  interpreter, in sorted file order, the first ``max_bytes`` of them (always present, so the bench
  runs on a fresh machine; the SHA-256 of the text is recorded, since it depends on the Python
  version);
* ``fortunes`` — Debian's ``fortune`` databases (``apt-get install fortunes``), the files of
  ``/usr/share/games/fortunes``;
* any path to a text file.

The last ``val_fraction`` of the bytes is the validation text.

Distributed (``torchrun --nproc-per-node N -m pmptrain bench --model gpt --fsdp ...``, gloo): every
rank draws the same global batch of ``batch_size`` sequences and trains on its ``batch_size/N``
rows of it (``batch_size`` must be divisible by N); the model's blocks, then the root (embeddings,
final LayerNorm, tied head), are wrapped by FSDP2's ``fully_shard`` (:func:`shard_blocks`), which
averages the gradients over the ranks — the gradient of the union batch's mean loss, as in one
process. The training and validation losses are the means over the ranks (each rank evaluates its
rows of every validation batch); only rank 0 prints and writes files. Without ``--fsdp`` a
distributed run is refused (the bench has no DDP path).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import statistics
import sysconfig
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from ..optim.shell import PMPOptimizer
from .clock import CLOCK_SOURCES, clock_fn, clock_label
from .schema import (Bool, ConfigError, Int, Kind, Mapping_, Maybe, NameList, Number, OneOf, Seeds, Text, check_fields,
                     check_model_args, check_model_size, check_optimizer_args, max_threads, refused_as)

__all__ = ["LMConfig", "Corpus", "load_corpus", "lr_multiplier", "run_lm_bench", "DEFAULT_LM_OPTIMIZERS"]

DEFAULT_LM_OPTIMIZERS = ("adamw", "emsa-transformer", "emsa-costate")
_FORTUNES = Path("/usr/share/games/fortunes")


@dataclasses.dataclass
class Corpus:
    """Bytes of a text (``data``: uint8 tensor), its ``name``, ``source`` description and SHA-256."""

    name: str
    data: torch.Tensor
    source: str
    sha256: str


def load_corpus(name: str = "pysrc", max_bytes: int = 2_000_000) -> Corpus:
    """The byte corpus ``name`` (see the module docstring), at most ``max_bytes`` long."""
    if name == "pysrc":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.glob("*.py") if p.is_file())
        source = f"{root}/*.py ({len(files)} files)"
    elif name == "fortunes":
        if not _FORTUNES.is_dir():
            raise FileNotFoundError(
                f"dataset 'fortunes': {_FORTUNES} not found; install Debian's fortune databases "
                "(apt-get install fortunes) or use --dataset pysrc / a text file")
        files = sorted(p for p in _FORTUNES.iterdir() if p.is_file() and not p.suffix)
        source = f"{_FORTUNES} ({len(files)} files)"
    else:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"dataset {name!r}: not 'pysrc', 'fortunes' or an existing text file")
        files, source = [path], str(path)
    chunks, total = [], 0
    for f in files:
        b = f.read_bytes()
        chunks.append(b)
        total += len(b) + 1
        if total >= max_bytes:
            break
    blob = b"\n".join(chunks)[:max_bytes]
    if len(blob) < 10_000:
        raise ValueError(f"dataset {name!r}: only {len(blob)} bytes of text (need at least 10 000)")
    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()
    return Corpus(name, data, source, hashlib.sha256(blob).hexdigest())


def lr_multiplier(step: int, total: int, warmup: float, min_ratio: float) -> float:
    """Linear warmup over the first ``warmup·total`` steps, then cosine decay to ``min_ratio``."""
    w = max(1, int(round(warmup * total)))
    if step < w:
        return (step + 1) / w
    progress = min(1.0, (step - w) / max(1, total - w))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


#: The kind of every :class:`LMConfig` field.
LM_FIELDS: Dict[str, Kind] = {
    "dataset": Text(), "max_bytes": Int(10_000, 1 << 30), "val_fraction": Number(0, 0.5),
    "model": Text(), "model_args": Mapping_(), "optimizers": NameList(), "steps": Int(1, 10_000_000),
    "batch_size": Int(1, 1_000_000), "seq_len": Int(1, 1 << 16), "warmup": Number(0, 1),
    "min_lr_ratio": Number(0, 1), "clip": Number(lo=0), "eval_every": Int(1, 10_000_000),
    "eval_batches": Int(1, 10_000), "seeds": Seeds(), "target_loss": Maybe(Number()),
    "tensorboard": Bool(), "threads": Maybe(Int(1, max_threads())), "clock": OneOf(("wall", "cpu")),
    "preset": Maybe(Text()), "fsdp": Bool(),
}


@dataclasses.dataclass
class LMConfig:
    """Everything that determines a GPT bench (defaults in brackets).

    dataset [``"pysrc"``], max_bytes [2 000 000], val_fraction [0.1]; model [``"gpt"``], model_args
    [``{}``: 2 layers, 4 heads, width 128]; optimizers [:data:`DEFAULT_LM_OPTIMIZERS`],
    optimizer_args [``{}``], lr [None: registry defaults; a number or ``{name: value}``]; steps
    [200], batch_size [16] × seq_len [128] tokens per step; warmup [0.1 of the steps], min_lr_ratio
    [0.1], clip [1.0; 0 disables]; eval_every [20] steps on eval_batches [8] fixed validation
    batches; seeds [``[0, 1, 2]``]; target_loss [None: the first optimizer's median final loss];
    tensorboard [True]; threads [None]; clock [``"wall"``: ``time.perf_counter``; ``"cpu"``: process
    CPU time, needs threads 1; :mod:`pmptrain.bench.clock`]; fsdp [False: under ``torchrun``, shard
    the blocks with FSDP2 — required there].
    """

    dataset: str = "pysrc"
    max_bytes: int = 2_000_000
    val_fraction: float = 0.1
    model: str = "gpt"
    model_args: Dict[str, Any] = dataclasses.field(default_factory=dict)
    optimizers: List[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_LM_OPTIMIZERS))
    optimizer_args: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    lr: Any = None
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    warmup: float = 0.1
    min_lr_ratio: float = 0.1
    clip: float = 1.0
    eval_every: int = 20
    eval_batches: int = 8
    seeds: List[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    target_loss: Optional[float] = None
    tensorboard: bool = True
    threads: Optional[int] = None
    clock: str = "wall"
    preset: Optional[str] = None
    fsdp: bool = False

    @classmethod
    def from_dict(cls, d: Dict[str, Any], where: str = "config") -> "LMConfig":
        """Build from a mapping and :meth:`validate` it; keys of the classifier bench that do not
        apply here are refused by name."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a mapping of options, got {type(d).__name__}")
        d = {k.replace("-", "_") if isinstance(k, str) else k: v for k, v in d.items()}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(d) - names)
        if unknown:
            raise ConfigError(f"{where}: option(s) {unknown} do not apply to the language-model bench "
                              f"(--model gpt); valid: {sorted(names)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Check every field (:data:`LM_FIELDS`) and the optimizer overrides; raises
        :class:`~pmptrain.bench.schema.ConfigError` naming the option."""
        from .registry import get_spec

        check_fields(self, LM_FIELDS)
        self.optimizers = [get_spec(n).name for n in self.optimizers]
        for n in self.optimizers:
            if get_spec(n).discrete:
                raise ConfigError(f"--optimizers: {n} trains discrete weights, not a GPT")
        if len(set(self.optimizers)) != len(self.optimizers):
            raise ConfigError(f"--optimizers: names repeated: {self.optimizers}")
        if self.model != "gpt":
            raise ConfigError(f"--model: the language-model bench trains 'gpt', got {self.model!r}")
        from .models import MODELS

        check_model_args(MODELS["gpt"], self.model_args)
        check_model_size(MODELS["gpt"], (self.seq_len,), 256, self.model_args, "gpt")
        from .config import check_args_in_run, check_lr

        self.optimizer_args = check_optimizer_args(self.optimizer_args)
        check_args_in_run(self.optimizer_args, self.optimizers)
        self.lr = check_lr(self.lr, self.optimizers)
        from .clock import check_clock

        check_clock(self.clock, self.threads)

    def settings(self, name: str) -> Dict[str, Any]:
        from .registry import get_spec

        spec = get_spec(name)
        kw = dict(self.optimizer_args.get(name, {}))
        lr = self.lr.get(name) if isinstance(self.lr, dict) else self.lr
        if lr is not None:
            kw[spec.lr_key] = lr
        return kw


def _batch(data: torch.Tensor, seq_len: int, batch: int, gen: torch.Generator):
    starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def _rows(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of a global batch (all of it in one process)."""
    part = t.shape[0] // world
    return t[rank * part:(rank + 1) * part]


def _mean_over_ranks(value: float, world: int) -> float:
    """The mean of ``value`` over the ranks (a float64 all-reduce; ``value`` in one process)."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t) / world


def shard_blocks(model) -> None:
    """FSDP2 for the GPT: ``fully_shard`` every transformer block, then the root (its embeddings,
    final LayerNorm and the head tied to ``wte``), so a block's parameters are all-gathered only
    around its own forward and backward."""
    from torch.distributed.fsdp import fully_shard

    for block in model.h:
        fully_shard(block)
    fully_shard(model)


@torch.no_grad()
def _val_loss(model, batches, rank: int = 0, world: int = 1) -> float:
    """The mean validation loss over ``batches``; with several ranks each evaluates its rows of every
    batch and the means are averaged (equal rows per rank: the loss of the whole batches)."""
    was = model.training
    model.eval()
    total = 0.0
    for x, y in batches:
        logits = model(_rows(x, rank, world))
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), _rows(y, rank, world).reshape(-1)))
    model.train(was)
    return _mean_over_ranks(total / len(batches), world)


def run_one(cfg: LMConfig, train_data: torch.Tensor, val_batches, name: str, seed: int, writer=None) -> Dict[str, Any]:
    """One optimizer × seed: the history of ``(step, seconds, train_loss, val_loss)`` (seconds on
    ``cfg.clock``)."""
    from .models import build_model
    from .ranks import dist_info
    from .registry import get_spec
    from .runner import progress_bar
    from .seeding import seed_all

    rank, world = dist_info()
    spec = get_spec(name)
    seed_all(seed)
    model = build_model("gpt", (cfg.seq_len,), 256, **cfg.model_args)
    if world > 1:
        shard_blocks(model)  # (run_lm_bench refuses world > 1 without cfg.fsdp)
    opt = spec.build(model, **cfg.settings(name))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_multiplier(s, cfg.steps, cfg.warmup, cfg.min_lr_ratio))
    gen = torch.Generator().manual_seed(10_000 + seed)
    history = [{"step": 0, "seconds": 0.0, "train_loss": None,
                "val_loss": _val_loss(model, val_batches, rank, world)}]
    now = clock_fn(cfg.clock)
    clock, step_times = 0.0, []
    bar = progress_bar(cfg.steps, f"{name} seed {seed}", rank)
    for step in range(1, cfg.steps + 1):
        x, y = _batch(train_data, cfg.seq_len, cfg.batch_size, gen)  # the global batch: every rank draws it
        x, y = _rows(x, rank, world), _rows(y, rank, world)
        t0 = now()
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        if cfg.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        sched.step()
        dt = now() - t0
        clock += dt
        step_times.append(dt)
        train_loss = _mean_over_ranks(loss.item(), world)
        if writer is not None:
            writer.add_scalar(f"{name}/seed{seed}/train_loss", train_loss, step)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            v = _val_loss(model, val_batches, rank, world)
            history.append({"step": step, "seconds": clock, "train_loss": train_loss, "val_loss": v})
            bar.set_postfix(val_loss=f"{v:.3f}")
            if writer is not None:
                writer.add_scalar(f"{name}/seed{seed}/val_loss", v, step)
        bar.update(1)
    bar.close()
    skipped = opt.skipped_steps if isinstance(opt, PMPOptimizer) else 0
    if isinstance(opt, PMPOptimizer):
        opt.detach()
    return {"optimizer": name, "seed": seed, "hparams": {**spec.defaults, **cfg.settings(name)},
            "history": history, "median_step_ms": 1e3 * statistics.median(step_times),
            "final_val_loss": history[-1]["val_loss"], "skipped_steps": skipped}


def _first_reach(history, target: float):
    for h in history:
        if h["val_loss"] <= target:
            return h["step"], h["seconds"]
    return None, None


def aggregate(cfg: LMConfig, runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per optimizer: medians over seeds of the final validation loss, perplexity, steps and
    seconds to the target, step time; the median curves."""
    by_opt: Dict[str, List[Dict[str, Any]]] = {}
    for r in runs:
        by_opt.setdefault(r["optimizer"], []).append(r)
    ref = cfg.optimizers[0]
    target = cfg.target_loss
    if target is None:
        target = statistics.median(r["final_val_loss"] for r in by_opt[ref])
    ref_ms = statistics.median(r["median_step_ms"] for r in by_opt[ref])
    rows = []
    for name in cfg.optimizers:
        rs = by_opt[name]
        finals = [r["final_val_loss"] for r in rs]
        reach = [_first_reach(r["history"], target) for r in rs]
        hit = [x for x in reach if x[0] is not None]
        steps_curve = [h["step"] for h in rs[0]["history"]]
        rows.append({
            "optimizer": name,
            "final_val_loss": statistics.median(finals), "final_val_loss_min": min(finals),
            "final_val_loss_max": max(finals), "final_ppl": math.exp(statistics.median(finals)),
            "steps_to_target": statistics.median(h[0] for h in hit) if hit else None,
            "seconds_to_target": statistics.median(h[1] for h in hit) if hit else None,
            "reached": len(hit), "seeds": len(rs),
            "median_step_ms": statistics.median(r["median_step_ms"] for r in rs),
            "step_ratio": statistics.median(r["median_step_ms"] for r in rs) / ref_ms,
            "curve_steps": steps_curve,
            "curve_val_loss": [statistics.median(r["history"][i]["val_loss"] for r in rs)
                               for i in range(len(steps_curve))],
            "curve_seconds": [statistics.median(r["history"][i]["seconds"] for r in rs)
                              for i in range(len(steps_curve))],
            "skipped_steps": sum(r["skipped_steps"] for r in rs),
        })
    return {"target_loss": target, "reference": ref, "rows": rows}


def format_table(summary: Dict[str, Any], cfg: LMConfig) -> str:
    tag = "" if cfg.clock == "wall" else f" ({cfg.clock})"
    head = ["optimizer", "final val loss [min-max]", "ppl", "steps→tgt", f"s→tgt{tag}", f"step ms{tag}",
            f"×{summary['reference']}"]
    lines = [head]
    for r in summary["rows"]:
        reach = f"{r['reached']}/{r['seeds']}"
        lines.append([
            r["optimizer"], f"{r['final_val_loss']:.3f} [{r['final_val_loss_min']:.3f}-{r['final_val_loss_max']:.3f}]",
            f"{r['final_ppl']:.2f}",
            f"{r['steps_to_target']:.0f} ({reach})" if r["steps_to_target"] is not None else f"- ({reach})",
            f"{r['seconds_to_target']:.1f}" if r["seconds_to_target"] is not None else "-",
            f"{r['median_step_ms']:.1f}", f"{r['step_ratio']:.2f}"])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    out.append(f"\n{cfg.dataset} / gpt {cfg.model_args or ''}, {cfg.steps} steps of {cfg.batch_size}×{cfg.seq_len} "
               f"tokens, warmup {cfg.warmup:g} + cosine, clip {cfg.clip:g}, seeds {cfg.seeds}; target = "
               f"{summary['target_loss']:.3f} (validation loss); medians over seeds; times: "
               f"{clock_label(cfg.clock)} ({CLOCK_SOURCES[cfg.clock]}).")
    return "\n".join(out)


def _plots(summary: Dict[str, Any], out_dir: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for x_key, label, fname in (("curve_steps", "step", "val_loss_vs_step.png"),
                                ("curve_seconds", "training seconds", "val_loss_vs_seconds.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in summary["rows"]:
            ax.plot(r[x_key], r["curve_val_loss"], label=r["optimizer"])
        ax.axhline(summary["target_loss"], color="grey", lw=0.8, ls="--")
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (nats/byte)")
        ax.legend()
        fig.tight_layout()
        p = out_dir / fname
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


def _preflight(cfg: LMConfig) -> None:
    """Build the model and every optimizer once before training, so that values only the builders
    judge are refused up front (as :func:`pmptrain.bench.runner.preflight`)."""
    from .models import build_model
    from .registry import get_spec

    with refused_as(f"--model-args: model 'gpt' refuses {cfg.model_args}"):
        model = build_model("gpt", (cfg.seq_len,), 256, **cfg.model_args)
    for name in cfg.optimizers:
        with refused_as(f"--opt-arg {name}"):
            opt = get_spec(name).build(model, **cfg.settings(name))
        if isinstance(opt, PMPOptimizer):
            opt.detach()


def _silent(*args, **kwargs) -> None:
    """The log of ranks other than 0."""


def run_lm_bench(cfg: LMConfig, out_dir: Path, log=print) -> Dict[str, Any]:
    """Run every optimizer × seed — interleaved, seed-major (seed 0 of every optimizer, then seed 1 …)
    so that a change of machine load does not fall on one optimizer — write ``results.txt``,
    ``results.json``, ``results.csv``, ``config.json``, plots and TensorBoard logs under ``out_dir``
    and return the results (under ``torchrun`` on every rank; only rank 0 writes and logs)."""
    import csv

    from .ranks import dist_info
    from .records import atomic_write_json, versions

    rank, world = dist_info()
    if world > 1 and not cfg.fsdp:
        raise ValueError(f"--fsdp: under torchrun ({world} ranks) the language-model bench shards the GPT with "
                         "FSDP2 and needs --fsdp (it has no DDP path)")
    if world > 1:
        from .registry import check_fsdp

        check_fsdp(cfg.optimizers)
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size: {cfg.batch_size} sequences cannot be split evenly across {world} ranks")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from .records import check_out_dir, open_outputs

    check_out_dir(Path(out_dir))  # refused before the corpus is read
    if world > 1:
        torch.distributed.barrier()  # every rank checked --out before rank 0 creates it
    if rank != 0:
        log = _silent
    corpus = load_corpus(cfg.dataset, cfg.max_bytes)
    n_val = max(cfg.seq_len + 2, int(len(corpus.data) * cfg.val_fraction))
    train_data, val_data = corpus.data[:-n_val], corpus.data[-n_val:]
    gen = torch.Generator().manual_seed(12345)
    val_batches = [_batch(val_data, cfg.seq_len, cfg.batch_size, gen) for _ in range(cfg.eval_batches)]
    _preflight(cfg)
    out_dir, writer = open_outputs(out_dir, cfg.tensorboard, rank)
    log(f"data: {corpus.name} ({len(corpus.data)} bytes from {corpus.source}, sha256 {corpus.sha256[:12]}); "
        f"{len(train_data)} train / {len(val_data)} validation bytes")
    runs = []
    try:
        for seed in cfg.seeds:
            for name in cfg.optimizers:
                r = run_one(cfg, train_data, val_batches, name, seed, writer)
                runs.append(r)
                log(f"  {name:<14} seed {seed}: final val loss {r['final_val_loss']:.4f}, "
                    f"median step {r['median_step_ms']:.1f} ms")
    finally:
        if writer is not None:
            writer.close()
    runs.sort(key=lambda r: cfg.optimizers.index(r["optimizer"]))
    summary = aggregate(cfg, runs)
    results = {"kind": "language-model", "config": cfg.to_dict(), "clock": cfg.clock, "corpus": {
        "name": corpus.name, "bytes": len(corpus.data), "source": corpus.source, "sha256": corpus.sha256},
        "summary": summary, "runs": runs, "versions": versions(), "world_size": world}
    if rank != 0:
        return results
    atomic_write_json(results, out_dir / "results.json")
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["optimizer", "final_val_loss", "final_ppl", "steps_to_target", "seconds_to_target",
                    "median_step_ms", "step_ratio"])
        for r in summary["rows"]:
            w.writerow([r["optimizer"], r["final_val_loss"], r["final_ppl"], r["steps_to_target"],
                        r["seconds_to_target"], r["median_step_ms"], r["step_ratio"]])
    plots = _plots(summary, out_dir)
    table = format_table(summary, cfg)
    (out_dir / "results.txt").write_text(table + "\n")
    atomic_write_json({"kind": "language-model", "config": cfg.to_dict(), "versions": versions()},
                      out_dir / "config.json")
    log(table)
    log(f"results: {out_dir / 'results.txt'}, {out_dir / 'results.json'}, {out_dir / 'results.csv'}, plots: {', '.join(map(str, plots))}")
    return results
