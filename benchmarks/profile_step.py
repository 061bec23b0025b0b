"""Where the time of a training step goes, per phase, with ``torch.profiler``.

pmptrain marks its work with ``record_function`` scopes named ``pmptrain::<phase>`` (only while a
profiler records; ``pmptrain/_profile.py``), and this script marks the parts of the iteration
(``iter::zero_grad``, ``iter::forward``, ``iter::backward``, ``iter::clip``, ``iter::step``). Each
phase's time is *exclusive*: its scope's CPU time minus the scopes nested in it, so the rows add up
to the iteration. Below the phases, load-independent counts per iteration: outermost ``aten::`` operations (kernel
launches on a GPU) and GFLOP as ``torch.profiler`` counts them (matrix products, convolutions), for
the whole iteration and for ``opt.step()`` alone. Phases:

* ``forward``, ``backward`` — the model's own work (``backward`` without the capture hooks);
* ``pmptrain::capture`` — the statistics formed in the backward hooks (``XᵀX``, ``P̂ᵀP̂``, rows kept);
* ``pmptrain::statistics`` — gathering them into each unit's operators at ``step()`` (and running
  averages);
* ``pmptrain::factorise`` — eigendecompositions and Cholesky factorisations;
* ``pmptrain::solve`` — the rest of the closed-form solves (products with the factors);
* ``pmptrain::discrete`` — the fused discrete rule; ``pmptrain::propose`` — each rule's remaining
  work (fallback steps, bookkeeping, Python);
* ``pmptrain::check`` — the finiteness check / Hamiltonian gain; ``pmptrain::apply`` — writing the
  updates; ``pmptrain::reset`` — dropping the statistics;
* ``pmptrain::step`` — what is left of ``step()`` (the shell's Python: group checks, contexts);
* ``iter::step`` — what is left of the iteration's ``opt.step()`` call (a baseline's whole step).

    python benchmarks/profile_step.py --models mlp,gpt --optimizers emsa,emsa-costate --steps 10
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import MODELS, resolve_names, setup  # noqa: E402

ORDER = ["iter::zero_grad", "iter::forward", "iter::backward", "pmptrain::capture", "iter::clip",
         "iter::step", "pmptrain::step", "pmptrain::propose", "pmptrain::statistics", "pmptrain::factorise",
         "pmptrain::solve", "pmptrain::discrete", "pmptrain::check", "pmptrain::apply", "pmptrain::reset"]


def labelled_iteration(spec, model, opt, batches):
    x, y = batches.next()
    with record_function("iter::zero_grad"):
        opt.zero_grad(set_to_none=True)
    with record_function("iter::forward"):
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    with record_function("iter::backward"):
        loss.backward()
    if spec.lm:
        with record_function("iter::clip"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    with record_function("iter::step"):
        opt.step()


def _labelled(ev) -> bool:
    return ev.name.startswith("pmptrain::") or ev.name.startswith("iter::")


def _nested_labelled_time(ev) -> float:
    total = 0.0
    stack = list(ev.cpu_children)
    while stack:
        c = stack.pop()
        if _labelled(c):
            total += c.cpu_time_total
        else:
            stack.extend(c.cpu_children)
    return total


def phase_times(prof, steps: int) -> dict:
    """Exclusive ms per step of every labelled phase."""
    out = collections.defaultdict(float)
    for ev in prof.events():
        if _labelled(ev):
            out[ev.name] += (ev.cpu_time_total - _nested_labelled_time(ev)) / 1e3 / steps
    return dict(out)


def iteration_ms(prof, steps: int) -> float:
    """Inclusive ms per step of the iteration's own scopes (``iter::*``, which do not nest): what the
    exclusive phases add up to."""
    return sum(ev.cpu_time_total for ev in prof.events() if ev.name.startswith("iter::")) / 1e3 / steps


def _outermost_aten(ev) -> bool:
    if not ev.name.startswith("aten::"):
        return False
    p = ev.cpu_parent
    while p is not None:
        if p.name.startswith("aten::"):
            return False
        p = p.cpu_parent
    return True


def op_counts(prof, steps: int) -> dict:
    """Load-independent counts per step: ``ops`` (outermost ``aten::`` calls — the kernel launches
    of a GPU, the dispatches of a CPU), ``gflop`` (what ``torch.profiler`` counts: matrix products
    and convolutions), and the same two for ``opt.step()`` alone (``step_ops``, ``step_gflop``)."""
    out = collections.Counter()
    for ev in prof.events():
        if not ev.name.startswith("aten::"):
            continue
        outermost = _outermost_aten(ev)
        if not outermost and not ev.flops:
            continue
        in_step = False
        p = ev.cpu_parent
        while p is not None:
            if p.name == "iter::step":
                in_step = True
                break
            p = p.cpu_parent
        fl = (ev.flops or 0) / 1e9 / steps  # on the kernel itself (aten::mm), not on wrappers (aten::matmul)
        out["gflop"] += fl
        if in_step:
            out["step_gflop"] += fl
        if outermost:
            out["ops"] += 1 / steps
            if in_step:
                out["step_ops"] += 1 / steps
    return dict(out)


def run_profiled(model_name, opt_name, batch, steps, warmup, device):
    """The profiler of ``steps`` labelled iterations (after ``warmup`` unprofiled ones)."""
    spec, model, opt, batches = setup(model_name, opt_name, batch, device)
    for _ in range(warmup):
        labelled_iteration(spec, model, opt, batches)
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for _ in range(steps):
            labelled_iteration(spec, model, opt, batches)
    return prof


def profile_one(model_name, opt_name, batch, steps, warmup, device):
    prof = run_profiled(model_name, opt_name, batch, steps, warmup, device)
    return {**phase_times(prof, steps), **{"count::" + k: v for k, v in op_counts(prof, steps).items()}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--optimizers", default=None, help="default: each model's list")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    results = {}
    for model_name in args.models.split(","):
        spec, names = resolve_names(ap, model_name, args.optimizers)
        torch.set_num_threads(args.threads or spec.threads)
        res = {n: profile_one(model_name, n, spec.default_batch, args.steps, args.warmup, device) for n in names}
        results[model_name] = res
        phases = [p for p in ORDER if any(p in r for r in res.values())]
        print(f"\n{model_name}, batch {spec.default_batch}, {args.threads or spec.threads} thread(s): exclusive ms "
              "per step (profiler on: absolute times are inflated, compare the rows)")
        print("| phase | " + " | ".join(res) + " |")
        print("|---|" + "---:|" * len(res))
        for p in phases:
            print(f"| {p} | " + " | ".join(f"{r.get(p, 0.0):.2f}" for r in res.values()) + " |")
        print("| **total** | " + " | ".join(f"{sum(v for k, v in r.items() if not k.startswith('count::')):.2f}"
                                           for r in res.values()) + " |")
        for key, label in (("ops", "aten ops / iteration"), ("step_ops", "aten ops in step()"),
                           ("gflop", "GFLOP / iteration"), ("step_gflop", "GFLOP in step()")):
            print(f"| {label} | " + " | ".join(f"{r.get('count::' + key, 0.0):.{0 if 'ops' in key else 3}f}"
                                              for r in res.values()) + " |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
