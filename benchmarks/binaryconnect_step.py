"""Step cost of ``pmptrain.BinaryConnect`` against a minimal straight-through BinaryConnect (issue 21:
target ≤ 1.1×).

The reference, :class:`MinimalBinaryConnect` below, is the textbook 30-line STE BinaryConnect: one
in-place Adam on a latent per binary weight (no out-of-place copies, no per-step diagnostics, no
non-finite check), clipped to ±1, the weight rewritten to ``sign(latent)``; every other parameter
(the BatchNorm affines) takes ``torch.optim.Adam``. Both optimizers start from the same discretised
model (the all-binary BatchNorm MLP 784-1024-1024-1024-10, 2.9 M codes) with the same defaults
(latents ``0.05·W``, Adam lr 1e-3), and are timed on the same fixed batch.

Timed: the optimizer step alone (after the same forward/backward), and the whole iteration
(zero_grad, forward, backward, step); medians over ``--repeats`` after ``--warmup``, the two
optimizers interleaved round-robin so that load from other processes falls on both alike. Run
with one thread (``--threads 1``) on a quiet machine; on a shared machine say so next to the numbers.

    python benchmarks/binaryconnect_step.py [--threads 1] [--batch 128] [--repeats 40]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

import pmptrain
from pmptrain.bench.models import build_model


class MinimalBinaryConnect:
    """STE BinaryConnect, minimal: in-place latent Adam, clip ±1, ``W ← sign(w̃)`` (sign(0) = +1)."""

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, latent_scale=0.05, clip=1.0):
        binary = {id(d.param) for d in pmptrain.discrete_parameters(model)}
        self.ws = [p for p in model.parameters() if id(p) in binary]
        self.lat = [(latent_scale * p.detach()).clamp_(-clip, clip) for p in self.ws]
        self.m = [torch.zeros_like(p) for p in self.ws]
        self.v = [torch.zeros_like(p) for p in self.ws]
        self.lr, self.betas, self.eps, self.clip, self.t = lr, betas, eps, clip, 0
        rest = [p for p in model.parameters() if id(p) not in binary and p.requires_grad]
        self.rest = torch.optim.Adam(rest, lr=lr, betas=betas, eps=eps)
        with torch.no_grad():
            for w, z in zip(self.ws, self.lat):
                w.copy_(torch.where(z >= 0, 1.0, -1.0))

    def zero_grad(self):
        for w in self.ws:
            w.grad = None
        self.rest.zero_grad()

    @torch.no_grad()
    def step(self):
        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for w, z, m, v in zip(self.ws, self.lat, self.m, self.v):
            g = w.grad
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            z.addcdiv_(m, v.sqrt().div_(math.sqrt(bc2)).add_(self.eps), value=-self.lr / bc1)
            z.clamp_(-self.clip, self.clip)
            w.copy_(torch.where(z >= 0, 1.0, -1.0))
        self.rest.step()


def make(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("mlp", (1, 28, 28), 10, widths=(1024, 1024, 1024), batchnorm=True, bias=False)
    pmptrain.discretize_(model, "binary", keep=None)
    opt = pmptrain.BinaryConnect(model) if kind == "pmptrain" else MinimalBinaryConnect(model)
    return model, opt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=40)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    kinds = ("minimal", "pmptrain")
    runs = {k: make(k) for k in kinds}
    codes = sum(d.param.numel() for d in pmptrain.discrete_parameters(runs["pmptrain"][0]))
    step_t = {k: [] for k in kinds}
    iter_t = {k: [] for k in kinds}
    for i in range(args.warmup + args.repeats):
        for k in kinds:  # interleaved round-robin
            model, opt = runs[k]
            t0 = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if i >= args.warmup:
                step_t[k].append(t2 - t1)
                iter_t[k].append(t2 - t0)
    print(f"all-binary BN MLP 784-1024x3-10 ({codes / 1e6:.1f} M codes), batch {args.batch}, "
          f"{args.threads} thread(s), median of {args.repeats} (interleaved)")
    print(f"{'':<10} {'step ms':>9} {'iteration ms':>13}")
    for k in kinds:
        print(f"{k:<10} {1e3 * statistics.median(step_t[k]):9.2f} {1e3 * statistics.median(iter_t[k]):13.2f}")
    rs = statistics.median(step_t["pmptrain"]) / statistics.median(step_t["minimal"])
    ri = statistics.median(iter_t["pmptrain"]) / statistics.median(iter_t["minimal"])
    print(f"ratio pmptrain / minimal: step {rs:.2f}x, iteration {ri:.2f}x (target <= 1.1x)")
    return rs, ri


if __name__ == "__main__":
    main()
