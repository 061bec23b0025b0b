"""Cost of recording nn.MultiheadAttention's projections (pmptrain/attention.py) against recording
the same projections as four explicit nn.Linear modules (plain module hooks): forward + backward
time of a TransformerEncoderLayer with an EMSA optimizer attached, interleaved, medians.

    PYTHONPATH=$PWD python3 benchmarks/mha_capture_overhead.py
"""

import copy
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import pmptrain  # noqa: E402
from test_any_model import ExplicitMHA  # noqa: E402


def main(d=256, heads=4, batch=16, seq=64, reps=15):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
    twin = copy.deepcopy(layer)
    twin.self_attn = ExplicitMHA(layer.self_attn)
    plain = copy.deepcopy(layer)
    x = torch.randn(batch, seq, d)
    opts = {"tapped MHA": (layer, pmptrain.EMSA(layer)), "explicit Linears": (twin, pmptrain.EMSA(twin)),
            "no optimizer": (plain, None)}
    times = {k: [] for k in opts}
    for _ in range(reps):
        for k, (m, o) in opts.items():
            if o is not None:
                o.zero_grad()
            else:
                m.zero_grad()
            t0 = time.perf_counter()
            m(x).pow(2).mean().backward()
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["no optimizer"])
    for k, v in times.items():
        print(f"{k:18s} forward+backward {1e3 * statistics.median(v):8.2f} ms  ({statistics.median(v) / base:.2f}x no optimizer)")


if __name__ == "__main__":
    main()
