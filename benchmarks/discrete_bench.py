"""Fashion-MNIST benchmark of discrete-weight training (issue 3): DiscreteMSA vs baselines.

Same network, data order, batch size and epoch budget for every method; ``--seeds`` seeds, medians.
Reports test accuracy, ternary density, the time of one training iteration (forward + backward +
step; median over the run) and its ratio to SGD's in the same run.

Methods (``--methods``, comma separated; the optimizers of ``pmptrain.bench.registry`` with its
documented defaults, plus the reference EMA schedule for DiscreteMSA):

* ``binary-msa`` / ``ternary-msa`` — DiscreteMSA, ρ = ``--rho`` (0.95), a0 = 0.999, ``opt.end_epoch()``
  with γ = ``--decay-gamma`` (0.95) after every epoch; ternary λ = ``--lam`` (0.2) relative
  (``lam_mode="relative"``: λ_k = λ·max|M|); ``docs/discrete.md`` §6 for why;
* ``binary-msa-paper`` / ``ternary-msa-paper`` — the reference settings ρ = 0.5, absolute λ = 1e-7;
* ``binaryconnect``, ``twn``, ``bop`` — the baselines (latent_scale 0.05, Bop γ = 1e-3);
* ``adam``, ``sgd`` — full precision (``sgd`` mostly as the step-time reference).

Discrete methods discretize every Linear/Conv except ``--keep`` (default ``last``: the MLP and CNN
builders have no BatchNorm after the output layer, so a ±1 output layer without a scale gives
logits of size ~fan-in). The rest of the model (BatchNorm, biases, kept layers) is trained by each
method's Adam fallback, lr 1e-3.

    python benchmarks/discrete_bench.py --epochs 1 --seeds 0 --models mlp
    python benchmarks/discrete_bench.py --epochs 10 --seeds 0,1,2          # the full run
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

import pmptrain
from pmptrain.bench.data import load_dataset, make_loader
from pmptrain.bench.models import build_model
from pmptrain.bench.registry import get_spec
from pmptrain import DiscreteMSA

ALL_METHODS = ["sgd", "adam", "binary-msa", "binary-msa-paper", "ternary-msa", "ternary-msa-paper",
               "binaryconnect", "twn", "bop"]
#: the reference (Li & Hao) settings, reachable as "*-paper": ρ = 0.5, absolute λ = 1e-7
PAPER = {"rho": 0.5, "lam": 1e-7, "lam_mode": "absolute", "rho_scope": "tensor"}


def build(model_name: str, ds, seed: int):
    torch.manual_seed(seed)
    if model_name == "mlp":
        return build_model("mlp", ds.input_shape, ds.num_classes, widths=(1024, 1024), batchnorm=True)
    if model_name == "cnn":
        return build_model("cnn_small", ds.input_shape, ds.num_classes, batchnorm=True)
    raise ValueError(f"--models: unknown model {model_name!r} (use mlp, cnn)")


def make_optimizer(method: str, model, args):
    paper = method.endswith("-paper")
    method = method[: -len("-paper")] if paper else method
    spec = get_spec(method)
    if spec.discrete:
        keep = tuple(k for k in args.keep.split(",") if k and k != "none")
        scale = None if args.scale == "none" else args.scale
        pmptrain.discretize_(model, spec.levels, keep=keep, scale=scale)
    if method in ("binary-msa", "ternary-msa"):
        kw = dict(PAPER) if paper else dict(rho=args.rho, lam=args.lam, lam_mode=args.lam_mode, rho_scope=args.rho_scope)
        if method == "binary-msa":
            kw["lam"] = 0.0
        return DiscreteMSA(model, decay=args.decay, decay_gamma=args.decay_gamma, **kw)
    return spec.build(model)


def loss_fn(out, y, kind: str):
    if kind == "ce":
        return F.cross_entropy(out, y)
    # squared hinge on ±1 targets (Li & Hao's loss)
    t = -torch.ones_like(out)
    t.scatter_(1, y[:, None], 1.0)
    return F.relu(1.0 - t * out).pow(2).mean()


@torch.no_grad()
def accuracy(model, x, y, batch=1000) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    model.train()
    return correct / len(x)


def run(method: str, model_name: str, ds, seed: int, args) -> Dict[str, float]:
    model = build(model_name, ds, seed)
    opt = make_optimizer(method, model, args)
    iter_times: List[float] = []
    curve = []
    for epoch in range(args.epochs):
        loader = make_loader(ds.train_x, ds.train_y, args.batch, seed=seed, epoch=epoch)
        for i, (x, y) in enumerate(loader):
            if args.max_steps and i >= args.max_steps:
                break
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = loss_fn(model(x), y, args.loss)
            loss.backward()
            opt.step()
            iter_times.append(time.perf_counter() - t0)
        if isinstance(opt, DiscreteMSA):
            opt.end_epoch()
        curve.append(accuracy(model, ds.test_x, ds.test_y))
    out = {"acc": curve[-1], "iter_ms": 1e3 * statistics.median(iter_times), "curve": curve}
    dts = pmptrain.discrete_parameters(model)
    if dts and any(d.grid.has_zero for d in dts):
        nnz = sum(int(torch.count_nonzero(d.param)) for d in dts)
        out["density"] = nnz / sum(d.param.numel() for d in dts)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="Fashion-MNIST discrete-weight benchmark (issue 3)")
    ap.add_argument("--methods", default=",".join(ALL_METHODS))
    ap.add_argument("--models", default="mlp,cnn", help="mlp (784-1024-1024-10, BN) and/or cnn (cnn_small, BN)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--keep", default="last", help="layers kept full precision: none|first|last|first,last")
    ap.add_argument("--scale", default="none", choices=["none", "tensor", "channel"])
    ap.add_argument("--loss", default="ce", choices=["ce", "hinge"])
    ap.add_argument("--rho", type=float, default=0.95, help="ρ of binary-msa/ternary-msa (the *-paper methods: 0.5)")
    ap.add_argument("--decay", type=float, default=0.999)
    ap.add_argument("--decay-gamma", type=float, default=0.95)
    ap.add_argument("--lam", type=float, default=0.2, help="λ of ternary-msa (relative with --lam-mode relative)")
    ap.add_argument("--rho-scope", default="tensor", choices=["tensor", "channel"])
    ap.add_argument("--lam-mode", default="relative", choices=["absolute", "relative"])
    ap.add_argument("--max-train", type=int, default=None, help="first n training examples (smoke runs)")
    ap.add_argument("--max-steps", type=int, default=0, help="steps per epoch cap (0: whole epoch)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load_dataset("fashion-mnist", max_train=args.max_train)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"Fashion-MNIST, {args.epochs} epoch(s), batch {args.batch}, seeds {seeds}, keep={args.keep}, "
          f"scale={args.scale}, loss={args.loss}, threads={torch.get_num_threads()}\n")
    for model_name in [m.strip() for m in args.models.split(",") if m.strip()]:
        results = {m: [run(m, model_name, ds, s, args) for s in seeds] for m in methods}
        med = {m: {k: statistics.median(r[k] for r in rs) for k in ("acc", "iter_ms")} for m, rs in results.items()}
        sgd_ms = med["sgd"]["iter_ms"] if "sgd" in med else None
        print(f"### {model_name}\n")
        print("| method | test acc % (median) | per seed | ternary density | iteration ms | / SGD |")
        print("|---|---|---|---|---|---|")
        for m, rs in results.items():
            dens = [r["density"] for r in rs if "density" in r]
            ratio = f"{med[m]['iter_ms'] / sgd_ms:.2f}" if sgd_ms else "-"
            per_seed = ", ".join("%.2f" % (100 * r["acc"]) for r in rs)
            density = "%.1f%%" % (100 * statistics.median(dens)) if dens else "-"
            print(f"| {m} | {100 * med[m]['acc']:.2f} | {per_seed} | {density} | {med[m]['iter_ms']:.1f} | {ratio} |")
        if args.epochs > 1:
            print("\nper-epoch test accuracy (seed " + str(seeds[0]) + "):")
            for m, rs in results.items():
                print(f"- {m}: " + ", ".join(f"{100 * a:.2f}" for a in rs[0]["curve"]))
        print()


if __name__ == "__main__":
    main()
