"""E-MSA vs Adam on the toy regression of Li, Chen, Tai & E (JMLR 2018): fit ``sin`` on [−π, π].

Published (as quoted in ``experiments/README.md``): with a residual tanh network of 20 blocks of
width 5, E-MSA reaches a training MSE of about 0.025 in 500 epochs, Adam about 0.27. The paper's
exact data set, batch size and initialisation are not given in the sources available here; the
setup below is ours:

* **data**: ``--n-train`` (1000) inputs ``x ~ U[−π, π]`` drawn once with ``--data-seed`` (0),
  targets ``y = sin x``; a test grid of 1000 evenly spaced points on [−π, π];
* **model**: ``restanh`` (:class:`pmptrain.bench.models.ResTanh`): ``h_0 = A x + a`` (1 → 5),
  20 blocks ``h ← h + step·tanh(W h + b)`` (5 → 5, ``--step`` 0.25, i.e. a forward-Euler ODE on
  [0, 5]), ``y = C h_T + c`` (5 → 1); torch's default Linear initialisation under
  ``torch.manual_seed(seed)`` — E-MSA and Adam start from identical weights;
* **training**: mean-squared error, shuffled mini-batches of ``--batch-size`` (100) with a seeded
  order shared by both optimizers, ``--epochs`` (500) epochs. E-MSA: ``pmptrain.EMSA`` closed form
  (every module is a Linear, so no fallback is used), ``lr`` (δ = 1/lr) ``--emsa-lr`` 1.0 and
  ``--rho`` 1.0 (the package defaults). Adam: ``--adam-lr`` 1e-3 (torch's default);
* **reported**: the train MSE on the whole training set (eval after every epoch), per optimizer
  and seed; the final value and the median over seeds. Curves go to ``OUT/results.json`` and
  ``OUT/train_mse.png`` (log scale).

    python experiments/emsa_sin_toy.py --threads 1                      # 500 epochs, seed 0
    python experiments/emsa_sin_toy.py --threads 1 --seeds 0,1,2 --out runs/emsa-sin-toy
    python experiments/emsa_sin_toy.py --threads 1 --epochs 2 --no-plot # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

import pmptrain
from pmptrain.bench.models import restanh

OPTIMIZERS = ("emsa", "adam")


def make_data(n_train: int, data_seed: int):
    """``(x_train, y_train, x_test, y_test)``, inputs shaped ``(N, 1)``, ``y = sin x``."""
    g = torch.Generator().manual_seed(data_seed)
    x_train = (torch.rand(n_train, 1, generator=g) * 2 - 1) * math.pi
    x_test = torch.linspace(-math.pi, math.pi, 1000).unsqueeze(1)
    return x_train, torch.sin(x_train), x_test, torch.sin(x_test)


def build_optimizer(name: str, model, args):
    if name == "emsa":
        return pmptrain.EMSA(model, lr=args.emsa_lr, rho=args.rho)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=args.adam_lr)
    raise ValueError(f"--optimizers: unknown optimizer {name!r} (use {', '.join(OPTIMIZERS)})")


@torch.no_grad()
def mse(model, x, y) -> float:
    model.eval()
    out = F.mse_loss(model(x), y).item()
    model.train()
    return out


def train_one(name: str, seed: int, data, args) -> Dict[str, object]:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = restanh((1,), 1, depth=args.depth, width=args.width, step=args.step)
    opt = build_optimizer(name, model, args)
    curve = [mse(model, x_train, y_train)]
    seconds = 0.0
    n = len(x_train)
    for epoch in range(args.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        t0 = time.perf_counter()
        for i in range(0, n, args.batch_size):
            idx = order[i:i + args.batch_size]
            opt.zero_grad()
            loss = F.mse_loss(model(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
        seconds += time.perf_counter() - t0
        curve.append(mse(model, x_train, y_train))
        if args.print_every and (epoch + 1) % args.print_every == 0:
            print(f"  {name:<5} seed {seed} epoch {epoch + 1:>4}: train MSE {curve[-1]:.3e} "
                  f"({seconds:.0f} s)", flush=True)
    if hasattr(opt, "detach"):
        opt.detach()
    return {"optimizer": name, "seed": seed, "train_mse": curve,
            "final_train_mse": curve[-1], "final_test_mse": mse(model, x_test, y_test),
            "min_train_mse": min(curve), "train_seconds": seconds}


def plot(runs: List[Dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=100)
    colors = {"emsa": "C0", "adam": "C1"}
    labels = {"emsa": "E-MSA", "adam": "Adam"}
    labelled = set()
    for r in runs:
        name = r["optimizer"]
        ax.plot(r["train_mse"], color=colors.get(name, "C2"), lw=1.2, alpha=0.85,
                label=None if name in labelled else labels.get(name, name))
        labelled.add(name)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train MSE")
    ax.set_title("sin on [−π, π], ResTanh 20×5", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=500)
    p.add_argument("--seeds", default="0", help="comma list of model/batch-order seeds (default 0)")
    p.add_argument("--optimizers", default="emsa,adam")
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--width", type=int, default=5)
    p.add_argument("--step", type=float, default=0.25, help="Euler step of each block (0.25)")
    p.add_argument("--emsa-lr", type=float, default=1.0, help="E-MSA lr, delta = 1/lr (1.0)")
    p.add_argument("--rho", type=float, default=1.0, help="E-MSA rho (1.0)")
    p.add_argument("--adam-lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--print-every", type=int, default=50)
    p.add_argument("--out", default="runs/emsa-sin-toy")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    for opt in ("epochs", "n_train", "batch_size", "depth", "width"):
        if getattr(args, opt) < 1:
            p.error(f"--{opt.replace('_', '-')}: must be >= 1, got {getattr(args, opt)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds: expected a comma list of integers, got {args.seeds!r}")
    args.optimizers = [s.strip() for s in args.optimizers.split(",") if s.strip()]
    for name in args.optimizers:
        if name not in OPTIMIZERS:
            p.error(f"--optimizers: unknown optimizer {name!r} (use {', '.join(OPTIMIZERS)})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = make_data(args.n_train, args.data_seed)
    runs = []
    for seed in args.seeds:
        for name in args.optimizers:
            runs.append(train_one(name, seed, data, args))
    print(f"\nsin on [-pi, pi], ResTanh depth {args.depth} width {args.width} step {args.step}, "
          f"{args.n_train} points, batch {args.batch_size}, {args.epochs} epochs, "
          f"seeds {args.seeds}")
    print(f"{'optimizer':<10} {'final train MSE (median [min-max])':<36} {'final test MSE':<15} "
          f"{'train s':>8}")
    summary = {}
    for name in args.optimizers:
        rs = [r for r in runs if r["optimizer"] == name]
        fin = [r["final_train_mse"] for r in rs]
        summary[name] = {
            "final_train_mse_median": statistics.median(fin),
            "final_train_mse_min": min(fin), "final_train_mse_max": max(fin),
            "final_test_mse_median": statistics.median(r["final_test_mse"] for r in rs),
            "train_seconds_median": statistics.median(r["train_seconds"] for r in rs)}
        s = summary[name]
        fin_txt = f"{s['final_train_mse_median']:.3e} [{min(fin):.2e}-{max(fin):.2e}]"
        print(f"{name:<10} {fin_txt:<36} {s['final_test_mse_median']:<15.3e} "
              f"{s['train_seconds_median']:>8.1f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in vars(args).items()}
    (out / "results.json").write_text(json.dumps(
        {"config": cfg, "command": " ".join(sys.argv), "torch": torch.__version__,
         "summary": summary, "runs": runs}, indent=1))
    if not args.no_plot:
        plot(runs, out / "train_mse.png")
        print(f"wrote {out / 'results.json'} and {out / 'train_mse.png'}")
    else:
        print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
