"""Cost of the unrolled recurrence (pmptrain.views) against torch's fused kernel.

    PYTHONPATH=. python3 benchmarks/recurrent_speed.py [--repeats 7]

For nn.LSTM / nn.GRU / nn.RNN (2 layers, batch 32, hidden 128, sequence 64, float32, CPU): the median
time of one training forward + backward with the fused kernel alone (no optimizer), and with an
EMSA optimizer attached (the views' unrolled forward, whose per-step calls the capture records),
and of the optimizer's ``step()``. Interleaved repeats, medians; the ratio is the cost of the
unrolled path. Numbers depend on the machine and its load: say so where they are recorded.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import pmptrain


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, hidden {args.hidden}, "
          f"seq {args.seq}, 2 layers")
    print("| module | fused fwd+bwd (ms) | unrolled fwd+bwd with EMSA (ms) | ratio | EMSA step (ms) |")
    print("|---|---|---|---|---|")
    for cls in (nn.LSTM, nn.GRU, nn.RNN):
        torch.manual_seed(0)
        plain = cls(args.hidden, args.hidden, 2, batch_first=True)
        hooked = cls(args.hidden, args.hidden, 2, batch_first=True)
        hooked.load_state_dict(plain.state_dict())
        opt = pmptrain.EMSA(hooked)
        x = torch.randn(args.batch, args.seq, args.hidden)

        def fused():
            plain.zero_grad()
            plain(x)[0].pow(2).mean().backward()

        def unrolled():
            opt.zero_grad()
            hooked(x)[0].pow(2).mean().backward()

        fused()
        unrolled()
        opt.step()
        a, b, s = [], [], []
        for _ in range(args.repeats):
            a.append(_time(fused))
            b.append(_time(unrolled))
            s.append(_time(opt.step))
        fa, fb, fs = (1e3 * statistics.median(v) for v in (a, b, s))
        print(f"| {cls.__name__} | {fa:.1f} | {fb:.1f} | {fb / fa:.2f} | {fs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
