"""The cost of the clip-consistent costates under FSDP2: the time of the rescale's one all-reduce
per step against the whole step (2 gloo ranks on CPU).

The GPT bench model (2 blocks × 128, vocabulary 256; each block and then the root sharded by
``fully_shard``), ``EMSA(model)`` (the transformer setting: ``rho_scale="costate"``), batch
8 × 32 tokens split over the ranks, clipped at 1.0. Per step: the wall time of
``PMPOptimizer._union_grad_sq`` (the local sums of the shards' squares and the all-reduce of three
numbers per sharded parameter) and of the whole iteration (zero_grad, forward, backward, clip,
step); medians over the steps after ``--warmup``, on rank 0. The record itself (one square-sum per
parameter at the end of each backward pass) is in the backward's time, as before this change.

    python benchmarks/clip_rescale_cost.py          # ~1 min; a loaded machine: ratios, not times
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def _rank_main(rank, world, args):
    import pmptrain
    from pmptrain.bench.lm import shard_blocks
    from pmptrain.bench.models import build_model
    from pmptrain.optim.shell import PMPOptimizer

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = build_model("gpt", (args.seq,), 256)
    shard_blocks(model)
    opt = pmptrain.EMSA(model)
    spent = []
    original = PMPOptimizer._union_grad_sq

    def timed(self, *a, **k):
        t0 = time.perf_counter()
        out = original(self, *a, **k)
        spent.append(time.perf_counter() - t0)
        return out

    PMPOptimizer._union_grad_sq = timed
    gen = torch.Generator().manual_seed(7)
    steps = []
    part = args.batch // world
    for _ in range(args.warmup + args.steps):
        x = torch.randint(0, 256, (args.batch, args.seq), generator=gen)[rank * part:(rank + 1) * part]
        y = torch.randint(0, 256, (args.batch, args.seq), generator=gen)[rank * part:(rank + 1) * part]
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps.append(time.perf_counter() - t0)
    PMPOptimizer._union_grad_sq = original
    w = args.warmup
    return {"step": statistics.median(steps[w:]), "rescale": statistics.median(spent[w:]), "calls": len(spent)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=32)
    args = p.parse_args(argv)
    from dist_utils import run_distributed

    res = run_distributed(_rank_main, 2, args=(args,), timeout=600.0)[0]
    print(f"step {res['step'] * 1e3:.1f} ms, rescale all-reduce {res['rescale'] * 1e3:.2f} ms "
          f"({res['rescale'] / res['step']:.2%} of the step; {res['calls']} calls), rank 0, medians")


if __name__ == "__main__":
    main()
