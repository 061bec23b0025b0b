"""Where YOPO's time goes: a full forward/backward pass against the first-layer-only work of its
inner steps (one first-layer forward + input-VJP), and the elementwise sign/projection steps, on the
bench's small CNN at Fashion-MNIST (1×28×28) and MNIST-1D (1×40) shapes, batch 128.

Interleaved repetitions, medians; ratios are within one process on the same (possibly loaded) CPU.

    PYTHONPATH=$PWD python3 benchmarks/robust_yopo_time.py [--reps 30] [--threads 1]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from pmptrain.robust.attacks import ascent_direction, clip_box, project
from pmptrain.robust.bench import small_cnn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    for shape in ((1, 28, 28), (1, 40)):
        torch.manual_seed(0)
        model = small_cnn(shape, 10)
        first = model[0]
        x = torch.rand(a.batch, *shape)
        y = torch.randint(0, 10, (a.batch,))
        eta = torch.zeros_like(x)
        g = torch.randn_like(first(x))
        t = {"full": [], "full_xgrad": [], "first": [], "elementwise": []}
        for _ in range(a.reps):
            t0 = time.perf_counter()
            F.cross_entropy(model(x + eta), y).backward()
            t1 = time.perf_counter()
            xr = (x + eta).requires_grad_(True)
            F.cross_entropy(model(xr), y).backward()
            t1b = time.perf_counter()
            t["full_xgrad"].append(t1b - t1)
            t1 = time.perf_counter()
            e = eta.clone().requires_grad_(True)
            (d,) = torch.autograd.grad(first.forward(x + e), e, grad_outputs=g)
            t2 = time.perf_counter()
            for _ in range(3):
                eta = clip_box(x, project(eta + 0.02 * ascent_direction(d, "linf"), 0.1, "linf"), (0.0, 1.0))
            t3 = time.perf_counter()
            t["full"].append(t1 - t0)
            t["first"].append(t2 - t1)
            t["elementwise"].append(t3 - t2)
        med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
        full = med["full"]
        separate = 5 * full + 5 * med["first"] + 5 * med["elementwise"]
        inside = 5 * med["full_xgrad"] + 5 * med["elementwise"]
        print(f"input {shape}: full fwd+bwd {full:.2f} ms; with the input gradient {med['full_xgrad']:.2f} ms "
              f"(+{(med['full_xgrad'] - full) / full:.2f}x); a separate first-layer fwd+VJP {med['first']:.2f} ms "
              f"({med['first'] / full:.2f}x full); 3 sign/projection steps {med['elementwise']:.3f} ms")
        print(f"  YOPO-5-3 per batch: separate VJP ≈ {separate:.1f} ms = {separate / (11 * full):.2f}x PGD-10 AT's "
              f"11 passes; input-VJP inside the backward (pmptrain) ≈ {inside:.1f} ms = {inside / (11 * full):.2f}x")


if __name__ == "__main__":
    main()
