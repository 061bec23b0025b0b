"""The FLOP floor of the exact E-MSA step on the MLP, measured: SGD's iteration plus only the bare
extra operations of the default (Gram-form, isotropic costate) solve — per layer the Gram product
``XXᵀ``, its Cholesky factorisation, ``S Xᵀ``, the two triangular solves and ``(·)X`` — against the
real E-MSA step (fast path) and its careful reference path, interleaved in one process, medians of
process CPU time, 1 thread (robust to other load on a shared machine).

    python benchmarks/step_floor.py --rounds 15

``--kept`` adds the floor of an amortised Gram-form step (issue 17): a factorisation kept from a
refresh step (no ``XXᵀ``, no Cholesky), with only the products that apply it to this step's ``S``
— ``S Xᵀ``, the two triangular solves and ``(·)X`` — which any solve with kept rows still makes.

    python benchmarks/step_floor.py --rounds 15 --kept
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_time import iteration, setup  # noqa: E402


def bare_ops(dims, rows=128, kept=False):
    """A function running the extra products and factorisations of the exact step's Gram route
    (``kept``: with the Gram matrix and its Cholesky factor kept from an earlier step)."""
    xs = [torch.randn(rows, n) for _, n in dims]
    ss = [torch.randn(m, n) for m, n in dims]

    def factor(x):
        k = torch.mm(x, x.T)
        k.diagonal().add_(1.0)
        return torch.linalg.cholesky_ex(k)[0]
    chols = [factor(x) for x in xs]

    def run():
        for x, s, kept_chol in zip(xs, ss, chols):
            chol = kept_chol if kept else factor(x)
            y = torch.linalg.solve_triangular(chol.mT, s @ x.T, upper=True, left=False)
            y = torch.linalg.solve_triangular(chol, y, upper=False, left=False)
            s.addmm_(y, x, alpha=-1e-9)
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--kept", action="store_true", help="also time the floor with a kept factorisation")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dev = torch.device("cpu")
    runs = {n: setup("mlp", n, 128, dev) for n in ("sgd", "emsa", "emsa-careful")}
    dims = [(256, 784), (256, 256), (10, 256)]
    bare = {"sgd + bare extra ops": bare_ops(dims)}
    if args.kept:
        bare["sgd + bare extra ops, factorisation kept"] = bare_ops(dims, kept=True)
    times = {n: [] for n in (*runs, *bare)}
    for spec, model, opt, batches in runs.values():
        for _ in range(5):
            iteration(spec, model, opt, batches)
    for _ in range(args.rounds):
        for name in times:
            spec, model, opt, batches = runs["sgd" if name.startswith("sgd +") else name]
            for _ in range(args.steps):
                t0 = time.process_time()
                iteration(spec, model, opt, batches)
                if name in bare:
                    bare[name]()
                times[name].append(time.process_time() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    print("| MLP 784-256-256-10, batch 128, 1 thread, CPU time | ms | × SGD |\n|---|---:|---:|")
    for n, v in med.items():
        print(f"| {n} | {1e3 * v:.2f} | {v / med['sgd']:.2f}× |")


if __name__ == "__main__":
    main()
