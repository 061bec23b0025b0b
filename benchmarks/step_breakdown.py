"""Process CPU time spent inside the functions of the exact step that form statistics and solve,
per training iteration, without a profiler (whose per-operation overhead distorts small steps).

Wraps (inclusive times; nested wrappers count in both): the capture's accumulation and its symmetric
products (``sym_gram`` in ``pmptrain.capture``), the shifted patch statistic
(``conv2d_patch_gram``), the convolutions' im2col rows (``ConvAdapter.input_rows``) and costate rows
(``output_rows``), the costate fold, the eigendecompositions (``eigh_psd``), the Gram products of the
solves (``sym_gram`` in ``pmptrain.hamiltonian``) and ``opt.step()``. ``--plain`` runs inside
``pmptrain.symmetric.plain_products()`` (the products before i17c).

    python benchmarks/step_breakdown.py --model cnn --optimizer emsa --steps 20
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import inspect
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import MODELS, iteration, setup  # noqa: E402

import pmptrain.capture as cap  # noqa: E402
import pmptrain.hamiltonian as ham  # noqa: E402
import pmptrain.modules as mods  # noqa: E402
from pmptrain.symmetric import plain_products  # noqa: E402


def _wrap(acc, obj, name, label):
    real = getattr(obj, name)

    @functools.wraps(real)
    def timed(*a, **k):
        t0 = time.process_time()
        try:
            return real(*a, **k)
        finally:
            acc[label] += time.process_time() - t0

    if inspect.isclass(obj) and isinstance(inspect.getattr_static(obj, name), staticmethod):
        timed = staticmethod(timed)
    setattr(obj, name, timed)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cnn", choices=sorted(MODELS))
    ap.add_argument("--optimizer", default="emsa")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plain", action="store_true", help="inside plain_products(): the products before i17c")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    acc = collections.defaultdict(float)
    for obj, name, label in [
        (cap.ModuleCapture, "_accumulate", "capture (backward hooks), all"),
        (cap, "sym_gram", "  capture: sym_gram (XᵀX, P̂ᵀP̂ folds)"),
        (mods, "conv2d_patch_gram", "  capture: conv2d_patch_gram"),
        (mods.ConvAdapter, "input_rows", "  capture: conv im2col rows"),
        (mods.ConvAdapter, "output_rows", "  capture: conv costate rows"),
        (cap, "_add_costates", "  capture: costate statistics"),
        (ham, "eigh_psd", "  step: eigh_psd"),
        (ham, "sym_gram", "  step: Gram products AAᵀ"),
    ]:
        _wrap(acc, obj, name, label)
    spec, model, opt, batches = setup(args.model, args.optimizer, args.batch or MODELS[args.model].default_batch,
                                      torch.device("cpu"))
    _wrap(acc, opt, "step", "opt.step(), all")
    ctx = plain_products() if args.plain else contextlib.nullcontext()
    with ctx:
        for _ in range(args.warmup):
            iteration(spec, model, opt, batches)
        acc.clear()
        t0 = time.process_time()
        for _ in range(args.steps):
            iteration(spec, model, opt, batches)
        total = time.process_time() - t0
    print(f"{args.model}, {args.optimizer}{' (plain products)' if args.plain else ''}, {args.threads} thread(s): "
          f"process CPU ms per iteration")
    print(f"| part | ms |\n|---|---:|\n| iteration | {total / args.steps * 1e3:.2f} |")
    for label, v in sorted(acc.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {v / args.steps * 1e3:.2f} |")


if __name__ == "__main__":
    main()
