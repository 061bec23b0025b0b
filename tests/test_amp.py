"""EMSA with torch.amp (issue 2, item 5): bf16 autocast on CPU and ``torch.amp.GradScaler("cpu")``.

``torch.amp.GradScaler("cpu")`` exists and is enabled on CPU in torch 2.13, so the real scaler is
used (no fake). pmptrain optimizers take GradScaler's standard path: ``scaler.step(opt)`` unscales
``.grad`` (unless the loop did with ``scaler.unscale_``), skips the step on inf/NaN and calls
``opt.step()``; the optimizer unscales the captured costates with the scale of that scaler (inf
skips for every optimizer: tests/test_contract.py).

Tolerances:
* GradScaler vs no scaling: ``rtol = 1e-6`` (float32). The default scale 2¹⁶ is a power of two, so
  scaling and unscaling are exact and the updates are in fact bit-identical today.
* bf16 autocast vs float32: relative error of each parameter's *update* (2-norm) ≤ 5e-2. bf16 keeps
  8 significant bits (unit roundoff 2⁻⁸ ≈ 3.9e-3); the Linear outputs, hence the captured states of
  later layers and all costates, are bf16-rounded and the errors of a few layers add up. Measured:
  ≤ 1.7e-2 (the largest on a bias whose gradient is ~0 because a BatchNorm follows).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pmptrain


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)
    )


def convnet():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(20, 3),
    )


def data(kind, step=0):
    g = torch.Generator().manual_seed(100 + step)
    shape = (32, 6) if kind == "mlp" else (8, 2, 6, 6)
    return torch.randn(shape, generator=g), torch.randint(0, 3, (shape[0],), generator=g)


MODELS = {"mlp": mlp, "conv": convnet}
CONFIGS = {
    "primal": dict(route="primal"),
    "gram": dict(route="gram"),
    "isotropic": dict(costate="isotropic"),
    "decay": dict(route="primal", stat_decay=0.5),
    "amortised": dict(route="primal", stat_every=2),  # step 1 solves with step 0's statistics
    "iterative": dict(solver="iterative", inner_steps=2, inner_lr=0.05, inner_optimizer="sgd"),
}


def make_opt(model, **kw):
    # fallback SGD (not Adam) so that a missing unscale of the fallback gradients shows up too
    return pmptrain.EMSA(model, **{"lr": 0.5, "rho": 1.0, "fallback": "sgd", "fallback_lr": 0.05, **kw})


def params(model):
    return [p.detach().clone() for p in model.parameters()]


# --------------------------------------------------------------------------------------- autocast
@pytest.mark.parametrize(
    "kind,config", [("mlp", "primal"), ("mlp", "gram"), ("mlp", "isotropic"), ("conv", "primal")]
)
def test_bf16_autocast_update_close_to_float32(kind, config):
    x, y = data(kind)
    ref_model, amp_model = MODELS[kind](), MODELS[kind]()
    init = params(ref_model)

    ref_opt = make_opt(ref_model, **CONFIGS[config])
    F.cross_entropy(ref_model(x), y).backward()
    ref_opt.step()

    amp_opt = make_opt(amp_model, **CONFIGS[config])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = amp_model(x)
        assert out.dtype == torch.bfloat16  # autocast really engaged
        loss = F.cross_entropy(out, y)
    loss.backward()
    amp_opt.step()

    assert not amp_opt.last_step["skipped"]
    assert amp_opt.last_step["controlled"] == (4 if kind == "mlp" else 3)  # the MLP's BatchNorm too
    for p0, pr, pa in zip(init, ref_model.parameters(), amp_model.parameters()):
        assert pa.dtype == torch.float32
        assert torch.isfinite(pa).all()
        d_ref, d_amp = pr.detach() - p0, pa.detach() - p0
        assert float(d_ref.norm()) > 0
        rel = float((d_amp - d_ref).norm() / d_ref.norm())
        assert rel <= 5e-2, rel


# --------------------------------------------------------------------------------------- GradScaler
def test_gradscaler_exists_on_cpu():
    scaler = torch.amp.GradScaler("cpu")
    assert scaler.is_enabled()
    assert scaler.get_scale() == 2.0**16
    assert not getattr(pmptrain.EMSA, "_step_supports_amp_scaling", False)  # Lightning clips only then


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_gradscaler_update_equals_unscaled_update(kind, config):
    ref_model, amp_model = MODELS[kind](), MODELS[kind]()
    ref_opt, amp_opt = make_opt(ref_model, **CONFIGS[config]), make_opt(amp_model, **CONFIGS[config])
    scaler = torch.amp.GradScaler("cpu")
    for step in range(2):
        x, y = data(kind, step)
        ref_opt.zero_grad()
        F.cross_entropy(ref_model(x), y).backward()
        ref_opt.step()

        amp_opt.zero_grad()
        scaler.scale(F.cross_entropy(amp_model(x), y)).backward()
        # the gradients really are scaled (else the comparison below would prove nothing)
        last = list(amp_model.parameters())[-1]
        torch.testing.assert_close(last.grad, list(ref_model.parameters())[-1].grad * scaler.get_scale())
        scaler.step(amp_opt)
        scaler.update()
        assert not amp_opt.last_step["skipped"]
        torch.testing.assert_close(
            torch.as_tensor(amp_opt.last_step["hamiltonian_gain"]),
            torch.as_tensor(ref_opt.last_step["hamiltonian_gain"]), rtol=1e-6, atol=0,
        )
    assert scaler.get_scale() == 2.0**16
    assert amp_opt.skipped_steps == 0
    for i, (pa, pr) in enumerate(zip(amp_model.parameters(), ref_model.parameters())):
        torch.testing.assert_close(pa, pr, rtol=1e-6, atol=1e-9, msg=lambda m: f"param {i}: {m}")


def _inject_grad_inf(model):
    model[0].weight.grad[0, 0] = math.inf


def _inject_nan(model):
    list(model.parameters())[-1].grad[1] = math.nan


@pytest.mark.parametrize("config", ["primal", "gram", "isotropic", "iterative"])
def test_unscale_clip_step_recipe_equals_the_unscaled_loop(config):
    """torch's documented recipe: unscale_, clip, step. The optimizer finds the scaler from
    ``scaler.step`` (the captured costates still carry the loss scale) or takes ``grad_scaler=``."""
    for explicit in (False, True):
        ref_model, amp_model = mlp(), mlp()
        scaler = torch.amp.GradScaler("cpu")
        ref_opt = make_opt(ref_model, **CONFIGS[config])
        amp_opt = make_opt(amp_model, **CONFIGS[config], grad_scaler=scaler if explicit else None)
        for step in range(2):
            x, y = data("mlp", step)
            ref_opt.zero_grad()
            F.cross_entropy(ref_model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.1)
            ref_opt.step()
            amp_opt.zero_grad()
            scaler.scale(F.cross_entropy(amp_model(x), y)).backward()
            scaler.unscale_(amp_opt)
            torch.nn.utils.clip_grad_norm_(amp_model.parameters(), 0.1)
            scaler.step(amp_opt)
            scaler.update()
        assert amp_opt.skipped_steps == 0
        for pa, pr in zip(amp_model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(pa, pr, rtol=1e-6, atol=1e-9)


def test_stepping_scaled_gradients_outside_scaler_step_is_a_clear_error():
    """With ``grad_scaler=`` given, calling ``opt.step()`` itself on gradients that were never
    unscaled would train on S·∇J: refused, nothing changed."""
    model = mlp()
    scaler = torch.amp.GradScaler("cpu")
    opt = make_opt(model, grad_scaler=scaler)
    x, y = data("mlp")
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    before = params(model)
    with pytest.raises(RuntimeError, match=r"scaler\.step\(optimizer\)"):
        opt.step()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)
    scaler.unscale_(opt)  # the explicit recipe outside scaler.step: accepted
    opt.step()
    assert opt.last_step["controlled"] == 4  # three Linear layers and the BatchNorm affine
