"""Fashion-MNIST accuracy after 1/2/3 epochs: E-MSA against SGD-momentum and Adam (lr grids).

MLP 784-256-256-10 (ReLU, cross-entropy), batch 128, the same seeded batches for every optimizer.
SGD-momentum and Adam run over a 3-point lr grid; the best lr (by median final test accuracy) is
reported as "best-of-3-lr". Test accuracy is evaluated every ``--evals-per-epoch`` of an epoch; the
training clock excludes evaluation, so "seconds to reach X" compares pure training time.

    python benchmarks/fashion_mnist.py                      # 3 seeds, 3 epochs, default grids
    python benchmarks/fashion_mnist.py --seeds 1 --epochs 1 --configs emsa,adam@0.001

Needs the Fashion-MNIST IDX files (Debian: ``apt-get install dataset-fashion-mnist``, or
``--data-dir``; see docs/data.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import pmptrain
from pmptrain.bench.data import load_dataset, make_loader


def build(kind: str, lr: float, model):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if kind == "emsa":
        return pmptrain.EMSA(model) if lr is None else pmptrain.EMSA(model, lr=lr)
    if kind == "emsa-exact":
        return pmptrain.EMSA(model, costate="exact") if lr is None else pmptrain.EMSA(model, lr=lr, costate="exact")
    if kind == "emsa-isotropic":
        return pmptrain.EMSA(model, costate="isotropic") if lr is None else pmptrain.EMSA(model, lr=lr, costate="isotropic")
    if kind == "emsa-iterative":
        return pmptrain.EMSA(model, solver="iterative")
    raise ValueError(f"unknown optimizer kind {kind!r}")


DEFAULT_CONFIGS = (
    "sgd@0.01,sgd@0.03,sgd@0.1,adam@0.0003,adam@0.001,adam@0.003,emsa,emsa-exact,emsa-isotropic"
)


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def run(config: str, seed: int, ds, epochs: int, batch: int, evals_per_epoch: int):
    kind, _, lr = config.partition("@")
    torch.manual_seed(seed)
    model = mlp()
    opt = build(kind, float(lr) if lr else None, model)
    loader = make_loader(ds.train_x, ds.train_y, batch, shuffle=True, seed=seed, drop_last=True)
    every = max(1, len(loader) // evals_per_epoch)
    clock, curve, step_times = 0.0, [], []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for i, (x, y) in enumerate(loader):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            dt = time.perf_counter() - t0
            clock += dt
            step_times.append(dt)
            if (i + 1) % every == 0 or i + 1 == len(loader):
                curve.append({"epoch": epoch + (i + 1) / len(loader), "seconds": clock,
                              "test_acc": accuracy(model, ds.test_x, ds.test_y)})
    return {"config": config, "seed": seed, "curve": curve, "median_step_ms": 1e3 * statistics.median(step_times)}


def seconds_to(curve, target):
    for point in curve:
        if point["test_acc"] >= target:
            return point["seconds"]
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma list of kind[@lr]")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--evals-per-epoch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir")
    ap.add_argument("--json", help="write all curves and the summary here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds = load_dataset("fashion-mnist", data_dir=args.data_dir)
    runs = []
    for config in args.configs.split(","):
        for seed in range(args.seeds):
            r = run(config, seed, ds, args.epochs, args.batch, args.evals_per_epoch)
            runs.append(r)
            accs = [p["test_acc"] for p in r["curve"] if float(p["epoch"]).is_integer()]
            print(f"{config:22s} seed {seed}: " + " ".join(f"{a:.4f}" for a in accs)
                  + f"  step {r['median_step_ms']:.2f} ms", flush=True)
    summary = {}
    for config in dict.fromkeys(r["config"] for r in runs):
        rs = [r for r in runs if r["config"] == config]
        per_epoch = [
            statistics.median(next(p["test_acc"] for p in r["curve"] if abs(p["epoch"] - e) < 1e-9) for r in rs)
            for e in range(1, args.epochs + 1)
        ]
        summary[config] = {"acc_per_epoch": per_epoch, "median_step_ms": statistics.median(r["median_step_ms"] for r in rs)}

    def best(kind):
        cands = [c for c in summary if c.split("@")[0] == kind]
        return max(cands, key=lambda c: summary[c]["acc_per_epoch"][-1]) if cands else None

    best_adam = best("adam")
    target = summary[best_adam]["acc_per_epoch"][-1] if best_adam else None
    print("\n| optimizer | " + " | ".join(f"test acc after {e} ep" for e in range(1, args.epochs + 1))
          + " | median step (ms) | s to best Adam's final acc |")
    print("|---" * (args.epochs + 3) + "|")
    for config, s in summary.items():
        secs = [seconds_to(r["curve"], target) for r in runs if r["config"] == config] if target else []
        reached = [t for t in secs if t is not None]
        t_txt = (f"{statistics.median(reached):.1f} ({len(reached)}/{len(secs)} seeds)" if reached else "not reached")
        mark = " (best Adam)" if config == best_adam else (" (best SGD)" if config == best("sgd") else "")
        print(f"| {config}{mark} | " + " | ".join(f"{100 * a:.2f}" for a in s["acc_per_epoch"])
              + f" | {s['median_step_ms']:.2f} | {t_txt} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": summary, "runs": runs, "best_adam": best_adam}, f, indent=1)


if __name__ == "__main__":
    main()
