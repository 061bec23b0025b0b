"""Step time of DiscreteMSA vs SGD on the 784-1024-1024-10 MLP with BatchNorm (issue 3 target: ≤ 1.2×).

Times one full training iteration (zero_grad, forward, backward, step) on a fixed random batch,
median over ``--repeats`` after ``--warmup`` iterations, all optimizers in the same run and
interleaved round-robin (so load from other processes hits all of them alike). Also times the
pure rule (``discrete_msa_delta``) on the largest layer.

    python benchmarks/discrete_step_time.py [--threads 1] [--batch 128] [--repeats 60]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import pmptrain
from pmptrain.bench.models import build_model
from pmptrain.discrete import binary_grid, discrete_msa_delta, discrete_msa_step, ternary_grid
from pmptrain import DiscreteMSA


def make(kind: str, seed: int = 0, keep=("last",)):
    torch.manual_seed(seed)
    model = build_model("mlp", (1, 28, 28), 10, widths=(1024, 1024), batchnorm=True)
    if kind == "sgd":
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if kind == "adam":
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)
    levels = "binary" if kind.startswith("binary") else "ternary"
    pmptrain.discretize_(model, levels, keep=keep)
    if kind.endswith("-rel"):  # the recommended ternary setting: relative λ
        return model, DiscreteMSA(model, rho=0.95, lam=0.2, lam_mode="relative")
    return model, DiscreteMSA(model, rho=0.5, lam=1e-7 if levels == "ternary" else 0.0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--keep", default="last", help="layers kept full precision (default last, as in "
                    "discrete_bench.py); 'none' binarises the output layer too: an untrained ±1 output layer "
                    "saturates the softmax, its gradients underflow to subnormals and float ops on them are "
                    "~10x slower on x86 (torch.set_flush_denormal(True) avoids that)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    kinds = ["sgd", "adam", "binary-msa", "ternary-msa", "ternary-msa-rel"]
    keep = tuple(k for k in args.keep.split(",") if k and k != "none")
    runs = {k: make(k, keep=keep) for k in kinds}
    times = {k: [] for k in kinds}

    def iteration(model, opt):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        t0 = time.perf_counter()
        opt.step()
        return time.perf_counter() - t0

    for r in range(args.warmup + args.repeats):
        for k in kinds:
            model, opt = runs[k]
            t0 = time.perf_counter()
            step_t = iteration(model, opt)
            total = time.perf_counter() - t0
            if r >= args.warmup:
                times[k].append((total, step_t))
    sgd_total = statistics.median(t for t, _ in times["sgd"])
    print(f"threads={args.threads} batch={args.batch} repeats={args.repeats} keep={keep} (median)\n")
    print("| optimizer | iteration ms | optimizer.step ms | iteration / SGD |")
    print("|---|---|---|---|")
    for k in kinds:
        tot = statistics.median(t for t, _ in times[k])
        st = statistics.median(s for _, s in times[k])
        print(f"| {k} | {tot * 1e3:.2f} | {st * 1e3:.2f} | {tot / sgd_total:.2f} |")

    # the pure rule on the largest layer (1024×784)
    w_acc = torch.randn(1024, 784) * 1e-4
    print("\n| rule on 1024×784 | fused ms | reference ms |\n|---|---|---|")
    for g in (binary_grid(), ternary_grid()):
        w = g.tensor()[torch.randint(0, len(g), (1024, 784))]
        f, ref = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            discrete_msa_delta(w, w_acc, g, 0.5, 1e-7)
            t1 = time.perf_counter()
            discrete_msa_step(w, w_acc, g, 0.5, 1e-7)
            t2 = time.perf_counter()
            f.append(t1 - t0)
            ref.append(t2 - t1)
        print(f"| {g.name} | {statistics.median(f) * 1e3:.2f} | {statistics.median(ref) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
