"""Median step time of the PMP optimizers against torch.optim.SGD and Adam, measured in one run.

A *step* is one full training iteration: ``zero_grad`` + forward + loss + ``backward`` + ``step``,
on a fixed random batch (the data loader is not timed). Optimizers are measured in interleaved
rounds (every optimizer once per round, ``--rounds`` rounds of ``--steps`` steps each) so that slow
drifts of the machine hit all of them alike; the reported number is the median over all timed steps
and the ratio is to SGD's median from the same run.

    python benchmarks/step_time.py                    # MLP 784-256-256-10 and a small CNN, batch 128
    python benchmarks/step_time.py --models mlp --rounds 10 --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import pmptrain


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


MODELS = {"mlp": mlp, "cnn": cnn}

OPTIMIZERS = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.03, momentum=0.9),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
    "emsa": lambda m: pmptrain.EMSA(m),
    "emsa-exact": lambda m: pmptrain.EMSA(m, costate="exact"),
    "emsa-isotropic": lambda m: pmptrain.EMSA(m, costate="isotropic"),
    "emsa-primal": lambda m: pmptrain.EMSA(m, costate="exact", route="primal"),
    "emsa-gram": lambda m: pmptrain.EMSA(m, costate="exact", route="gram"),
    "emsa-iterative": lambda m: pmptrain.EMSA(m, solver="iterative"),
}


def _time_steps(model, opt, x, y, steps):
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        out.append(time.perf_counter() - t0)
    return out


def measure(model_name, names, batch, rounds, steps, warmup, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    runs = {}
    # a forced Gram route on a convolution would eigendecompose (batch·positions)² matrices
    names = [n for n in names if not (model_name == "cnn" and n == "emsa-gram")]
    for name in names:
        torch.manual_seed(seed)
        model = MODELS[model_name]()
        opt = OPTIMIZERS[name](model)
        _time_steps(model, opt, x, y, warmup)
        runs[name] = (model, opt, [])
    for _ in range(rounds):
        for name in names:
            model, opt, times = runs[name]
            times += _time_steps(model, opt, x, y, steps if "iterative" not in name else max(1, steps // 5))
    med = {name: statistics.median(runs[name][2]) for name in names}
    return {
        name: {"median_ms": 1e3 * med[name], "ratio_to_sgd": med[name] / med["sgd"], "samples": len(runs[name][2])}
        for name in names
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,cnn", help="comma list of: " + ",".join(MODELS))
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma list (sgd is always added)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per optimizer per round")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = ["sgd"] + [n for n in args.optimizers.split(",") if n and n != "sgd"]
    for n in names:
        if n not in OPTIMIZERS:
            ap.error(f"unknown optimizer {n!r}; choose from {sorted(OPTIMIZERS)}")
    results = {
        "config": {**vars(args), "torch": torch.__version__, "pmptrain": pmptrain.__version__,
                   "machine": platform.machine(), "python": platform.python_version()},
        "models": {},
    }
    for model_name in args.models.split(","):
        res = measure(model_name, names, args.batch, args.rounds, args.steps, args.warmup)
        results["models"][model_name] = res
        print(f"\n{model_name}, batch {args.batch}, {args.threads} threads")
        print("| optimizer | median step (ms) | ratio to SGD |")
        print("|---|---:|---:|")
        for name, r in res.items():
            print(f"| {name} | {r['median_ms']:.3f} | {r['ratio_to_sgd']:.2f}× |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
