"""How the cost of an E-MSA step grows with the layer width, the batch and the sequence length.

Three sweeps, each point measured like ``benchmarks/step_time.py`` (the same iteration, a pool of 8
batches, the optimizers interleaved in rounds, medians, ratios to the reference optimizer of the same
run):

* ``width``: the MLP 784-w-w-10 at batch 128, w = 256 … 4096, E-MSA / SGD;
* ``batch``: the MLP 784-256-256-10, batch 32 … 1024, E-MSA / SGD;
* ``seq``: the nanoGPT-style bench model (2 layers × 128, tied, clipping 1.0) at batch 16 and
  sequence length 64 … 1024, E-MSA (``emsa-costate``) / AdamW, 1 thread.

It prints one table per sweep, writes ``--json`` and plots the ratios (``--plot``, default
``docs/img/step_scaling.png``).

    python benchmarks/step_scaling.py                        # all three sweeps (~10 min on 2 cores)
    python benchmarks/step_scaling.py --sweeps width --rounds 3
    python benchmarks/step_scaling.py --device cuda --plot docs/img/step_scaling_cuda.png
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_time as st  # noqa: E402  (the timing loop and the models of step_time.py)

from pmptrain.bench.models import build_model  # noqa: E402

SWEEPS = {
    "width": [256, 512, 1024, 2048, 4096],
    "batch": [32, 64, 128, 256, 512, 1024],
    "seq": [64, 128, 256, 512, 1024],
}


def _mlp(width):
    def build():
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, width), torch.nn.ReLU(),
                                   torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 10))
    return build


def point_spec(sweep: str, value: int, threads: int):
    """``(name, ModelSpec, batch, optimizers)`` of one point (registered in ``step_time.MODELS``)."""
    if sweep == "width":
        spec = st.ModelSpec(_mlp(value), st._images((1, 28, 28)), 128, threads, "sgd", ("sgd", "emsa"))
        batch = 128
    elif sweep == "batch":
        spec = st.ModelSpec(_mlp(256), st._images((1, 28, 28)), value, threads, "sgd", ("sgd", "emsa"))
        batch = value
    else:
        spec = st.ModelSpec(lambda: build_model("gpt", (value,), 256),
                            lambda b, g: st._tokens(b, g, t=value), 16, 1, "adamw", ("adamw", "emsa-costate"),
                            lm=True)
        batch = 16
    name = f"{sweep}-{value}"
    st.MODELS[name] = spec
    return name, spec, batch, list(spec.optimizers)


def run(sweeps, rounds, steps, warmup, threads, device=torch.device("cpu")):
    out = {}
    for sweep in sweeps:
        rows = []
        for value in SWEEPS[sweep]:
            name, spec, batch, names = point_spec(sweep, value, threads)
            torch.set_num_threads(spec.threads)
            # fewer timed steps where a step takes seconds
            n = steps if not (sweep == "seq" and value >= 512) else max(2, steps // 3)
            res = st.measure(name, names, batch, rounds, n, warmup, device)
            ref, other = names
            rows.append({"value": value, "ref_ms": res[ref]["median_ms"], "ms": res[other]["median_ms"],
                         "ratio": res[other]["ratio"], "threads": spec.threads, "ref": ref, "optimizer": other})
            print(f"{sweep} {value}: {other} {res[other]['median_ms']:.2f} ms, {ref} {res[ref]['median_ms']:.2f} ms, "
                  f"ratio {res[other]['ratio']:.2f}x", flush=True)
        out[sweep] = rows
    return out


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"width": "MLP width w (784-w-w-10, batch 128)", "batch": "MLP batch (784-256-256-10)",
              "seq": "GPT sequence length (batch 16)"}
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.4), squeeze=False)
    for ax, (sweep, rows) in zip(axes[0], results.items()):
        xs = [r["value"] for r in rows]
        ax.plot(xs, [r["ratio"] for r in rows], "o-")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel(labels[sweep])
        ax.set_ylabel(f"{rows[0]['optimizer']} / {rows[0]['ref']} step time")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweeps", default="width,batch,seq", help="comma list of: " + ",".join(SWEEPS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per optimizer per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="threads of the MLP sweeps (the GPT uses 1)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:k]")
    ap.add_argument("--clock", choices=sorted(st.CLOCKS), default="wall",
                    help="as step_time.py: wall (default) or cpu (process CPU time; CPU only)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", default="docs/img/step_scaling.png", help="the figure ('' for none)")
    args = ap.parse_args(argv)
    sweeps = args.sweeps.split(",")
    for s in sweeps:
        if s not in SWEEPS:
            ap.error(f"unknown sweep {s!r}; choose from {sorted(SWEEPS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if device.type == "cuda" and args.clock == "cpu":
        ap.error("--clock cpu measures host CPU time: use --clock wall with --device cuda")
    st._clock = st.CLOCKS[args.clock]
    results = run(sweeps, args.rounds, args.steps, args.warmup, args.threads, device)
    for sweep, rows in results.items():
        print(f"\n{sweep}: {rows[0]['optimizer']} / {rows[0]['ref']}")
        print(f"| {sweep} | {rows[0]['ref']} (ms) | {rows[0]['optimizer']} (ms) | ratio |")
        print("|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['value']} | {r['ref_ms']:.2f} | {r['ms']:.2f} | {r['ratio']:.2f}× |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.plot:
        plot(results, args.plot)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
