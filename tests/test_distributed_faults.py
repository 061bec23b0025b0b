"""Distributed faults (issue 10, finding 5): unequal per-rank batches and ranks that ran different
modules, on 2 gloo ranks (one spawn for the whole file, hard timeout).

* **Unequal batches, unwrapped model** (``process_group``): the optimizer weights each rank's
  gradient by its share of the samples, ``Σ_r (B_r/B)·∇J_r``, and the curvature statistics are sums
  over the ranks divided by the union ``B``; after ``K_STEPS`` both ranks hold identical parameters
  equal to one process on the union batch (float64 ``rtol = atol = 1e-10``; float32 ``1e-5/1e-6``).
  The uniform mean over ranks (the behaviour before the fix) is far outside that tolerance.
* **Unequal batches under DDP** (which averages ``.grad`` uniformly, the ranks' own gradients gone):
  a ``RuntimeError`` naming the sizes on both ranks, parameters untouched.
* **Different modules** (rank-dependent branches, a rank without any backward, a module called a
  different number of times with the iterative solver, DDP with ``find_unused_parameters``, a
  different model on one rank): the
  same ``RuntimeError`` on both ranks before any collective whose shapes depend on it, naming the
  parameters / modules and the ranks; parameters untouched.

Every scenario catches its own exception in the worker and returns it, so both ranks' outcomes are
observed (the harness would terminate the second rank once the first one raised).
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


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.ln = nn.LayerNorm(10)
        self.fc2 = nn.Linear(10, 12)
        self.fc3 = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(self.ln(torch.tanh(self.fc1(x))))))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, groups=2)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


# class, input shape, per-rank batch sizes (unequal)
MODELS = {"mlp": (MLP, (6,), (5, 11)), "conv": (ConvNet, (2, 6, 6), (3, 5))}

BASE = dict(lr=0.5, rho=1.0, fallback_lr=1e-2)
UNEQUAL: Dict[str, dict] = {
    "mlp-primal-f64": dict(kind="mlp", opt=dict(route="primal")),
    "mlp-gram-f64": dict(kind="mlp", opt=dict(route="gram")),
    "mlp-isotropic-f64": dict(kind="mlp", opt=dict(costate="isotropic")),
    "mlp-decay-f64": dict(kind="mlp", opt=dict(route="primal", stat_decay=0.5, eig_refresh=2)),
    "mlp-every2-f64": dict(kind="mlp", opt=dict(route="primal", stat_every=2)),
    "mlp-every2-noln-f64": dict(kind="mlp", opt=dict(route="primal", stat_every=2, exclude=("ln",))),
    "mlp-iterative-f64": dict(kind="mlp", opt=dict(solver="iterative", inner_steps=3, inner_lr=0.05)),
    "mlp-exclude-f64": dict(kind="mlp", opt=dict(exclude=("ln",))),  # fallback grads: the shared shares
    "conv-auto-f64": dict(kind="conv", opt=dict()),
    "mlp-primal-f32": dict(kind="mlp", opt=dict(route="primal"), dtype=torch.float32),
    "conv-auto-f32": dict(kind="conv", opt=dict(), dtype=torch.float32),
}


def make_data(kind: str, dtype):
    _, shape, sizes = MODELS[kind]
    g = torch.Generator().manual_seed(99)
    batch = sum(sizes)
    return [(torch.randn((batch,) + shape, generator=g, dtype=torch.float64).to(dtype),
             torch.randint(0, 3, (batch,), generator=g)) for _ in range(K_STEPS)]


def _rows(kind: str, rank: int) -> slice:
    sizes = MODELS[kind][2]
    lo = sum(sizes[:rank])
    return slice(lo, lo + sizes[rank])


def train(case: dict, rank: int, world: int, wrap: str = "pg", uniform_mean: bool = False) -> List[torch.Tensor]:
    """K_STEPS of EMSA; ``world > 1``: this rank's (unequal) part of each batch; ``world == 1``: the
    union batch (``uniform_mean``: the average of the two parts' gradients, the old behaviour)."""
    cls, _, _ = MODELS[case["kind"]]
    dtype = case.get("dtype", torch.float64)
    torch.manual_seed(0)
    model = cls().to(dtype)
    net = nn.parallel.DistributedDataParallel(model) if wrap == "ddp" and world > 1 else model
    opt = pmptrain.EMSA(net, **{**BASE, **case["opt"]})
    for x, y in make_data(case["kind"], dtype):
        opt.zero_grad()
        if world > 1:
            F.cross_entropy(net(x[_rows(case["kind"], rank)]), y[_rows(case["kind"], rank)]).backward()
        elif uniform_mean:
            sl = [_rows(case["kind"], r) for r in range(WORLD)]
            sum(F.cross_entropy(net(x[s]), y[s]) for s in sl).div(WORLD).backward()
        else:
            F.cross_entropy(net(x), y).backward()
        opt.step()
        assert not opt.last_step["skipped"], opt.last_step
    return [p.detach().clone() for p in model.parameters()]


def _outcome(fn, model: nn.Module) -> dict:
    """Run ``fn()``; return the error message (or None) and whether the parameters are unchanged."""
    before = [p.detach().clone() for p in model.parameters()]
    try:
        fn()
        err = None
    except RuntimeError as e:
        err = str(e)
    return {"error": err, "unchanged": all(torch.equal(a, p) for a, p in zip(before, model.parameters()))}


# ------------------------------------------------------------------------------ fault scenarios
def ddp_unequal(rank: int, world: int) -> dict:
    case = dict(kind="mlp", opt=dict(route="primal"))
    torch.manual_seed(0)
    model = MLP().double()
    net = nn.parallel.DistributedDataParallel(model)
    opt = pmptrain.EMSA(net, **BASE)
    x, y = make_data("mlp", torch.float64)[0]
    s = _rows(case["kind"], rank)
    F.cross_entropy(net(x[s]), y[s]).backward()
    return _outcome(opt.step, model)


class Branchy(nn.Module):
    """``a`` on rank 0, ``b`` on the others (a rank-dependent branch)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x, rank):
        return self.head(torch.tanh((self.a if rank == 0 else self.b)(x)))


def _branch_step(rank: int, wrap: str, **kw) -> dict:
    torch.manual_seed(0)
    model = Branchy().double()
    net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if wrap == "ddp" else model
    opt = pmptrain.EMSA(net, **{**BASE, **kw})
    x, y = make_data("mlp", torch.float64)[0]
    F.cross_entropy(net(x[rank * 4 : rank * 4 + 4], rank), y[rank * 4 : rank * 4 + 4]).backward()
    return _outcome(opt.step, model)


def different_modules(rank: int, world: int) -> dict:
    return _branch_step(rank, "pg")


def different_modules_ddp(rank: int, world: int) -> dict:
    return _branch_step(rank, "ddp")


def different_modules_fallback(rank: int, world: int) -> dict:
    """Only the fallback's parameters differ (no statistics at all)."""
    return _branch_step(rank, "pg", rho=0.0)


def no_backward_on_one_rank(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = MLP().double()
    opt = pmptrain.EMSA(model, **BASE)
    x, y = make_data("mlp", torch.float64)[0]
    if rank == 0:
        F.cross_entropy(model(x[:4]), y[:4]).backward()
    return _outcome(opt.step, model)


def different_call_counts(rank: int, world: int) -> dict:
    """The iterative solver gathers every recorded call: rank 1 calls ``fc1`` twice."""
    torch.manual_seed(0)
    model = MLP().double()
    opt = pmptrain.EMSA(model, solver="iterative", inner_steps=2, inner_lr=0.05, rho=1.0)
    x, y = make_data("mlp", torch.float64)[0]
    xs = x[rank * 4 : rank * 4 + 4]
    h = torch.tanh(model.fc1(xs))
    if rank == 1:
        h = h + 0.5 * torch.tanh(model.fc1(xs.flip(0)))
    F.cross_entropy(model.fc3(torch.relu(model.fc2(model.ln(h)))), y[rank * 4 : rank * 4 + 4]).backward()
    return _outcome(opt.step, model)


def different_models(rank: int, world: int) -> dict:
    """Rank 1's last layer has another output width (same numbers of units and parameters)."""
    torch.manual_seed(0)
    model = MLP().double()
    if rank == 1:
        model.fc3 = nn.Linear(12, 4).double()
    opt = pmptrain.EMSA(model, **BASE)
    x, y = make_data("mlp", torch.float64)[0]
    F.cross_entropy(model(x[rank * 4 : rank * 4 + 4]), y[rank * 4 : rank * 4 + 4]).backward()
    return _outcome(opt.step, model)


FAULTS = {
    "ddp_unequal": ddp_unequal,
    "different_modules": different_modules,
    "different_modules_ddp": different_modules_ddp,
    "different_modules_fallback": different_modules_fallback,
    "no_backward_on_one_rank": no_backward_on_one_rank,
    "different_call_counts": different_call_counts,
    "different_models": different_models,
}


def _all(rank: int, world: int) -> dict:
    group = dist.new_group(list(range(world)))
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, case in UNEQUAL.items():
            out[name] = train(case, rank, world)
        for name, fn in FAULTS.items():
            out[name] = fn(rank, world)
            dist.barrier(group)
    return out


@pytest.fixture(scope="module")
def results() -> List[dict]:
    return run_distributed(_all, WORLD, timeout=150)


def _tol(case):
    return dict(rtol=1e-10, atol=1e-10) if case.get("dtype", torch.float64) == torch.float64 else dict(rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("name", list(UNEQUAL))
def test_unequal_batches_match_single_process_on_union(results, name):
    case = UNEQUAL[name]
    for a, b in zip(results[0][name], results[1][name]):
        assert torch.equal(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = train(case, 0, 1)
        old = train(case, 0, 1, uniform_mean=True)
    torch.manual_seed(0)
    init = [p.detach() for p in MODELS[case["kind"]][0]().to(ref[0].dtype).parameters()]
    assert max(float((p - q).abs().max()) for p, q in zip(ref, init)) > 1e-3  # it moved: not vacuous
    for i, (a, b) in enumerate(zip(results[0][name], ref)):
        torch.testing.assert_close(a, b, **_tol(case), msg=lambda m: f"param {i}: {m}")
    # sharp: the uniform mean over the ranks (ranks weighted equally) is far outside the tolerance
    assert not all(torch.allclose(a, b, **_tol(case)) for a, b in zip(results[0][name], old))


EXPECTED = {
    "ddp_unequal": ["batch sizes differ", "module 'fc1': 5 samples on rank 0, 11 samples on rank 1",
                    "DistributedDataParallel", "process_group"],
    "different_modules": ["did not run the same modules", "parameters 'a.weight', 'a.bias' have a gradient on rank 0 "
                          "and none on rank 1", "parameters 'b.weight', 'b.bias' have a gradient on rank 1 and none "
                          "on rank 0", "modules 'a' ran forward and backward on rank 0 and not on rank 1"],
    "different_modules_ddp": ["did not run the same modules", "modules 'a' ran forward and backward on rank 0 and "
                              "not on rank 1", "modules 'b' ran forward and backward on rank 1 and not on rank 0"],
    "different_modules_fallback": ["parameters 'a.weight', 'a.bias' have a gradient on rank 0 and none on rank 1"],
    "no_backward_on_one_rank": ["have a gradient on rank 0 and none on rank 1", "'fc1.weight'"],
    "different_call_counts": ["module 'fc1' was called 1 times on rank 0, 2 times on rank 1"],
    "different_models": ["train different parameters", "rank 0: 4 units, 8 parameters; rank 1: 4 units, 8 parameters"],
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_fault_raises_on_every_rank_and_changes_nothing(results, name):
    errors = [results[r][name]["error"] for r in range(WORLD)]
    assert errors[0] is not None and errors[0] == errors[1], errors
    for piece in EXPECTED[name]:
        assert piece in errors[0], (piece, errors[0])
    assert results[0][name]["unchanged"] and results[1][name]["unchanged"]
