"""Optimizer-state bytes per rank under FSDP2 (issue 20): 1, 2 and 4 gloo ranks on CPU; and the step
time that sharding the kept statistics costs.

The GPT bench model (``pmptrain.bench.models.build_model("gpt", ...)``: 2 blocks × 128, tied
embedding, vocabulary 256), each block and then the root wrapped by ``fully_shard``
(:func:`pmptrain.bench.lm.shard_blocks`), trained for ``--steps`` steps by each configuration; then
:func:`pmptrain.optim.sharded.state_bytes` on every rank: ``sharded`` — the local rows of the
DTensor state (per-parameter state: fallback moments, per-channel statistics, the averaged gradients
``grad_avg`` of ``grad_decay``, and by default the module units' running covariances and eigenbases,
split by their rows), ``whole`` — plain tensors every rank holds (vectors, step counters; the
covariances too with ``shard_statistics=False``, the ``-whole`` rows). Bytes are counted, not timed:
those numbers do not depend on the machine's load.

``--time-steps N`` then times, on 2 and 4 ranks, ``N`` steps of the transformer setting with the
statistics sharded (gathered with the parameters in the step's batched all-gather) and kept whole, interleaved step by step
in the same ranks (a barrier before each step; rank 0's wall time of ``step()``; medians).

    python benchmarks/fsdp_state_bytes.py --time-steps 20   # a few minutes on 2 loaded cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

CONFIGS = {
    "emsa": dict(rho=1.0),
    "emsa-stat_decay": dict(rho=1.0, stat_decay=0.95),
    "emsa-grad_decay": dict(rho=1.0, grad_decay=0.95),  # grad_avg: one sharded tensor per parameter
    "emsa-stat_decay-whole": dict(rho=1.0, stat_decay=0.95, shard_statistics=False),
    # EMSA(model)'s default on a GPT: rho_scale="costate", grad_decay and stat_decay 0.95
    "emsa-transformer": dict(setting="transformer"),
    "emsa-transformer-whole": dict(setting="transformer", shard_statistics=False),
    # the embeddings, LayerNorms and MLPs by the Adam fallback (per-parameter moments); attention by E-MSA
    "emsa-adam-fallback": dict(exclude=("wte", "lm_head", "wpe", "h.0.ln_1", "h.0.ln_2", "h.1.ln_1", "h.1.ln_2",
                                        "ln_f", "h.0.mlp.0", "h.0.mlp.2", "h.1.mlp.0", "h.1.mlp.2"),
                               setting="classic"),  # (the GPT's default setting would add stat_decay)
}


def _build(world, args, **kw):
    import pmptrain
    from pmptrain.bench.lm import shard_blocks
    from pmptrain.bench.models import build_model

    torch.manual_seed(0)
    model = build_model("gpt", (args.seq,), 256)
    if world > 1:
        shard_blocks(model)
    return model, pmptrain.EMSA(model, **kw)


def _batch(gen, rank, world, args):
    x = torch.randint(0, 256, (args.batch, args.seq), generator=gen)
    y = torch.randint(0, 256, (args.batch, args.seq), generator=gen)
    part = args.batch // world
    return x[rank * part:(rank + 1) * part], y[rank * part:(rank + 1) * part]


def _rank_main(rank, world, args):
    from pmptrain.optim.sharded import state_bytes

    warnings.simplefilter("ignore")
    out = {}
    for name, kw in CONFIGS.items():
        model, opt = _build(world, args, **kw)
        gen = torch.Generator().manual_seed(7)
        for _ in range(args.steps):
            x, y = _batch(gen, rank, world, args)
            opt.zero_grad()
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
            opt.step()
        out[name] = state_bytes(opt)
        opt.detach()
    return out


def _rank_time(rank, world, args):
    """Rank 0's wall time of ``step()`` with the statistics sharded and whole, interleaved."""
    import time

    import torch.distributed as dist

    warnings.simplefilter("ignore")
    runs = {s: _build(world, args, setting="transformer", shard_statistics=s) for s in (True, False)}
    gens = {s: torch.Generator().manual_seed(7) for s in runs}
    times = {s: [] for s in runs}
    weights_equal = True
    for i in range(args.time_steps):
        for s in ((True, False) if i % 2 == 0 else (False, True)):
            model, opt = runs[s]
            x, y = _batch(gens[s], rank, world, args)
            opt.zero_grad()
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
            dist.barrier()
            t = time.perf_counter()
            opt.step()
            times[s].append(time.perf_counter() - t)
    for p, q in zip(runs[True][0].parameters(), runs[False][0].parameters()):
        weights_equal &= bool(torch.equal(p.full_tensor(), q.full_tensor()))
    skip = min(3, args.time_steps - 1)  # the first steps build the statistics and their eigenbases
    return {("sharded" if s else "whole"): sorted(v[skip:])[len(v[skip:]) // 2] for s, v in times.items()} | {
        "weights_equal": weights_equal}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--time-steps", type=int, default=0,
                   help="also time this many steps with the statistics sharded and whole (2 and 4 ranks)")
    p.add_argument("--json", default=None, help="write the table as JSON here")
    args = p.parse_args(argv)
    from dist_utils import run_distributed

    torch.set_num_threads(1)
    table = {1: [_rank_main(0, 1, args)]}
    for world in (2, 4):
        table[world] = run_distributed(_rank_main, world, args=(args,), timeout=600.0)
    rows = []
    print(f"{'config':<20} {'ranks':>5} {'sharded/rank (max)':>20} {'whole/rank':>12} {'total/rank':>12} "
          f"{'vs 1 rank':>10}")
    for name in CONFIGS:
        one = table[1][0][name]["sharded"] + table[1][0][name]["whole"]
        for world, ranks in table.items():
            sh = max(r[name]["sharded"] for r in ranks)
            wh = ranks[0][name]["whole"]
            rows.append({"config": name, "ranks": world, "sharded_max": sh, "whole": wh, "total_max": sh + wh,
                         "ratio": (sh + wh) / one})
            print(f"{name:<20} {world:>5} {sh:>20,} {wh:>12,} {sh + wh:>12,} {(sh + wh) / one:>10.3f}")
    timing = []
    if args.time_steps:
        print(f"\n{'ranks':>5} {'step, sharded (ms)':>19} {'step, whole (ms)':>17} {'ratio':>6} {'same weights':>13}")
        for world in (2, 4):
            r = run_distributed(_rank_time, world, args=(args,), timeout=1200.0)[0]
            timing.append({"ranks": world, **r, "ratio": r["sharded"] / r["whole"]})
            print(f"{world:>5} {1e3 * r['sharded']:>19.1f} {1e3 * r['whole']:>17.1f} {r['sharded'] / r['whole']:>6.3f} "
                  f"{str(r['weights_equal']):>13}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bytes": rows, "step_time": timing} if timing else rows, f, indent=1)


if __name__ == "__main__":
    main()
