"""Hooked states/costates against autograd, and the hook life cycle."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pmptrain.capture import ModuleCapture
from pmptrain.hamiltonian import affine_stats
from pmptrain.modules import adapter_for


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)
    ).double()


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, stride=2), nn.Flatten(), nn.Linear(5, 3),
    ).double()


def _controlled(model):
    return {n: m for n, m in model.named_modules() if adapter_for(m) is not None}


@pytest.mark.parametrize("make,shape", [(_mlp, (7, 6)), (_cnn, (3, 2, 8, 8))])
def test_captured_costates_equal_autograd_and_rebuild_the_weight_gradient(make, shape):
    model = make()  # in-place ReLUs rewrite the outputs the hooks are attached to
    reference = make()
    for m in reference.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    x = torch.randn(*shape, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 0, 1, 2, 0][: shape[0]])
    # reference ∂J/∂y for every module output, by autograd on the out-of-place twin
    ref_mods = _controlled(reference)
    outputs = {}
    for n, m in ref_mods.items():
        m.register_forward_hook(lambda mod, i, o, n=n: outputs.__setitem__(n, o))
    ref_loss = F.cross_entropy(reference(x), target)
    names = list(ref_mods)
    grads = torch.autograd.grad(ref_loss, [outputs[n] for n in names])

    mods = _controlled(model)
    cap = ModuleCapture(mods)
    F.cross_entropy(model(x), target).backward()
    for name, g_ref in zip(names, grads):
        (rec,) = cap.pop(name)
        torch.testing.assert_close(rec.grad, g_ref)
        module, adapter = mods[name], adapter_for(mods[name])
        x_rows = adapter.input_rows(module, rec.x)
        g_rows = adapter.output_rows(module, rec.grad)
        # G = −∇_W J = (1/B) Σ p̂ xᵀ with p̂ = −B g: the rows reproduce autograd's weight gradient
        torch.testing.assert_close(g_rows.T @ x_rows, module.weight.grad.reshape(g_rows.shape[1], -1))
        torch.testing.assert_close(g_rows.sum(0), module.bias.grad)
    cap.remove()


def test_hamiltonian_gradient_identity():
    """∇_θ H(θ) at θ_k, with H = (1/B) Σ p̂·f(x, θ) built from captured tensors, equals −∇_θ J."""
    model = _mlp()
    mods = _controlled(model)
    cap = ModuleCapture(mods)
    x = torch.randn(5, 6, dtype=torch.float64)
    F.mse_loss(model(x), torch.randn(5, 3, dtype=torch.float64)).backward()
    for name, module in mods.items():
        (rec,) = cap.pop(name)
        b = rec.x.shape[0]
        p_hat = -b * rec.grad
        w = module.weight.detach().clone().requires_grad_(True)
        bias = module.bias.detach().clone().requires_grad_(True)
        ham = (p_hat * F.linear(rec.x, w, bias)).sum() / b
        gw, gb = torch.autograd.grad(ham, (w, bias))
        torch.testing.assert_close(gw, -module.weight.grad)
        torch.testing.assert_close(gb, -module.bias.grad)


def test_statistics_do_not_depend_on_batch_size():
    model = _mlp()
    lin = model[0]
    cap = ModuleCapture({"lin": lin})
    x = torch.randn(4, 6, dtype=torch.float64)
    y = torch.randn(4, 3, dtype=torch.float64)
    stats = []
    for reps in (1, 3):
        model.zero_grad()
        F.mse_loss(model(x.repeat(reps, 1)), y.repeat(reps, 1)).backward()
        (rec,) = cap.pop("lin")
        b = rec.x.shape[0]
        stats.append(affine_stats(rec.x, -b * rec.grad, b))
    for a, c in zip((stats[0].cxx, stats[0].cpp, stats[0].x_mean), (stats[1].cxx, stats[1].cpp, stats[1].x_mean)):
        torch.testing.assert_close(a, c)


def test_shared_module_contributes_every_call():
    torch.manual_seed(1)
    lin = nn.Linear(4, 4).double()
    cap = ModuleCapture({"lin": lin})
    x = torch.randn(3, 4, dtype=torch.float64)
    lin(torch.tanh(lin(x))).sum().backward()
    recs = cap.pop("lin")
    assert len(recs) == 2
    g = sum(r.grad.T @ r.x for r in recs)
    torch.testing.assert_close(g, lin.weight.grad)


def test_nothing_recorded_in_eval_no_grad_or_without_gradient():
    model = _mlp()
    cap = ModuleCapture(_controlled(model))
    x = torch.randn(2, 6, dtype=torch.float64)
    model.eval()
    model(x).sum().backward()
    assert not cap.has_records() and all(not r for r in cap.records.values())
    model.train()
    with torch.no_grad():
        model(x)
    assert all(not r for r in cap.records.values())
    model(x)  # forward without backward: recorded but never completed
    assert not cap.has_records()
    assert cap.pop("0") == []
    with cap.paused():
        model(x).sum().backward()
    assert not cap.has_records()


def test_module_not_called_is_skipped():
    model = _mlp()
    cap = ModuleCapture(_controlled(model))
    x = torch.randn(2, 6, dtype=torch.float64)
    model[0](x).sum().backward()
    assert len(cap.pop("0")) == 1
    assert cap.pop("2") == [] and cap.pop("4") == []


def test_remove_leaves_the_model_as_it_was():
    model = _mlp()
    before = {n: (dict(m._forward_hooks), dict(m._forward_hooks_with_kwargs)) for n, m in model.named_modules()}
    x = torch.randn(2, 6, dtype=torch.float64)
    ref = model(x)
    cap = ModuleCapture(_controlled(model))
    assert any(m._forward_hooks for m in model.modules())
    cap.remove()
    after = {n: (dict(m._forward_hooks), dict(m._forward_hooks_with_kwargs)) for n, m in model.named_modules()}
    assert before == after
    torch.testing.assert_close(model(x), ref)
    model(x).sum().backward()
    assert not cap.has_records()
