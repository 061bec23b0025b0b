"""Fully binarised networks train (the costate through a sign activation: tests/test_capture.py)."""

import torch
import torch.nn.functional as F
from torch import nn

import pmptrain


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
