"""The symmetric products of the exact step (pmptrain.symmetric) against the plain ones, by shape.

Two tables, each ratio against the plain product timed in the same process, interleaved in rounds
(medians of the rounds' medians; process CPU time, so other load inflates it less):

* ``sym_gram(R)`` (block-triangular, mirrored) against ``R.T @ R`` (one GEMM), for the shapes of
  the bench models' statistics: the small CNN's 3×3 patch rows, the GPT bench's ``2048 × d`` rows,
  the MLP's Gram matrices ``AAᵀ`` (``R = Aᵀ``, a transposed view), ResNet-18's patch rows and
  stage-4 Gram matrices;
* a stride-1 3×3 convolution's patch statistic ``(XᵀX, Σx)``: im2col rows + one GEMM (before),
  im2col rows + ``sym_gram``, and ``conv2d_patch_gram`` (the shifted products, no im2col rows),
  with the route ``ConvAdapter.input_gram`` takes (``shifted_gram_pays``).

    python benchmarks/sym_products.py --threads 1 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from pmptrain.modules import _patch_rows
from pmptrain.symmetric import conv2d_patch_gram, shifted_gram_pays, sym_block_width, sym_gram

GRAM_SHAPES = [  # (rows, width, transposed view, what)
    (25088, 144, False, "small CNN conv2 patch rows"),
    (2048, 128, False, "GPT bench, d = 128"),
    (2048, 512, False, "GPT bench, d = 512"),
    (784, 128, True, "MLP Gram AAᵀ, A 128 × 784"),
    (4096, 576, False, "ResNet-18 stage-1 patch rows (a slice)"),
    (4608, 1024, True, "ResNet-18 stage-4 Gram AAᵀ, A 1024 × 4608"),
]
CONV_SHAPES = [  # (batch, channels, spatial, what)
    (128, 16, 14, "small CNN conv2"),
    (64, 64, 32, "ResNet-18 stage 1"),
    (64, 128, 16, "ResNet-18 stage 2"),
    (64, 256, 8, "ResNet-18 stage 3"),
    (64, 512, 4, "ResNet-18 stage 4"),
]


def _median_time(fn, reps: int) -> float:
    out = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        out.append(time.process_time() - t0)
    return statistics.median(out)


def _interleaved(fns, rounds: int, reps: int):
    times = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            times[i].append(_median_time(fn, reps))
    return [statistics.median(t) for t in times]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-large", action="store_true", help="leave out the ResNet-18 shapes")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(f"sym_gram against R.T @ R ({args.threads} thread(s), process CPU time, medians)")
    print("| rows × width | what | block width | plain ms | sym_gram ms | ratio |")
    print("|---|---|---:|---:|---:|---:|")
    for n, k, transposed, what in GRAM_SHAPES:
        if args.skip_large and "ResNet" in what:
            continue
        r = torch.randn(k, n).T if transposed else torch.randn(n, k)
        reps = max(1, min(20, int(2e8 / (n * k * k))))
        plain, sym = _interleaved([lambda: r.T @ r, lambda: sym_gram(r)], args.rounds, reps)
        print(f"| {n} × {k} | {what} | {sym_block_width(k, n)} | {plain * 1e3:.3f} | {sym * 1e3:.3f} | "
              f"{sym / plain:.2f} |", flush=True)

    print(f"\nstride-1 3×3 convolution, zero padding 1: (XᵀX, Σx) ({args.threads} thread(s), process CPU time)")
    print("| input | what | im2col + GEMM ms | im2col + sym_gram | shifted | route taken |")
    print("|---|---|---:|---:|---:|---|")
    for b, c, hw, what in CONV_SHAPES:
        if args.skip_large and "ResNet" in what:
            continue
        xp = F.pad(torch.randn(b, c, hw, hw), (1, 1, 1, 1))

        def im2col_gemm():
            rows = _patch_rows(xp, (3, 3), (1, 1), (1, 1))
            return rows.T @ rows, rows.sum(0)

        def im2col_sym():
            rows = _patch_rows(xp, (3, 3), (1, 1), (1, 1))
            return sym_gram(rows), rows.sum(0)

        def shifted():
            return conv2d_patch_gram(xp, (3, 3), zero_rows=(1, 1))

        reps = 10 if c < 64 else 1
        t0, t1, t2 = _interleaved([im2col_gemm, im2col_sym, shifted], args.rounds, reps)
        route = "shifted" if shifted_gram_pays((hw, hw), (3, 3), c, (1, 1)) else "im2col + sym_gram"
        print(f"| {b}×{c}×{hw}×{hw} | {what} | {t0 * 1e3:.2f} | {t1 / t0:.2f} | {t2 / t0:.2f} | {route} |",
              flush=True)


if __name__ == "__main__":
    main()
