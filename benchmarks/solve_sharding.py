"""Per-rank solve cost of E-MSA with and without solve sharding (issue 20, item 2).

``--world`` gloo ranks on CPU (spawned here, one thread each) train the GPT bench model
(``pmptrain.bench.models.build_model("gpt", ...)``: 2 layers × 128, tied embedding, vocabulary 256)
under DDP with ``EMSA(rho=1)``, each rank on its own ``--batch`` sequences of ``--seq`` tokens.
Two runs in the same processes, interleaved over ``--rounds`` rounds: ``shard_solves=True`` (each
unit solved by its owner rank) and ``shard_solves=False`` (every rank solves every unit).

What is measured, per rank and step: the **solve-phase CPU time** — ``time.thread_time()`` from the
moment a rule's ``ctx.solves(unit)`` returns True (its statistics' collectives are done) to the moment
its ``propose`` returns, summed over the units that rank solves (``torch.set_num_threads(1)``, so
the solve runs on the calling thread and CPU time is insensitive to the other processes sharing the
cores) — and the estimated solve flops of :func:`pmptrain.optim.solve_shard.solve_cost` of the units
the rank solves. The ratio reported is the slowest rank's sharded solve time over the mean per-rank
unsharded solve time (medians over the measured steps). Also printed: the wall time of the exchange
(``phase("exchange")`` is not separately timed here: the per-step wall times of both runs are).

    python benchmarks/solve_sharding.py --world 4            # ~1-2 min on 2 loaded cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def _rank_main(rank, world, args):
    import pmptrain
    from pmptrain.bench.models import build_model
    from pmptrain.optim import affine, blocks, iterative
    from pmptrain.optim.rule import StepContext
    from pmptrain.optim.solve_shard import solve_cost

    clock = {"t0": None, "solve": 0.0, "flops": 0.0}
    orig_solves = StepContext.solves

    def solves(ctx, unit):
        mine = orig_solves(ctx, unit)
        if mine:
            clock["t0"] = time.thread_time()
            clock["flops"] += solve_cost(unit, ctx.sizes)
        return mine
    StepContext.solves = solves
    for cls in (affine.AffineEMSARule, blocks.ChannelEMSARule, blocks.GroupedEMSARule, iterative.IterativeEMSARule):
        def wrap(fn):
            def propose(self, unit, ctx):
                try:
                    return fn(self, unit, ctx)
                finally:
                    if clock["t0"] is not None:
                        clock["solve"] += time.thread_time() - clock["t0"]
                        clock["t0"] = None
            return propose
        cls.propose = wrap(cls.propose)

    def make(shard):
        torch.manual_seed(0)
        model = build_model("gpt", (args.seq,), 256)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        return ddp, pmptrain.EMSA(ddp, rho=1.0, shard_solves=shard)

    runs = {"sharded": make(True), "unsharded": make(False)}
    gen = torch.Generator().manual_seed(100 + rank)
    out = {k: {"solve": [], "flops": [], "wall": []} for k in runs}
    for r in range(args.warmup + args.rounds):
        x = torch.randint(0, 256, (args.batch, args.seq), generator=gen)
        y = torch.randint(0, 256, (args.batch, args.seq), generator=gen)
        for name, (model, opt) in runs.items():
            opt.zero_grad()
            logits = model(x)
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
            clock["solve"], clock["flops"] = 0.0, 0.0
            dist.barrier()
            t = time.perf_counter()
            opt.step()
            wall = time.perf_counter() - t
            if r >= args.warmup:
                out[name]["solve"].append(clock["solve"])
                out[name]["flops"].append(clock["flops"])
                out[name]["wall"].append(wall)
    same = all(torch.equal(a, b) for a, b in zip(runs["sharded"][0].parameters(), runs["unsharded"][0].parameters()))
    out["identical"] = same
    return out


def _worker(rank, world, port, args, path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        res = _rank_main(rank, world, args)
        torch.save(res, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4, help="sequences per rank")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import tempfile

    import torch.multiprocessing as mp
    from dist_utils import free_port

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "res")
        mp.start_processes(_worker, args=(args.world, free_port(), args, path), nprocs=args.world,
                           start_method="spawn", join=True)
        res = [torch.load(f"{path}.{r}", weights_only=False) for r in range(args.world)]
    med = statistics.median
    summary = {"world": args.world, "batch_per_rank": args.batch, "seq": args.seq, "rounds": args.rounds,
               "identical_weights": all(r["identical"] for r in res)}
    for name in ("sharded", "unsharded"):
        summary[name] = {
            "solve_cpu_s_per_rank": [med(r[name]["solve"]) for r in res],
            "solve_flops_per_rank": [med(r[name]["flops"]) for r in res],
            "step_wall_s_per_rank": [med(r[name]["wall"]) for r in res],
        }
    sh, un = summary["sharded"], summary["unsharded"]
    summary["solve_cpu_ratio"] = max(sh["solve_cpu_s_per_rank"]) / statistics.mean(un["solve_cpu_s_per_rank"])
    summary["solve_flops_ratio"] = max(sh["solve_flops_per_rank"]) / statistics.mean(un["solve_flops_per_rank"])
    print(f"GPT bench model, {args.world} gloo ranks, {args.batch}x{args.seq} tokens per rank, "
          f"medians of {args.rounds} steps (1 thread per rank)")
    for name in ("unsharded", "sharded"):
        s = summary[name]
        print(f"  {name:9s} solve CPU s/rank: " + " ".join(f"{t:.4f}" for t in s["solve_cpu_s_per_rank"])
              + "   est. GFLOP/rank: " + " ".join(f"{f / 1e9:.3f}" for f in s["solve_flops_per_rank"])
              + "   step wall s/rank: " + " ".join(f"{t:.3f}" for t in s["step_wall_s_per_rank"]))
    print(f"  slowest sharded rank / unsharded rank: solve CPU {summary['solve_cpu_ratio']:.3f}, "
          f"estimated flops {summary['solve_flops_ratio']:.3f}; identical weights: {summary['identical_weights']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
