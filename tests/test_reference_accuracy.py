"""Reference runs on real data (Fashion-MNIST; skipped when it is absent): the headline claims.

The E-MSA checks take ~15 s and run by default; the discrete-weight check takes minutes and is
marked ``slow`` (``pytest -m slow``). Numbers and tolerances come from docs/performance.md (3 seeds
there; one seed here, with margins that the seed spread respects).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pmptrain
from pmptrain.bench.data import DataError, load_dataset, make_loader

@pytest.fixture(scope="module")
def fashion():
    try:
        return load_dataset("fashion-mnist", download=False)
    except DataError as e:
        pytest.skip(f"Fashion-MNIST not available: {e}")


def _fit(ds, make_opt, epochs=3, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = make_opt(model)
    loader = make_loader(ds.train_x, ds.train_y, 128, shuffle=True, seed=seed, drop_last=True)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return (model(ds.test_x).argmax(1) == ds.test_y).float().mean().item()


def test_emsa_beats_adam_on_fashion_mnist_by_half_a_point(fashion):
    emsa = _fit(fashion, lambda m: pmptrain.EMSA(m))
    adam = _fit(fashion, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3))
    # measured (seed 0): E-MSA 88.62 %, Adam 86.96 %
    assert emsa >= adam + 0.005, (emsa, adam)
    assert emsa > 0.875


def test_basic_msa_diverges_where_emsa_converges(fashion):
    """Why E-MSA exists: with δ = 1 (lr 1), basic MSA (ρ = 0, an SGD step of size 1) blows up."""
    msa = _fit(fashion, lambda m: pmptrain.MSA(m, lr=1.0), epochs=1)
    emsa = _fit(fashion, lambda m: pmptrain.EMSA(m, lr=1.0), epochs=1)
    assert msa < 0.5 and emsa > 0.85, (msa, emsa)


@pytest.mark.slow
def test_discrete_msa_targets_on_the_batchnorm_mlp(fashion):
    """Issue-3 targets on MLP 784-1024-1024-10 + BN, 2 epochs, seed 0 (docs/performance.md):
    binary DiscreteMSA (ρ 0.95) within seed noise of BinaryConnect (measured 87.88 vs 88.04 for
    this seed; medians over 3 seeds 87.99 vs 87.39), ternary (ρ 0.95, relative λ 0.2) within one
    point of binary with ≤ 10 % non-zero weights (measured 87.28 %, 6.5 %)."""
    from pmptrain.bench.models import build_model
    from pmptrain.bench.registry import get_spec

    def fit(levels, make_opt):
        torch.manual_seed(0)
        model = build_model("mlp", fashion.input_shape, fashion.num_classes, widths=(1024, 1024), batchnorm=True)
        pmptrain.discretize_(model, levels, keep=("last",))
        opt = make_opt(model)
        for epoch in range(2):
            for x, y in make_loader(fashion.train_x, fashion.train_y, 100, seed=0, epoch=epoch):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
            if hasattr(opt, "end_epoch"):
                opt.end_epoch()
        model.eval()
        with torch.no_grad():
            acc = (model(fashion.test_x).argmax(1) == fashion.test_y).float().mean().item()
        codes = torch.cat([d.param.detach().flatten() for d in pmptrain.discrete_parameters(model)])
        return acc, (codes != 0).float().mean().item()

    binary, _ = fit("binary", lambda m: pmptrain.DiscreteMSA(m, rho=0.95, decay_gamma=0.95))
    bc, _ = fit("binary", lambda m: get_spec("binaryconnect").build(m))
    ternary, density = fit(
        "ternary", lambda m: pmptrain.DiscreteMSA(m, rho=0.95, lam=0.2, lam_mode="relative", decay_gamma=0.95)
    )
    assert binary >= bc - 0.005, (binary, bc)
    assert ternary >= binary - 0.01 and density <= 0.10, (ternary, binary, density)
