"""The fast step of issue 17 against its reference, and the host synchronisations of a step.

The optimizer shell takes the rules' fast path (Cholesky with deferred ``info``, no per-unit
finiteness reads, the isotropic costate kept on the device) and reads the device once per step;
``opt._deferred_checks = False`` runs the careful path (the step before issue 17: LU solves, every
safety net read on the host) — the reference compared here in float64.
"""

import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pmptrain
from pmptrain.bench.models import build_model


def _mlp(depth=3, width=48):
    layers, n = [nn.Flatten()], 20
    for _ in range(depth - 1):
        layers += [nn.Linear(n, width), nn.ReLU()]
        n = width
    return nn.Sequential(*layers, nn.Linear(n, 5))


def _cnn():
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


def _grouped():
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, groups=3),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))


def _gpt():
    return build_model("gpt", (8,), 32, n_layer=1, n_head=2, n_embd=16)


def _batches(kind, n=3, batch=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if kind == "gpt":
            out.append((torch.randint(0, 32, (batch // 3, 8), generator=g),
                        torch.randint(0, 32, (batch // 3, 8), generator=g)))
        elif kind in ("cnn", "grouped"):
            out.append((torch.randn(batch, 2, 8, 8, generator=g, dtype=torch.float64),
                        torch.randint(0, 5, (batch,), generator=g)))
        else:
            out.append((torch.randn(batch, 20, generator=g, dtype=torch.float64),
                        torch.randint(0, 5, (batch,), generator=g)))
    return out


BUILD = {"mlp": _mlp, "cnn": _cnn, "gpt": _gpt, "grouped": _grouped}
CONFIGS = [
    ("mlp", {}),                                      # Gram form, isotropic costate (the default)
    ("mlp", {"costate": "exact"}),                    # Gram/Gram and Gram/explicit routes
    ("mlp", {"route": "primal", "costate": "exact"}),  # eigenbases on both sides
    ("cnn", {}),                                      # convolutions primal, exact costate
    ("gpt", {"rho": 5.0, "rho_scale": "costate", "lr": 1e3}),  # the GPT bench setting
    ("mlp", {"rho": 5.0, "rho_scale": "costate"}),    # ρ·rms costate on the device: Gram rows, isotropic
    ("mlp", {"rho": 5.0, "rho_scale": "costate", "costate": "exact"}),
    ("grouped", {"rho": 5.0, "rho_scale": "costate"}),  # a grouped convolution's block rule
    ("gpt", {}),
]


def _train(kind, kwargs, careful, steps=3):
    torch.manual_seed(0)
    model = BUILD[kind]().double()
    opt = pmptrain.EMSA(model, **kwargs)
    opt._deferred_checks = not careful
    gains = []
    for x, y in _batches(kind, steps):
        opt.zero_grad()
        out = model(x)
        F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        opt.step()
        assert not opt.last_step["skipped"]
        gains.append(opt.last_step["hamiltonian_gain"])
    return [p.detach().clone() for p in model.parameters()], gains


@pytest.mark.parametrize("kind,kwargs", CONFIGS, ids=[f"{k}-{'-'.join(map(str, v.values())) or 'default'}"
                                                      for k, v in CONFIGS])
def test_fast_step_equals_the_careful_reference_in_float64(kind, kwargs):
    fast, g_fast = _train(kind, kwargs, careful=False)
    ref, g_ref = _train(kind, kwargs, careful=True)
    torch.manual_seed(0)
    init = [p.detach() for p in BUILD[kind]().double().parameters()]
    moved = max(float((r - i).abs().max()) for r, i in zip(ref, init))
    assert moved > 1e-3  # the steps did something
    for a, b in zip(fast, ref):
        # measured ≤ 3e-15 (rounding of Cholesky vs LU, fused vs split products)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert g_fast == pytest.approx(g_ref, rel=1e-9)


def _count_syncs(monkeypatch):
    """Counts the Tensor → host reads (``item``, ``bool``, ``float``, ``int``, ``tolist``)."""
    counts = collections.Counter()
    for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist"):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, __orig=orig, __name=name, **k):
            counts[__name] += 1
            return __orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return counts


@pytest.mark.parametrize("kind,depth", [("mlp", 2), ("mlp", 6), ("cnn", None)])
def test_a_step_reads_the_device_once_whatever_the_depth(monkeypatch, kind, depth):
    torch.manual_seed(0)
    model = _mlp(depth) if kind == "mlp" else _cnn()
    opt = pmptrain.EMSA(model)
    (x, y), = _batches(kind, 1)
    x = x.float()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    counts = _count_syncs(monkeypatch)
    opt.step()
    monkeypatch.undo()
    assert not opt.last_step["skipped"]
    assert sum(counts.values()) == 1, counts  # the step's one check (finite, gain)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "grouped", "gpt", "gpt-bench"])
def test_the_costate_scaled_step_reads_the_device_once(monkeypatch, kind):
    """``rho_scale="costate"`` (ρ·rms costate per unit, the GPT bench setting) keeps ρ on the device:
    one read per step, not one per unit (12 on the GPT bench model before). ``gpt-bench`` is the
    model of ``benchmarks/step_time.py --models gpt`` (2 × 128, tied embedding) on 2 × 128 tokens."""
    torch.manual_seed(0)
    if kind == "gpt-bench":
        model = build_model("gpt", (128,), 256)
        g = torch.Generator().manual_seed(0)
        x, y = torch.randint(0, 256, (2, 128), generator=g), torch.randint(0, 256, (2, 128), generator=g)
    else:
        model = BUILD[kind]()
        (x, y), = _batches(kind, 1)
        x = x.float() if x.is_floating_point() else x
    opt = pmptrain.EMSA(model, rho=5.0, rho_scale="costate", lr=1e3 if "gpt" in kind else 0.1)
    for i in range(2):  # the second step: with the kept state of the first
        opt.zero_grad()
        out = model(x)
        F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        counts = _count_syncs(monkeypatch)
        opt.step()
        monkeypatch.undo()
        assert not opt.last_step["skipped"]
        assert opt.last_step["controlled"] >= (4 if "gpt" in kind else 2)
        assert sum(counts.values()) == 1, counts  # the step's one check (finite, gain)


def test_the_careful_path_reads_per_unit(monkeypatch):
    """The counter sees what it should: the reference path reads the device for every unit."""
    torch.manual_seed(0)
    model = _mlp(6)
    opt = pmptrain.EMSA(model)
    opt._deferred_checks = False
    (x, y), = _batches("mlp", 1)
    opt.zero_grad()
    F.cross_entropy(model(x.float()), y).backward()
    counts = _count_syncs(monkeypatch)
    opt.step()
    monkeypatch.undo()
    assert sum(counts.values()) >= 6


def test_a_failed_fast_factorisation_is_redone_carefully(monkeypatch):
    """A Cholesky that reports failure (deferred) makes the step's check fail; the shell then redoes
    every proposal on the careful path and takes that step — the same as the reference."""
    ref, _ = _train("mlp", {}, careful=True, steps=1)
    real = torch.linalg.cholesky_ex
    calls = []

    def failing(a, *args, **kw):
        chol, info = real(a, *args, **kw)
        calls.append(1)
        return chol, torch.ones_like(info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    fast, _ = _train("mlp", {}, careful=False, steps=1)
    assert calls  # the fast path ran and failed
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_non_finite_data_still_skip_with_weights_untouched():
    torch.manual_seed(0)
    model = _mlp(3)
    opt = pmptrain.EMSA(model)
    (x, y), = _batches("mlp", 1)
    x = x.float()
    x[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.last_step["skipped"] and opt.skipped_steps == 1
    assert opt.last_step["skip_reason"].startswith("non-finite gradient")  # (no closure: the loss is not seen)
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


def _cuda_model(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        (x, y), = _batches("mlp", 1)
        return _mlp(4).cuda(), {}, x.float().cuda(), y.cuda()
    g = torch.Generator().manual_seed(0)  # the GPT bench model and setting, 4 × 128 tokens
    x, y = torch.randint(0, 256, (4, 128), generator=g), torch.randint(0, 256, (4, 128), generator=g)
    return (build_model("gpt", (128,), 256).cuda(), {"rho": 5.0, "rho_scale": "costate", "lr": 1e3},
            x.cuda(), y.cuda())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.set_sync_debug_mode)")
@pytest.mark.parametrize("kind", ["mlp", "gpt-costate"])
def test_no_synchronising_call_but_the_check_on_cuda(monkeypatch, kind):
    """On a GPU the step synchronises for its one check, and for nothing else but the
    eigendecompositions (``torch.linalg.eigh`` checks its ``info`` on the host: torch has no
    ``eigh_ex``), counted here; the capture in the backward pass does not synchronise either."""
    import warnings
    model, kwargs, x, y = _cuda_model(kind)
    opt = pmptrain.EMSA(model, **kwargs)

    def iteration():
        opt.zero_grad()
        out = model(x)
        F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)

    for _ in range(2):
        iteration()
        opt.step()
    torch.cuda.synchronize()
    eighs = []
    real_eigh = torch.linalg.eigh

    def eigh(*a, **k):
        eighs.append(1)
        return real_eigh(*a, **k)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            iteration()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert not opt.last_step["skipped"]
    syncs = [str(m.message) for m in w if "synchroniz" in str(m.message)]
    assert len(syncs) <= 2 + len(eighs), syncs  # the one read of (finite, gain), and eigh's info
