"""EMSA under torch.distributed (issue 2, item 5): 2 gloo ranks on CPU.

Every rank takes half of a fixed global batch (its loss is the mean over its own half). After
``K_STEPS`` steps every rank must hold bit-identical parameters, equal to a single process running
EMSA on the union batch (its loss the mean over the whole batch):

* float64: ``rtol = atol = 1e-10`` (only summation order differs: all-reduced sums of halves vs one
  sum over the batch, gathered rows vs one matrix; observed differences ~1e-15);
* float32: ``rtol = 1e-5``, ``atol = 1e-6``.

Both wrappings are covered: (a) ``DistributedDataParallel`` (the wrapper averages the gradients),
(b) the bare model with an explicit ``process_group`` (EMSA averages the gradients itself).

BatchNorm: under DDP each rank normalises with the statistics of its own half (no SyncBatchNorm), so
the single-process reference applies the same BatchNorm to each half separately ("ghost" batch norm,
``ghost=2``); the controlled Linear/Conv2d modules still see the whole batch in one call. The BN
is excluded (Adam fallback, on the rank-averaged gradient): in the reference its two ghost calls
would count as one batch of shared-module calls. The LayerNorm (per-row statistics) and the grouped
convolution take their closed forms and must match the union batch like the Linear layers.

All distributed runs happen in ONE spawn (module fixture) to keep the file fast; the single-process
references run in the test process.
"""

from __future__ import annotations

import warnings
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import pmptrain
from dist_utils import run_distributed

pytestmark = pytest.mark.distributed


WORLD = 2
K_STEPS = 3


# ------------------------------------------------------------------------------------------ models
class MLP(nn.Module):
    """Linear(bias) → BatchNorm1d → ReLU → Linear → LayerNorm → Tanh → Linear. ``ghost`` = number of
    chunks the batch norm normalises separately (the reference reproduces per-rank BN statistics;
    BN takes the fallback here, since the ghost calls of one module would count as one batch)."""

    def __init__(self, ghost: int = 1):
        super().__init__()
        self.ghost = ghost
        self.fc1 = nn.Linear(6, 10)
        self.bn = nn.BatchNorm1d(10)
        self.fc2 = nn.Linear(10, 12)
        self.ln = nn.LayerNorm(12)
        self.fc3 = nn.Linear(12, 3)

    def forward(self, x):
        h = self.fc1(x)
        h = torch.cat([self.bn(c) for c in h.chunk(self.ghost)]) if self.ghost > 1 else self.bn(h)
        return self.fc3(torch.tanh(self.ln(self.fc2(torch.relu(h)))))


class ConvNet(nn.Module):
    def __init__(self, ghost: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, groups=2)  # a grouped convolution
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        return self.fc(h.flatten(1))


MODELS = {"mlp": (MLP, (6,), 16), "conv": (ConvNet, (2, 6, 6), 8)}  # class, input shape, global B


def make_data(kind: str, dtype: torch.dtype):
    _, shape, batch = MODELS[kind]
    g = torch.Generator().manual_seed(1234)
    xs = [torch.randn((batch,) + shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(K_STEPS)]
    ys = [torch.randint(0, 3, (batch,), generator=g) for _ in range(K_STEPS)]
    return xs, ys


# ------------------------------------------------------------------------------------------ cases
BASE = dict(lr=0.5, rho=1.0, fallback_lr=1e-2)
OPTIONS = {
    "primal": dict(route="primal"),
    "gram": dict(route="gram"),
    "isotropic": dict(costate="isotropic"),
    "decay": dict(route="primal", stat_decay=0.5, eig_refresh=2),
    "iterative": dict(solver="iterative", inner_steps=3, inner_lr=0.05),
}

CASES: Dict[str, dict] = {}
for _kind in MODELS:
    for _wrap in ("ddp", "pg"):
        for _opt in OPTIONS:
            CASES[f"{_kind}-{_wrap}-{_opt}-f64"] = dict(kind=_kind, wrap=_wrap, opt=_opt, dtype=torch.float64)
for _wrap, _opt in (("ddp", "primal"), ("pg", "gram"), ("pg", "isotropic")):
    CASES[f"mlp-{_wrap}-{_opt}-f32"] = dict(kind="mlp", wrap=_wrap, opt=_opt, dtype=torch.float32)


def _optimizer_kwargs(case) -> dict:
    kw = {**BASE, **OPTIONS[case["opt"]]}
    if case["kind"] == "mlp":
        kw["exclude"] = ("bn",)
    return kw


def train(case: dict, rank: int, world: int, group=None, halves: int = None) -> dict:
    """K_STEPS of EMSA. ``world > 1``: this rank's half of each batch, wrapped as the case says.
    ``world == 1``: the reference on the whole batch with ghost batch norm over ``halves`` chunks."""
    cls, _, batch = MODELS[case["kind"]]
    dtype = case["dtype"]
    torch.manual_seed(0)
    model = cls(ghost=halves or 1).to(dtype)
    init = [p.detach().clone() for p in model.parameters()]
    kw = _optimizer_kwargs(case)
    if world > 1 and case["wrap"] == "ddp":
        net = nn.parallel.DistributedDataParallel(model)
        opt = pmptrain.EMSA(net, **kw)
    elif world > 1:
        net = model
        opt = pmptrain.EMSA(model, process_group=group, **kw)
    else:
        net = model
        opt = pmptrain.EMSA(model, **kw)
    xs, ys = make_data(case["kind"], dtype)
    part = batch // world
    for x, y in zip(xs, ys):
        if world > 1:
            x, y = x[rank * part : (rank + 1) * part], y[rank * part : (rank + 1) * part]
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        assert not opt.last_step["skipped"], opt.last_step
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "init": init,
        "skipped": opt.skipped_steps,
    }


