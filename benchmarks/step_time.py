"""Step time (and peak memory) of the PMP optimizers against their baseline, measured in one run.

A *step* is one full training iteration: ``zero_grad`` + forward + loss + ``backward`` (+ gradient
clipping for the GPT) + ``step``, on one of 8 fixed random batches in turn (data loading is not
timed; cycling batches keeps a model from overfitting one batch, whose vanishing gradients turn
into subnormal floats that are ~10× slower on x86). All
optimizers of a model are measured in interleaved rounds (each optimizer ``--steps`` steps per
round, ``--rounds`` rounds) so that slow drifts of the machine hit all of them alike; reported: the
median over all timed steps and its ratio to the model's reference optimizer (SGD; AdamW for the
GPT) from the same run. The mean is reported too: it is the fair figure for ``stat_every = K``
(amortised curvature), whose every K-th step is slower.

Models (the table of issue 9; batch and threads per model unless overridden):

=================  ============================================================  =====  =======
name               model                                                         batch  threads
=================  ============================================================  =====  =======
mlp                MLP 784-256-256-10 (ReLU)                                     128    2
cnn                conv 1→16, pool, conv 16→32, pool, linear 1568→10              128    2
resnet18           ResNet-18 (``pmptrain.bench.models``, width 64), 3×32×32      64     1
gpt                nanoGPT-style 2 layers × 128, 16 × 128 tokens, clipping 1.0   16     1
binary-mlp-bn      MLP 784-1024-1024-10 with BatchNorm, binary but the last      128    2
binary-resnet18    ResNet-18 width 64, binary but the first and last layers      64     1
=================  ============================================================  =====  =======

``--memory`` runs every (model, optimizer) in a fresh subprocess and reports its peak memory above
the memory held after building the model and batch (CPU: the kernel's peak RSS, reset just before
the first step, minus the RSS then; CUDA: ``torch.cuda.max_memory_allocated`` minus the allocated
memory then), and the ratio to the reference optimizer's. ``--device cuda`` runs everything on the GPU (timed
with ``torch.cuda.synchronize``).

    python benchmarks/step_time.py                                   # every model, default optimizers
    python benchmarks/step_time.py --models mlp,cnn --rounds 10 --json out.json
    python benchmarks/step_time.py --models gpt --optimizers adamw,emsa-costate --memory
    python benchmarks/step_time.py --models mlp,cnn --optimizers sgd,emsa --compile   # eager and compiled
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import pmptrain
from pmptrain.bench.memory import PeakRSS
from pmptrain.bench.models import build_model
from pmptrain.symmetric import plain_products


# --------------------------------------------------------------------------------------------- models


def mlp():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )


def _binary(model, keep):
    return pmptrain.discretize_(model, "binary", keep=keep)


@dataclass
class ModelSpec:
    build: Callable[[], nn.Module]
    batch: Callable[[int, torch.Generator], tuple]  # (batch size, generator) -> (x, y)
    default_batch: int
    threads: int
    reference: str
    optimizers: Sequence[str]
    lm: bool = False


def _images(shape, classes=10):
    def make(b, g):
        return torch.randn(b, *shape, generator=g), torch.randint(0, classes, (b,), generator=g)
    return make


def _tokens(b, g, t=128, vocab=256):
    return torch.randint(0, vocab, (b, t), generator=g), torch.randint(0, vocab, (b, t), generator=g)


MODELS: Dict[str, ModelSpec] = {
    "mlp": ModelSpec(mlp, _images((1, 28, 28)), 128, 2, "sgd", ("sgd", "adam", "emsa")),
    "cnn": ModelSpec(cnn, _images((1, 28, 28)), 128, 2, "sgd", ("sgd", "adam", "emsa", "emsa-amortised")),
    "resnet18": ModelSpec(lambda: build_model("resnet", (3, 32, 32), 10), _images((3, 32, 32)), 64, 1, "sgd",
                          ("sgd", "adamw", "emsa", "emsa-amortised")),
    "gpt": ModelSpec(lambda: build_model("gpt", (128,), 256), _tokens, 16, 1, "adamw",
                     ("adamw", "emsa", "emsa-costate", "emsa-costate-amortised"), lm=True),
    "binary-mlp-bn": ModelSpec(
        lambda: _binary(build_model("mlp", (1, 28, 28), 10, widths=(1024, 1024), batchnorm=True), ("last",)),
        _images((1, 28, 28)), 128, 2, "sgd", ("sgd", "binary-msa")),
    "binary-resnet18": ModelSpec(
        lambda: _binary(build_model("resnet", (3, 32, 32), 10), ("first", "last")), _images((3, 32, 32)), 64, 1,
        "sgd", ("sgd", "binary-msa")),
}

def _careful(opt):
    opt._deferred_checks = False  # private: the reference path of pmptrain.optim.shell
    return opt


def _plain_gram(opt):
    opt._bench_plain_gram = True  # iteration() runs it inside pmptrain.symmetric.plain_products()
    return opt


OPTIMIZERS: Dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.03, momentum=0.9),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1),
    "emsa": lambda m: pmptrain.EMSA(m, setting="classic"),
    # EMSA(model)'s transformer setting (what it takes on models with token embeddings or attention)
    "emsa-transformer": lambda m: pmptrain.EMSA(m, setting="transformer"),
    # ... with the eigenbases of the running statistics recomputed every 10th step (K-FAC's interval)
    "emsa-transformer-refresh10": lambda m: pmptrain.EMSA(m, setting="transformer", eig_refresh=10),
    "emsa-costate": lambda m: pmptrain.EMSA(m, rho=5.0, rho_scale="costate", lr=1e3),
    # the careful path of every step (syncing checks, LU solves): the step before issue 17, for comparison
    "emsa-careful": lambda m: _careful(pmptrain.EMSA(m, setting="classic")),
    "emsa-costate-careful": lambda m: _careful(pmptrain.EMSA(m, rho=5.0, rho_scale="costate", lr=1e3)),
    # every symmetric product (XᵀX, GᵀG, AAᵀ) as one full GEMM: the product before i17c's block-triangular one
    "emsa-plain-gram": lambda m: _plain_gram(pmptrain.EMSA(m, setting="classic")),
    "emsa-costate-plain-gram": lambda m: _plain_gram(pmptrain.EMSA(m, rho=5.0, rho_scale="costate", lr=1e3)),
    "emsa-transformer-plain-gram": lambda m: _plain_gram(pmptrain.EMSA(m, setting="transformer")),
    # the exact step without its trust region (max_step=None): what the default τ = 0.1 costs
    "emsa-no-trust": lambda m: pmptrain.EMSA(m, setting="classic", max_step=None),
    "emsa-exact": lambda m: pmptrain.EMSA(m, setting="classic", costate="exact"),
    "emsa-isotropic": lambda m: pmptrain.EMSA(m, setting="classic", costate="isotropic"),
    "emsa-primal": lambda m: pmptrain.EMSA(m, setting="classic", costate="exact", route="primal"),
    "emsa-gram": lambda m: pmptrain.EMSA(m, setting="classic", costate="exact", route="gram"),
    "emsa-iterative": lambda m: pmptrain.EMSA(m, solver="iterative"),
    "emsa-amortised": lambda m: pmptrain.EMSA(m, setting="classic", stat_every=10),
    # the amortised transformer setting that trains (docs/performance.md: at lr 1e3 stale curvature diverges)
    "emsa-costate-amortised": lambda m: pmptrain.EMSA(m, rho=5.0, rho_scale="costate", lr=100.0, stat_every=10,
                                                      stat_decay=0.95),
    # stat_every=10 with the steps between refreshes bounded by their own gradient (issue 17)
    "emsa-bounded": lambda m: pmptrain.EMSA(m, stat_every=10, amortise="bounded"),
    "emsa-costate-bounded": lambda m: pmptrain.EMSA(m, rho=5.0, rho_scale="costate", lr=1e3, stat_every=10,
                                                    amortise="bounded"),
    "emsa-costate-bounded-reduce": lambda m: pmptrain.EMSA(m, rho=5.0, rho_scale="costate", lr=1e3, stat_every=10,
                                                           amortise="bounded", stat_reduce=True),
    "emsa-bounded-reduce": lambda m: pmptrain.EMSA(m, stat_every=10, amortise="bounded", stat_reduce=True),
    # the transformer setting (averaged) with stat_every=10 between refreshes (issue 17, engineer i17e); its
    # first 1/(1-0.95) = 20 steps refresh every step (time them with --warmup 20 for the steady state)
    "emsa-transformer-bounded": lambda m: pmptrain.EMSA(m, setting="transformer", lr=100.0, stat_every=10,
                                                        amortise="bounded"),  # the registry entry (lr: no cost)
    "emsa-transformer-rescaled": lambda m: pmptrain.EMSA(m, setting="transformer", stat_every=10, amortise="rescaled"),
    "emsa-transformer-bounded-reduce": lambda m: pmptrain.EMSA(m, setting="transformer", stat_every=10,
                                                               amortise="bounded", stat_reduce=True),
    "emsa-costate-rescaled": lambda m: pmptrain.EMSA(m, rho=5.0, rho_scale="costate", lr=1e3, stat_every=10,
                                                     amortise="rescaled"),
    "emsa-reduce": lambda m: pmptrain.EMSA(m, stat_reduce=True),
    "emsa-costate-reduce": lambda m: pmptrain.EMSA(m, rho=5.0, rho_scale="costate", lr=1e3, stat_reduce=True),
    "binary-msa": lambda m: pmptrain.DiscreteMSA(m, rho=0.5),
}


# --------------------------------------------------------------------------------------------- timing


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Batches:
    """A fixed pool of batches, served in turn."""

    def __init__(self, spec: ModelSpec, batch: int, seed: int, device, count: int = 8):
        g = torch.Generator().manual_seed(seed)
        self.pool = [tuple(t.to(device) for t in spec.batch(batch, g)) for _ in range(count)]
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % len(self.pool)
        return self.pool[self.i]


def iteration(spec: ModelSpec, model, opt, batches: "Batches"):
    if getattr(opt, "_bench_plain_gram", False):
        with plain_products():
            return _iteration(spec, model, opt, batches)
    return _iteration(spec, model, opt, batches)


def _iteration(spec: ModelSpec, model, opt, batches: "Batches"):
    x, y = batches.next()
    opt.zero_grad(set_to_none=True)
    out = model(x)
    loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    loss.backward()
    if spec.lm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


#: the clock of :func:`_time_steps`: ``wall`` (``time.perf_counter``) or ``cpu`` (``time.process_time``:
#: the CPU time of this process, which other processes on a shared machine do not inflate —
#: with 1 thread the fairer figure on a loaded machine; meaningless for a GPU)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def _time_steps(spec, model, opt, batches, steps, device):
    out = []
    for _ in range(steps):
        _sync(device)
        t0 = _clock()
        iteration(spec, model, opt, batches)
        _sync(device)
        out.append(_clock() - t0)
    return out


#: an optimizer name ending in this suffix runs the model under ``torch.compile`` (compiled after the
#: optimizer is created, as docs/api.md documents)
COMPILED = ":compiled"


def setup(model_name: str, opt_name: str, batch: int, device, seed: int = 0):
    """``(spec, model, optimizer, batches)`` — the same weights and batches for every optimizer."""
    spec = MODELS[model_name]
    batches = Batches(spec, batch, seed, device)
    torch.manual_seed(seed)
    model = spec.build().to(device)
    compiled = opt_name.endswith(COMPILED)
    opt = OPTIMIZERS[opt_name[: -len(COMPILED)] if compiled else opt_name](model)
    return spec, (torch.compile(model) if compiled else model), opt, batches


def measure(model_name: str, names: List[str], batch: int, rounds: int, steps: int, warmup: int, device) -> dict:
    runs = {}
    for name in names:
        spec, model, opt, batches = setup(model_name, name, batch, device)
        _time_steps(spec, model, opt, batches, warmup, device)
        runs[name] = (spec, model, opt, batches, [])
    for _ in range(rounds):
        for name in names:
            spec, model, opt, batches, times = runs[name]
            n = steps if "iterative" not in name else max(1, steps // 5)
            times += _time_steps(spec, model, opt, batches, n, device)
    ref = MODELS[model_name].reference
    med = {name: statistics.median(runs[name][4]) for name in names}
    mean = {name: statistics.fmean(runs[name][4]) for name in names}
    return {name: {"median_ms": 1e3 * med[name], "ratio": med[name] / med[ref], "mean_ms": 1e3 * mean[name],
                   "mean_ratio": mean[name] / mean[ref], "samples": len(runs[name][4])} for name in names}


# --------------------------------------------------------------------------------------------- memory


def peak_memory(model_name: str, opt_name: str, batch: int, steps: int, device) -> float:
    """Peak memory (MB) of ``steps`` steps above what the model and batches hold (this process, which
    the caller starts fresh): on CPU the kernel's peak RSS, reset just before the first step
    (``pmptrain.bench.memory``: exact, unlike the lifetime ``getrusage`` maximum, which for a small
    model is the peak of importing torch), minus the RSS then; on CUDA
    ``torch.cuda.max_memory_allocated`` minus the memory allocated then. Either way the optimizer's
    state (allocated in its first step) and every transient of the steps are counted."""
    spec, model, opt, batches = setup(model_name, opt_name, batch, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            iteration(spec, model, opt, batches)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with PeakRSS() as mem:
        for _ in range(steps):
            iteration(spec, model, opt, batches)
    if not mem.exact:
        raise RuntimeError("--memory needs Linux's /proc/self/clear_refs (the peak RSS mark cannot be reset here)")
    return (mem.peak - mem.start) / 2**20


def memory_table(model_name: str, names: List[str], batch: int, steps: int, device, threads: int) -> dict:
    out = {}
    for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), "--_memory-child", model_name, name, str(batch),
               str(steps), str(device), str(threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[name] = float(res.stdout.strip().splitlines()[-1])
    ref = out[MODELS[model_name].reference]
    return {name: {"peak_mb": mb, "ratio": mb / ref if ref > 0 else float("nan")} for name, mb in out.items()}


# --------------------------------------------------------------------------------------------- main


def resolve_names(ap: argparse.ArgumentParser, model_name: str, optimizers: Optional[str]):
    """``(spec, names)`` of a ``--models`` entry: its optimizers (the model's list, or the
    ``--optimizers`` comma list), reference first; ``ap.error`` for unknown names."""
    if model_name not in MODELS:
        ap.error(f"unknown model {model_name!r}; choose from {sorted(MODELS)}")
    spec = MODELS[model_name]
    names = list(spec.optimizers) if optimizers is None else optimizers.split(",")
    names = [spec.reference] + [n for n in names if n and n != spec.reference]
    for n in names:
        if n.removesuffix(COMPILED) not in OPTIMIZERS:
            ap.error(f"unknown optimizer {n!r}; choose from {sorted(OPTIMIZERS)}")
    return spec, names


def with_compiled(names: List[str]) -> List[str]:
    """``names`` followed by the compiled twin of every eager name not listed already (``--compile``)."""
    return names + [n + COMPILED for n in names if not n.endswith(COMPILED) and n + COMPILED not in names]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_memory-child"]:
        model_name, name, batch, steps, device, threads = argv[1:7]
        torch.set_num_threads(int(threads))
        print(peak_memory(model_name, name, int(batch), int(steps), torch.device(device)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of: " + ",".join(MODELS))
    ap.add_argument("--optimizers", default=None,
                    help="comma list (default: each model's list; its reference is always added); a name "
                         f"with the suffix {COMPILED} runs the model under torch.compile: " + ",".join(OPTIMIZERS))
    ap.add_argument("--compile", action="store_true",
                    help=f"also time every optimizer with the model under torch.compile (its {COMPILED} twin, "
                         "interleaved with the eager one in the same rounds)")
    ap.add_argument("--batch", type=int, default=None, help="override every model's batch size")
    ap.add_argument("--threads", type=int, default=None, help="override every model's thread count")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per optimizer per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:k]")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall (default) or cpu: process CPU time, robust to other load on a shared "
                         "machine (use with --threads 1; not with --device cuda)")
    ap.add_argument("--memory", action="store_true", help="also measure peak memory (a subprocess each)")
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if device.type == "cuda" and args.clock == "cpu":
        ap.error("--clock cpu measures host CPU time: use --clock wall with --device cuda")
    global _clock
    _clock = CLOCKS[args.clock]
    results = {"config": {**vars(args), "torch": torch.__version__, "pmptrain": pmptrain.__version__,
                          "machine": platform.machine(), "python": platform.python_version(),
                          "date": time.strftime("%Y-%m-%d")}, "models": {}}
    for model_name in args.models.split(","):
        spec, names = resolve_names(ap, model_name, args.optimizers)
        if args.compile:
            names = with_compiled(names)
        threads = args.threads or spec.threads
        batch = args.batch or spec.default_batch
        torch.set_num_threads(threads)
        res = {"batch": batch, "threads": threads, "reference": spec.reference,
               "time": measure(model_name, names, batch, args.rounds, args.steps, args.warmup, device)}
        if args.memory:
            res["memory"] = memory_table(model_name, names, batch, args.memory_steps, device, threads)
        results["models"][model_name] = res
        print(f"\n{model_name}, batch {batch}, {threads} thread(s), {args.device}; ratios to {spec.reference}")
        head = "| optimizer | median step (ms) | × " + spec.reference + " | mean (ms) | × |"
        if args.memory:
            head += " peak MB above model | × " + spec.reference + " |"
        print(head)
        print("|---|---:|---:|---:|---:|" + ("---:|---:|" if args.memory else ""))
        for name in names:
            t = res["time"][name]
            line = f"| {name} | {t['median_ms']:.2f} | {t['ratio']:.2f}× | {t['mean_ms']:.2f} | {t['mean_ratio']:.2f}× |"
            if args.memory:
                m = res["memory"][name]
                line += f" {m['peak_mb']:.1f} | {m['ratio']:.2f}× |"
            print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
