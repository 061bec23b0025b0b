"""Predicted first-order gain over the loss, step by step, from a ``pmptrain bench`` directory.

Every PMP step logs ``pmp/hamiltonian_gain`` (``G = −Σ⟨∇J, Δθ⟩``, the first-order decrease of the
loss the step predicts) and ``train/loss`` (``J`` of its batch) to TensorBoard. ``G/J`` says how
aggressive the steps are: ``G/J > 1`` predicts more than the whole loss, which a first-order model
cannot deliver (the predicted-gain guard ``max_gain = κ`` shortens such steps to ``G = κJ``, but only
when the optimizer sees the loss: ``step(closure)``, or a model returning its loss). Prints, per
optimizer and seed: the number of steps, the median, 90th percentile and largest ``G/J``, and how
many steps predicted more than the loss.

    python benchmarks/gain_ratio.py OUT_DIR      # OUT_DIR: a bench's --out (with TensorBoard logs)
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path


def ratios(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    ea.Reload()
    tags = ea.Tags().get("scalars", [])
    if "pmp/hamiltonian_gain" not in tags or "train/loss" not in tags:
        return []
    loss = {e.step: e.value for e in ea.Scalars("train/loss")}
    return [e.value / loss[e.step] for e in ea.Scalars("pmp/hamiltonian_gain") if loss.get(e.step, 0) > 0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path, help="a pmptrain bench --out directory with tensorboard/ logs")
    args = p.parse_args(argv)
    runs = sorted(d for d in (args.out_dir / "tensorboard").glob("**/seed*") if d.is_dir())
    print(f"{'run':<40} {'steps':>6} {'median G/J':>11} {'p90':>6} {'max':>6} {'G>J':>5}")
    for d in runs:
        r = sorted(ratios(d))
        if not r:
            continue
        name = str(d.relative_to(args.out_dir / "tensorboard"))
        print(f"{name:<40} {len(r):>6} {statistics.median(r):>11.2f} {r[int(0.9 * (len(r) - 1))]:>6.2f} "
              f"{r[-1]:>6.2f} {sum(1 for x in r if x > 1):>5}")


if __name__ == "__main__":
    main()
