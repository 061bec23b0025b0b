"""The sin toy of Li, Chen, Tai & E (JMLR 2018), in the published setup, and how robust it is.

**The published setup** (``LiQianxiao/MaxPrinciple-DeepLearning``: ``config.yml`` section ``toy``,
``main_toy.py``, ``msalib/``), reproduced here exactly:

* **data**: 100 training and 100 test inputs ``x ~ U[−π, π]`` drawn with ``numpy.random.seed(1)``
  (train first), targets ``sin x``; each input repeated into 5 columns (the state dimension);
* **model**: 20 residual blocks ``h ← h + 0.25·tanh(h K + b)`` (``TanhResidualBlock(5, 0.25)``) with
  every weight and bias initialised to exactly 0, no input or output layer; the prediction is the
  sum of the 5 final units;
* **loss**: mean squared error plus ``1e-3·½‖θ‖²`` over every parameter, which is also the reported
  train loss (evaluated on the whole training set after every epoch);
* **training**: full batch (batch 100: one step per epoch), 500 epochs. Adam lr 0.005, SGD lr 0.1,
  Adagrad lr 0.1 (TensorFlow's Adagrad starts its accumulator at 0.1: so do we) minimise the
  regularised loss; E-MSA is :meth:`pmptrain.EMSA.paper` with ``blocks=(TanhResidualBlock,)`` (the
  whole block is the controlled function), ρ = 1 with penalties summed over the batch, no proximal
  term, the L2 term inside H, L-BFGS at most 10 iterations from ``θ_k + 0.005·U(−1, 1)``
  (``perturb_init=0.005``). Its backward pass is the data loss only (the L2 term is in H).

Runs (``--runs``, comma list; ``name`` or ``name:lr``): ``adam``, ``sgd``, ``adagrad``,
``emsa-paper`` (the reference E-MSA), ``emsa-paper-noperturb`` (the same with ``perturb_init=0``),
``emsa-closed`` (pmptrain's closed form per Linear with the package defaults ρ = 1, lr 1, the L2 term in the
loss). **The robustness study** (``--init perturbed``) starts every run from ``0.005·U(−1, 1)``
weights instead of zeros (zero weights with a repeated input keep every layer in a symmetric
subspace); ``--runs adam:0.005,adam:0.01,adam:0.02,adam:0.05,adam:0.1`` is the Adam lr sweep.

    python experiments/emsa_sin_toy.py --threads 1                                # published setup
    python experiments/emsa_sin_toy.py --threads 1 --init perturbed --out runs/sin-perturbed
    python experiments/emsa_sin_toy.py --threads 1 --init perturbed --runs adam:0.005,adam:0.01,adam:0.02,adam:0.05,adam:0.1
    python experiments/emsa_sin_toy.py --threads 1 --record experiments/results/sin_toy_reference.json

``--record`` writes the curves to a committed file that ``tests/test_experiments.py`` replays the
first steps of (the curves of this machine's torch; the published figures are in the README).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import pmptrain
from pmptrain.bench.models import TanhResidualBlock

RUNS = ("adam", "sgd", "adagrad", "emsa-paper", "emsa-paper-noperturb", "emsa-closed")
DEFAULT_LR = {"adam": 0.005, "sgd": 0.1, "adagrad": 0.1}
PUBLISHED_RUNS = "adam,sgd,adagrad,emsa-paper,emsa-paper-noperturb,emsa-closed"
REG = 1e-3  # config.yml: reg


def make_data(seed: int = 1, n_train: int = 100, n_test: int = 100, width: int = 5):
    """``(x_train, y_train, x_test, y_test)`` as main_toy.py draws them: numpy seed, train then
    test from ``U[−π, π]``, targets ``sin x``, inputs repeated into ``width`` columns (float32)."""
    rng = np.random.RandomState(seed)  # the stream of np.random.seed(seed)
    x_train = rng.uniform(-np.pi, np.pi, (n_train, 1))
    x_test = rng.uniform(-np.pi, np.pi, (n_test, 1))

    def t(a):
        return torch.tensor(a, dtype=torch.float32)

    return (t(np.repeat(x_train, width, axis=1)), t(np.sin(x_train)),
            t(np.repeat(x_test, width, axis=1)), t(np.sin(x_test)))


def make_model(depth: int = 20, width: int = 5, step: float = 0.25, init: str = "zero",
               init_scale: float = 0.005, init_seed: int = 0) -> nn.Sequential:
    """``depth`` blocks ``h ← h + step·tanh(h K + b)``, every parameter 0 (``init="zero"``, the
    reference's ``truncated_normal(stddev=0)`` and ``constant(0)``) or ``init_scale·U(−1, 1)``
    (``"perturbed"``, drawn in parameter order from a generator seeded ``init_seed``)."""
    model = nn.Sequential(*[TanhResidualBlock(width, step) for _ in range(depth)])
    gen = torch.Generator().manual_seed(init_seed)
    with torch.no_grad():
        for p in model.parameters():
            if init == "zero":
                p.zero_()
            elif init == "perturbed":
                p.copy_(init_scale * (2.0 * torch.rand(p.shape, generator=gen) - 1.0))
            else:
                raise ValueError(f"init must be 'zero' or 'perturbed', got {init!r}")
    return model


def data_loss(model, x, y):
    """main_toy.py's ``loss_func``: the MSE of the summed output units."""
    return F.mse_loss(model(x).sum(1, keepdim=True), y)


def l2_term(model) -> torch.Tensor:
    return REG * 0.5 * sum(p.pow(2).sum() for p in model.parameters())


def build(name: str, lr, model, perturb: float):
    """The optimizer of run ``name`` (``lr``: the baselines' lr, None for the default)."""
    if name in DEFAULT_LR:
        lr = DEFAULT_LR[name] if lr is None else lr
        if name == "adam":
            return torch.optim.Adam(model.parameters(), lr=lr)
        if name == "sgd":
            return torch.optim.SGD(model.parameters(), lr=lr)
        return torch.optim.Adagrad(model.parameters(), lr=lr, initial_accumulator_value=0.1)
    if lr is not None:
        raise ValueError(f"run {name!r} takes no ':lr'")
    if name == "emsa-paper":
        return pmptrain.EMSA.paper(model, blocks=(TanhResidualBlock,), rho=1.0, l2=REG, perturb_init=perturb)
    if name == "emsa-paper-noperturb":
        return pmptrain.EMSA.paper(model, blocks=(TanhResidualBlock,), rho=1.0, l2=REG, perturb_init=0.0)
    if name == "emsa-closed":
        # the package defaults as recorded (0.1.x: before the default trust region max_step=0.1,
        # which binds on this zero-started net's steps and changes the curve)
        return pmptrain.EMSA(model, lr=1.0, rho=1.0, max_step=None)
    raise ValueError(f"unknown run {name!r} (use {', '.join(RUNS)})")


def l2_in_h(name: str) -> bool:
    """Runs whose regulariser is inside H (not in the loss they backward)."""
    return name in ("emsa-paper", "emsa-paper-noperturb")


@torch.no_grad()
def evaluate(model, x, y) -> Dict[str, float]:
    mse = float(data_loss(model, x, y))
    return {"mse": mse, "loss": mse + float(l2_term(model))}


@torch.no_grad()
def symmetry_gap(model) -> float:
    """``max |W − mean W|`` over the blocks' weight entries: 0 while every layer stays in the
    symmetric subspace of a zero start with a repeated input."""
    return max(float((b.linear.weight - b.linear.weight.mean()).abs().max()) for b in model)


def train_one(spec: str, data, args) -> Dict[str, object]:
    name, _, lr_text = spec.partition(":")
    lr = float(lr_text) if lr_text else None
    x, y, xt, yt = data
    torch.manual_seed(0)
    model = make_model(init=args.init, init_scale=args.init_scale, init_seed=args.init_seed)
    opt = build(name, lr, model, args.perturb_init)
    first = evaluate(model, x, y)
    loss_curve, mse_curve = [first["loss"]], [first["mse"]]
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        opt.zero_grad()
        loss = data_loss(model, x, y)
        if not l2_in_h(name):
            loss = loss + l2_term(model)
        loss.backward()
        opt.step()
        ev = evaluate(model, x, y)
        loss_curve.append(ev["loss"])
        mse_curve.append(ev["mse"])
        if args.print_every and (epoch + 1) % args.print_every == 0:
            print(f"  {spec:<22} epoch {epoch + 1:>4}: train loss {ev['loss']:.4e} (mse {ev['mse']:.4e}, "
                  f"{time.perf_counter() - t0:.0f} s)", flush=True)
    seconds = time.perf_counter() - t0
    if hasattr(opt, "detach"):
        opt.detach()
    test = evaluate(model, xt, yt)
    return {"run": spec, "train_loss": loss_curve, "train_mse": mse_curve,
            "final_train_loss": loss_curve[-1], "final_train_mse": mse_curve[-1],
            "final_test_loss": test["loss"], "symmetry_gap": symmetry_gap(model), "seconds": seconds}


def plot(runs: List[Dict[str, object]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100)
    for i, r in enumerate(runs):
        ax.plot(r["train_loss"], color=f"C{i}", lw=1.2, label=r["run"])
    ax.set_yscale("log")
    ax.set_xlabel("epoch (= full-batch step)")
    ax.set_ylabel("train loss (MSE + 1e-3·½‖θ‖²)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=500)
    p.add_argument("--runs", default=PUBLISHED_RUNS, help=f"comma list of name[:lr] (default {PUBLISHED_RUNS})")
    p.add_argument("--init", choices=("zero", "perturbed"), default="zero",
                   help="initial weights: 0 (published) or init-scale*U(-1,1) (robustness study)")
    p.add_argument("--init-scale", type=float, default=0.005)
    p.add_argument("--init-seed", type=int, default=0)
    p.add_argument("--perturb-init", type=float, default=0.005, help="E-MSA inner start perturbation (0.005)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--print-every", type=int, default=100)
    p.add_argument("--out", default="runs/emsa-sin-toy")
    p.add_argument("--record", default=None, help="also write the curves to this JSON file")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error(f"--epochs: must be >= 1, got {args.epochs}")
    if not args.init_scale >= 0 or not args.perturb_init >= 0:
        p.error("--init-scale and --perturb-init must be >= 0")
    args.runs = [s.strip() for s in args.runs.split(",") if s.strip()]
    for spec in args.runs:
        name, _, lr = spec.partition(":")
        if name not in RUNS:
            p.error(f"--runs: unknown run {name!r} (use {', '.join(RUNS)})")
        if lr:
            if name not in DEFAULT_LR:
                p.error(f"--runs: {name!r} takes no ':lr'")
            try:
                if not float(lr) > 0:
                    raise ValueError
            except ValueError:
                p.error(f"--runs: {spec!r}: lr must be a number > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = make_data()
    runs = [train_one(spec, data, args) for spec in args.runs]
    print(f"\nsin toy (published setup), init {args.init}, {args.epochs} epochs")
    print(f"{'run':<24} {'train loss (incl. reg)':>22} {'train MSE':>10} {'test loss':>10} "
          f"{'max|W-mean W|':>13} {'s':>6}")
    for r in runs:
        print(f"{r['run']:<24} {r['final_train_loss']:>22.4e} {r['final_train_mse']:>10.3e} "
              f"{r['final_test_loss']:>10.3e} {r['symmetry_gap']:>13.1e} {r['seconds']:>6.1f}")
    result = {"config": {k: v for k, v in vars(args).items()}, "command": " ".join(sys.argv),
              "torch": torch.__version__, "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    if args.record:
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        Path(args.record).write_text(json.dumps(result, indent=1))
    if not args.no_plot:
        plot(runs, out / "train_loss.png", f"sin toy, published setup, init {args.init}")
    print(f"wrote {out / 'results.json'}" + ("" if args.no_plot else f" and {out / 'train_loss.png'}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
