"""Fully binarised networks: costates flow through the activation quantisers' pseudo-gradients."""

import torch
import torch.nn.functional as F
from torch import nn

import pmptrain
from pmptrain.capture import ModuleCapture


def test_costate_through_sign_activation_is_the_straight_through_gradient():
    torch.manual_seed(0)
    first, second = nn.Linear(5, 6).double(), nn.Linear(6, 3).double()
    model = nn.Sequential(first, pmptrain.SignActivation(), second)
    cap = ModuleCapture({"first": first, "second": second})
    x = torch.randn(8, 5, dtype=torch.float64) * 2
    loss = F.cross_entropy(model(x), torch.arange(8) % 3)
    loss.backward()
    (rec1,) = cap.pop("first")
    (rec2,) = cap.pop("second")
    y1 = first(x).detach()
    # ∂J/∂(sign input) = ∂J/∂(sign output) · 1{|y| ≤ 1}, and ∂J/∂(sign output) = g₂ W₂
    expected = (rec2.grad @ second.weight.detach()) * (y1.abs() <= 1).double()
    torch.testing.assert_close(rec1.grad, expected)
    assert (rec1.grad[y1.abs() > 1] == 0).all() and (y1.abs() > 1).any()


def test_fully_binarised_mlp_trains_with_discrete_msa():
    """Binary weights in every layer, sign activations, BatchNorm: DiscreteMSA fits a separable
    problem (the reference protocol's architecture in miniature)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    w_true = torch.randn(16, 4, generator=g)
    y = (x @ w_true).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 64, bias=False), nn.BatchNorm1d(64), pmptrain.SignActivation(),
        nn.Linear(64, 64, bias=False), nn.BatchNorm1d(64), pmptrain.SignActivation(),
        nn.Linear(64, 4, bias=False), nn.BatchNorm1d(4),
    )
    pmptrain.discretize_(model, levels="binary", keep=None)
    assert len(pmptrain.discrete_parameters(model)) == 3
    opt = pmptrain.DiscreteMSA(model, rho=0.5, decay=0.9)

    def accuracy():
        model.eval()
        with torch.no_grad():
            acc = (model(x).argmax(1) == y).float().mean().item()
        model.train()
        return acc

    start = accuracy()
    for epoch in range(15):
        perm = torch.randperm(512, generator=g)
        for i in range(0, 512, 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    end = accuracy()
    for d in pmptrain.discrete_parameters(model):
        assert set(d.param.detach().unique().tolist()) <= {-1.0, 1.0}
    assert opt.skipped_steps == 0
    assert end > 0.7 and end > start + 0.4, (start, end)  # chance: 0.25; measured 0.79
