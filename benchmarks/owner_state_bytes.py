"""Per-rank bytes of the module units' kept statistics, replicated vs owner-only (a projection).

Under DDP, and under FSDP2 with ``shard_statistics=False``, every rank keeps the whole state record of
every closed-form unit — the running covariances ``C_x, C_p`` and their eigenbases of
``stat_decay``/``stat_every`` (docs/api.md, "Distributed training"): the same bytes per rank at any
number of ranks (FSDP2's default splits them by rows instead: 1/world per rank,
``benchmarks/fsdp_state_bytes.py``). If each unit's record
lived only on its solve owner (:func:`pmptrain.optim.solve_shard.assign_owners`, the assignment by
solve cost that solve sharding uses), a rank would keep only its units' records. This script counts
both for the GPT bench model (as ``benchmarks/fsdp_state_bytes.py``: 2 blocks × 128, vocabulary 256,
batch 8 × 32 tokens) after ``--steps`` steps in one process: the bytes of every unit's record except
its parameter-shaped fields (``grad_avg``: sharded under FSDP2 already), and the owners the shell
would assign on ``world`` ranks from the same union row counts. Bytes are counted, not timed: the
numbers do not depend on the machine's load. Owner-only storage is not built: this measures what it
would save, the comparison docs/api.md makes with the row shards.

    python benchmarks/owner_state_bytes.py     # a few seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import warnings

import torch
import torch.nn.functional as F


def _bytes(v, seen) -> int:
    if isinstance(v, torch.Tensor):
        if id(v) in seen:
            return 0
        seen.add(id(v))
        return v.numel() * v.element_size()
    if isinstance(v, dict):
        return sum(_bytes(x, seen) for x in v.values())
    if isinstance(v, (list, tuple)):
        return sum(_bytes(x, seen) for x in v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return sum(_bytes(getattr(v, f.name), seen) for f in dataclasses.fields(v))
    return 0


def _replicated_bytes(state) -> int:
    """Bytes of a unit's record outside its parameter-shaped fields (those FSDP2 shards)."""
    if state is None or not dataclasses.is_dataclass(state):
        return _bytes(state, set())
    skip = set(getattr(type(state), "_param_shaped", ()))
    seen: set = set()
    return sum(_bytes(getattr(state, f.name), seen) for f in dataclasses.fields(state) if f.name not in skip)


def measure(config: dict, steps: int, batch: int, seq: int, worlds) -> dict:
    import pmptrain
    from pmptrain.bench.models import build_model
    from pmptrain.optim.solve_shard import assign_owners

    torch.manual_seed(0)
    model = build_model("gpt", (seq,), 256)
    opt = pmptrain.EMSA(model, **config)
    gen = torch.Generator().manual_seed(7)
    sizes = None
    for _ in range(steps):
        x = torch.randint(0, 256, (batch, seq), generator=gen)
        y = torch.randint(0, 256, (batch, seq), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        sizes = {k: (e.stats.samples, e.stats.rows) for k, e in opt.capture._entries.items()}
        opt.step()
    units = [u for u in opt.units.values() if u.rule.module_rule]
    per_unit = {u.name: _replicated_bytes(u.state) for u in units}
    total = sum(per_unit.values())
    out = {"replicated": total, "units": len(units), "largest_unit": max(per_unit.values()), "owner_only": {}}
    for world in worlds:
        owners = assign_owners(units, world, sizes)
        load = [0] * world
        for name, r in owners.items():
            load[r] += per_unit[name]
        out["owner_only"][world] = {"max": max(load), "min": min(load), "ratio": max(load) / total}
    opt.detach()
    return out


CONFIGS = {
    "emsa-stat_decay": dict(rho=1.0, stat_decay=0.95),
    "emsa-transformer": dict(setting="transformer"),  # EMSA(model)'s default on a GPT
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--worlds", default="2,4,8")
    p.add_argument("--json", default=None, help="write the table as JSON here")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    worlds = [int(w) for w in args.worlds.split(",")]
    table = {name: measure(kw, args.steps, args.batch, args.seq, worlds) for name, kw in CONFIGS.items()}
    print(f"{'config':<18} {'replicated/rank':>16} " + " ".join(f"{'owner-only ' + str(w):>16}" for w in worlds))
    for name, row in table.items():
        cells = " ".join(f"{row['owner_only'][w]['max']:>10,} ({row['owner_only'][w]['ratio']:.2f})" for w in worlds)
        print(f"{name:<18} {row['replicated']:>16,} {cells}   largest unit {row['largest_unit']:,} of {row['units']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
