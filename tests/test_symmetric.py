"""The block-triangular symmetric product (pmptrain.symmetric) against the plain one, in float64,
and the exact E-MSA step with every statistic formed by it against the step with plain products."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pmptrain
from pmptrain import symmetric
from pmptrain.capture import _fold
from pmptrain.hamiltonian import Curvature, solve_sylvester
from pmptrain.symmetric import plain_products, sym_block_width, sym_gram


def _rows(n, k, seed=0, transposed=False):
    g = torch.Generator().manual_seed(seed)
    if transposed:  # a transposed view (AAᵀ of the Gram route: rows = Aᵀ)
        return torch.randn(k, n, generator=g, dtype=torch.float64).T
    return torch.randn(n, k, generator=g, dtype=torch.float64)


def _sym(k, seed=1):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, k, generator=g, dtype=torch.float64)
    return a + a.T


@pytest.mark.parametrize("n,k,block", [(300, 200, 64), (97, 130, 33), (50, 7, 2), (40, 9, 1), (64, 17, 16),
                                       (5, 96, 48), (0, 40, 16)])
@pytest.mark.parametrize("transposed", [False, True])
def test_sym_gram_equals_the_plain_product_and_is_exactly_symmetric(n, k, block, transposed):
    r = _rows(n, k, transposed=transposed)
    ref = r.T @ r
    c = sym_gram(r, block=block)
    torch.testing.assert_close(c, ref, rtol=1e-13, atol=1e-12 * max(1, n))
    assert torch.equal(c, c.T)
    # accumulating: β·C + α·RᵀR (only C's upper triangle is read)
    acc = _sym(k)
    other_lower = acc.triu() + 7.0 * torch.ones(k, k, dtype=torch.float64).tril(-1)  # same upper triangle
    for start in (acc.clone(), other_lower):
        out = sym_gram(r, start, alpha=0.5, beta=2.0, block=block)
        assert out.data_ptr() == start.data_ptr()  # in place
        torch.testing.assert_close(out, 2.0 * acc + 0.5 * ref, rtol=1e-13, atol=1e-12 * max(1, n))
        assert torch.equal(out, out.T)


def test_sym_gram_scales_a_fresh_product_and_ignores_non_finite_memory():
    r = _rows(80, 40)
    torch.testing.assert_close(sym_gram(r, alpha=0.25, block=16), 0.25 * (r.T @ r), rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(sym_gram(r, alpha=0.25, block=40), 0.25 * (r.T @ r), rtol=1e-13, atol=1e-12)
    # β = 0: what ``out`` held (NaN here) is not read, as addmm's β = 0
    out = torch.full((40, 40), float("nan"), dtype=torch.float64)
    torch.testing.assert_close(sym_gram(r, out, beta=0.0, block=16), r.T @ r, rtol=1e-13, atol=1e-12)


def test_sym_gram_keeps_exact_zeros_and_float32():
    r = torch.zeros(30, 150)
    r[:, :70] = torch.randn(30, 70)
    c = sym_gram(r, block=32)
    assert c.dtype == torch.float32
    assert torch.equal(c[70:], torch.zeros(80, 150)) and torch.equal(c[:, 70:], torch.zeros(150, 80))
    r64 = r.double()
    torch.testing.assert_close(c.double(), r64.T @ r64, rtol=1e-5, atol=1e-4)


def test_sym_gram_of_no_columns_or_no_rows():
    # the Gram route's AAᵀ of a unit without kept rows: A is 0×n, rows = Aᵀ has no columns
    assert sym_gram(torch.zeros(0, 5).T).shape == (0, 0)
    assert sym_gram(torch.zeros(7, 0), block=3).shape == (0, 0)
    assert torch.equal(sym_gram(torch.zeros(0, 300)), torch.zeros(300, 300))
    assert torch.equal(sym_gram(torch.zeros(0, 300), block=64), torch.zeros(300, 300))


def test_sym_gram_names_bad_input():
    with pytest.raises(ValueError, match="matrix"):
        sym_gram(torch.ones(3))
    with pytest.raises(ValueError, match="out must be 4×4"):
        sym_gram(torch.ones(5, 4), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="block"):
        sym_gram(torch.ones(5, 4), block=0)


def test_block_width_rule():
    # narrow or small products: one block (the plain product); the measured crossover
    assert sym_block_width(96, 100_000) == 96
    assert sym_block_width(128, 784) == 128  # the MLP's Gram matrices: 784·128² < 2²⁵
    assert sym_block_width(128, 256) == 128
    for k, n in ((144, 25088), (512, 2048), (576, 4096), (1152, 16384), (4608, 1024)):
        w = sym_block_width(k, n)
        blocks = -(-k // w)
        assert 2 <= blocks <= 16 and w % 16 == 0 and w < k
    assert sym_block_width(144, 25088) == 80  # two blocks of 80 and 64 columns
    with plain_products():
        assert sym_block_width(4608, 1024) == 4608
    assert sym_block_width(4608, 1024) < 4608


def test_fold_and_curvatures_use_it(monkeypatch):
    # the capture's accumulator and the dense curvature equal the plain sums (blocking forced)
    monkeypatch.setattr(symmetric, "_MIN_WIDTH", 1)
    monkeypatch.setattr(symmetric, "_MIN_WORK", 0)
    monkeypatch.setattr(symmetric, "_TARGET_BLOCK", 16)
    chunks = [_rows(30, 50, seed=s) for s in range(3)]
    acc = _fold(chunks, None, torch.float64)
    ref = sum(c.T @ c for c in chunks)
    torch.testing.assert_close(acc, ref, rtol=1e-13, atol=1e-11)
    assert torch.equal(acc, acc.T)
    c = Curvature(50, 0.5, dense=_sym(50), rows=chunks[0])
    dense = c.to_dense(chunks[0])
    torch.testing.assert_close(dense, _sym(50) + chunks[0].T @ chunks[0] + 0.5 * torch.eye(50, dtype=torch.float64),
                               rtol=1e-13, atol=1e-11)
    # the Gram route (AAᵀ of the rows) against the dense solve of the same operator
    g = torch.Generator().manual_seed(4)
    s = torch.randn(7, 50, generator=g, dtype=torch.float64)
    left = Curvature(7, 0.3)
    right = Curvature(50, 0.2, rows=chunks[1])
    out = solve_sylvester(s, left, right, rho=2.0, delta=0.1)
    mat = 2.0 * (chunks[1].T @ chunks[1] + 0.5 * torch.eye(50, dtype=torch.float64)) + 0.1 * torch.eye(50, dtype=torch.float64)
    torch.testing.assert_close(out, torch.linalg.solve(mat, s.T).T, rtol=1e-10, atol=1e-12)


def _cnn():
    # wide enough that the patch statistic XᵀX (16·9 = 144 columns) and the Gram products are blocked
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 5))


def _mlp():
    return nn.Sequential(nn.Linear(160, 140), nn.ReLU(), nn.Linear(140, 5))


def _train(build, kwargs, plain, steps=3, batch=24, shape=(3, 8, 8)):
    torch.manual_seed(0)
    model = build().double()
    opt = pmptrain.EMSA(model, **kwargs)  # the CNN: the conv setting (bounded steps on reduced statistics)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
        y = torch.randint(0, 5, (batch,), generator=g)
        with plain_products() if plain else contextlib.nullcontext():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("build,kwargs,shape", [
    (_cnn, {}, (3, 8, 8)),                                   # patch statistics XᵀX in the capture, exact costate
    (_mlp, {"costate": "exact"}, (160,)),                    # Gram/Gram and Gram/explicit routes: AAᵀ
    (_mlp, {}, (160,)),                                      # Woodbury Gram route, isotropic costate
    (_mlp, {"route": "primal", "costate": "exact"}, (160,)),  # dense XᵀX and GᵀG folded in the capture
])
def test_exact_step_with_blocked_products_equals_plain_products_in_float64(monkeypatch, build, kwargs, shape):
    # small products are blocked here (the default rule would leave these sizes unblocked)
    monkeypatch.setattr(symmetric, "_MIN_WIDTH", 1)
    monkeypatch.setattr(symmetric, "_MIN_WORK", 0)
    monkeypatch.setattr(symmetric, "_TARGET_BLOCK", 16)
    calls = []
    real = symmetric.sym_gram

    def counting(rows, *a, **k):
        calls.append(sym_block_width(rows.shape[1], rows.shape[0]) < rows.shape[1])
        return real(rows, *a, **k)

    for mod in ("pmptrain.capture", "pmptrain.hamiltonian"):
        monkeypatch.setattr(f"{mod}.sym_gram", counting)
    fast = _train(build, kwargs, plain=False, shape=shape)
    assert any(calls), "no symmetric product was blocked"
    calls.clear()
    ref = _train(build, kwargs, plain=True, shape=shape)
    assert not any(calls)
    moved = [(a - b).abs().max() for a, b in zip(fast, [p.detach() for p in _fresh(build)])]
    assert all(m > 0 for m in moved)  # the weights did move
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _fresh(build):
    torch.manual_seed(0)
    return list(build().double().parameters())


# ------------------------------------------------------------------ the shifted (Toeplitz) patch statistic


@pytest.mark.parametrize("shape,kernel,pad", [
    ((3, 2, 6, 7), (3, 3), (1, 1)), ((2, 3, 5, 5), (3, 2), (0, 0)), ((2, 1, 4, 6), (1, 3), (0, 1)),
    ((4, 5, 8, 8), (5, 5), (2, 2)), ((2, 2, 3, 3), (3, 3), (0, 0)), ((1, 4, 9, 4), (2, 4), (1, 2)),
])
def test_conv2d_patch_gram_equals_the_im2col_statistic(shape, kernel, pad):
    from pmptrain.modules import _patch_rows

    g = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    x[0, :, 1] = 0.0  # exact zeros inside the image
    xp = F.pad(x, (pad[1], pad[1], pad[0], pad[0]))
    rows = _patch_rows(xp, kernel, (1, 1), (1, 1))
    for zero_rows in ((0, 0), (pad[0], pad[0])):
        gram, total = symmetric.conv2d_patch_gram(xp, kernel, zero_rows=zero_rows)
        torch.testing.assert_close(gram, rows.T @ rows, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(total, rows.sum(0), rtol=1e-12, atol=1e-12)
        assert torch.equal(gram, gram.T)
    with pytest.raises(ValueError, match="does not fit"):
        symmetric.conv2d_patch_gram(xp, (shape[2] + sum(pad) + 1, 1))
    with pytest.raises(ValueError, match="padded"):
        symmetric.conv2d_patch_gram(xp[0], kernel)


def test_shifted_route_rule():
    pays = symmetric.shifted_gram_pays
    pad = (1, 1)  # zero padding: the corrections of the padded rows vanish
    assert pays((14, 14), (3, 3), 16, pad) and pays((32, 32), (3, 3), 64, pad) and pays((16, 16), (3, 3), 128, pad)
    assert pays((8, 8), (3, 3), 256, pad) and pays((14, 14), (3, 3), 16)
    assert not pays((4, 4), (3, 3), 512, pad)  # measured: im2col wins
    assert not pays((8, 8), (3, 3), 256)  # every border row corrected: im2col wins
    assert not pays((28, 28), (3, 3), 1)  # 3 columns: too narrow
    assert not pays((28, 28), (1, 3), 64)  # one tap row: nothing to share
    with plain_products():
        assert not pays((32, 32), (3, 3), 64)


def _wide_cnn():
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def test_capture_takes_the_shifted_route_and_the_step_equals_plain_products(monkeypatch):
    import pmptrain.modules as mods

    calls = []
    real = mods.conv2d_patch_gram
    monkeypatch.setattr(mods, "conv2d_patch_gram", lambda *a, **k: calls.append(1) or real(*a, **k))
    kwargs = {"costate": "exact"}
    fast = _train(_wide_cnn, kwargs, plain=False, steps=2, batch=6, shape=(8, 14, 14))
    assert len(calls) == 4  # both padded stride-1 convolutions, two steps (not the stride-2 one)
    calls.clear()
    ref = _train(_wide_cnn, kwargs, plain=True, steps=2, batch=6, shape=(8, 14, 14))
    assert not calls
    for a, b, p0 in zip(fast, ref, _fresh(_wide_cnn)):
        assert (a - p0).abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_benchmark_script_runs(capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import sym_products

    sym_products.GRAM_SHAPES = [(64, 40, False, "tiny"), (300, 130, True, "tiny transposed")]
    sym_products.CONV_SHAPES = [(2, 16, 14, "tiny conv")]
    sym_products.main(["--rounds", "1"])
    out = capsys.readouterr().out
    assert "| 64 × 40 | tiny | 40 |" in out and "| 300 × 130 | tiny transposed | 130 |" in out
    assert "| 2×16×14×14 | tiny conv |" in out and out.rstrip().endswith("| shifted |")