def iterative_gain_step(rank: int, world: int) -> dict:
    """``solver="iterative"`` with ρ = 0 and ONE inner SGD step of size η from θ_k: the prox term has
    zero gradient at θ_k, so Δθ = η·∇H(θ_k) = −η·∇J (the Hamiltonian-gradient identity) for every
    module, BatchNorm included. Returns Δθ and −η·grad (the rank-averaged grad) per parameter."""
    eta = 0.1
    torch.manual_seed(0)
    model = MLP().double()
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = pmptrain.EMSA(net, rho=0.0, solver="iterative", inner_optimizer="sgd", inner_steps=1, inner_lr=eta)
    x, y = (t[0] for t in make_data("mlp", torch.float64))
    part = x.shape[0] // world
    x, y = x[rank * part : (rank + 1) * part], y[rank * part : (rank + 1) * part]
    F.cross_entropy(net(x), y).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = {n: -eta * p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    return {n: (p.detach() - before[n], expected[n]) for n, p in model.named_parameters()}


def _all_cases(rank: int, world: int) -> Dict[str, dict]:
    group = dist.new_group(list(range(world)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {name: train(case, rank, world, group=group) for name, case in CASES.items()}
        out["iterative_gain_step"] = iterative_gain_step(rank, world)
        return out


@pytest.fixture(scope="module")
def dist_results() -> List[Dict[str, dict]]:
    return run_distributed(_all_cases, WORLD)


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)


def _close(a: List[torch.Tensor], b: List[torch.Tensor], dtype) -> bool:
    return all(torch.allclose(x, y, **_tol(dtype)) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("name", list(CASES))
def test_ranks_hold_identical_parameters(dist_results, name):
    r0, r1 = dist_results[0][name], dist_results[1][name]
    assert r0["skipped"] == r1["skipped"] == 0
    for a, b in zip(r0["params"], r1["params"]):
        assert a.dtype == CASES[name]["dtype"]
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_process_on_union_batch(dist_results, name):
    case = CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = train(case, 0, 1, halves=WORLD)
    got = dist_results[0][name]
    moved = max(float((p - q).abs().max()) for p, q in zip(ref["params"], ref["init"]))
    assert moved > 1e-3, "the optimizer barely moved: the comparison would be vacuous"
    for i, (a, b) in enumerate(zip(got["params"], ref["params"])):
        torch.testing.assert_close(a, b, **_tol(case["dtype"]), msg=lambda m: f"param {i}: {m}")
    # the comparison is sharp: training on rank 0's half alone (a rank that ignored the other) is
    # far outside the tolerance
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = _train_on_first_half(case)
    assert not _close(got["params"], alone, case["dtype"])


def _train_on_first_half(case) -> List[torch.Tensor]:
    cls, _, batch = MODELS[case["kind"]]
    torch.manual_seed(0)
    model = cls().to(case["dtype"])
    opt = pmptrain.EMSA(model, **_optimizer_kwargs(case))
    xs, ys = make_data(case["kind"], case["dtype"])
    for x, y in zip(xs, ys):
        opt.zero_grad()
        F.cross_entropy(model(x[: batch // WORLD]), y[: batch // WORLD]).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _check_gain_step(result: dict, names) -> None:
    for n in names:
        got, want = result[n]
        assert float(want.abs().max()) > 1e-4, n  # non-vacuous
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m: f"{n}: {m}")


def test_iterative_gain_step_single_process():
    """The identity the distributed test relies on holds in one process (BatchNorm included)."""
    r = iterative_gain_step(0, 1)
    _check_gain_step(r, [n for n in r if n != "fc1.bias"])  # fc1.bias: zero grad (BN follows)


def test_iterative_gain_step_distributed_affine(dist_results):
    _check_gain_step(dist_results[0]["iterative_gain_step"], ["fc1.weight", "fc2.weight", "fc2.bias", "fc3.weight"])


def test_iterative_batchnorm_calls_are_not_merged(dist_results):
    _check_gain_step(dist_results[0]["iterative_gain_step"], ["bn.weight", "bn.bias"])
