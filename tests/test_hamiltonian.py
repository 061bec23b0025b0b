"""The closed-form maximisers against slow, obviously-correct references (float64)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pmptrain.hamiltonian import (
    affine_augmented_hamiltonian,
    affine_stats,
    augmented_hamiltonian,
    eigh_psd,
    iterative_maximise,
    solve_affine_rows,
    solve_affine_rows_isotropic,
    solve_affine_stats,
)
from pmptrain.modules import adapter_for

DT = torch.float64
ROUTES = list(itertools.product(["primal", "gram"], repeat=2))


def _problem(n_rows, batch, n_in, n_out, seed=0, shift=0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, n_in, generator=g, dtype=DT) + shift  # non-zero mean: bias coupling
    p = torch.randn(n_rows, n_out, generator=g, dtype=DT)
    return x, p


def _lbfgs_maximiser(x, p, batch, rho, delta, bias):
    """Numerical maximiser of H̃ written from its definition (no closed form)."""
    m, n = p.shape[1], x.shape[1]
    dW = torch.zeros(m, n, dtype=DT, requires_grad=True)
    db = torch.zeros(m, dtype=DT, requires_grad=True) if bias else None
    params = [dW] + ([db] if bias else [])
    opt = torch.optim.LBFGS(
        params, lr=1.0, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15,
        history_size=50, line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = -affine_augmented_hamiltonian(dW, db, x, p, batch, rho, delta)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return dW.detach(), (db.detach() if bias else None)


def _newton_maximiser(x, p, batch, rho, delta, bias):
    """Maximiser of the quadratic H̃ by one Newton step with its autograd Hessian."""
    m, n = p.shape[1], x.shape[1]
    size = m * n + (m if bias else 0)

    def neg_h(t):
        return -affine_augmented_hamiltonian(
            t[: m * n].view(m, n), t[m * n :] if bias else None, x, p, batch, rho, delta
        )

    t0 = torch.zeros(size, dtype=DT)
    hess = torch.autograd.functional.hessian(neg_h, t0)
    grad = torch.autograd.functional.jacobian(neg_h, t0)
    sol = torch.linalg.solve(hess, -grad)
    return sol[: m * n].view(m, n), (sol[m * n :] if bias else None)


CASES = [
    # rows, batch, n_in, n_out  (rows > batch: convolution-like, several positions per sample)
    (12, 12, 5, 4),
    (6, 6, 10, 8),  # fewer rows than features on both sides: Gram is the natural route
    (20, 5, 7, 3),
    (8, 4, 3, 12),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rho,delta,bias", [(1.0, 1.0, True), (3.0, 0.3, True), (0.5, 2.0, False), (10.0, 0.1, True)])
def test_closed_form_equals_numerical_maximiser(case, rho, delta, bias):
    n_rows, batch, n_in, n_out = case
    x, p = _problem(n_rows, batch, n_in, n_out)
    ref_w, ref_b = _lbfgs_maximiser(x, p, batch, rho, delta, bias)
    exact_w, exact_b = _newton_maximiser(x, p, batch, rho, delta, bias)
    for route_in, route_out in ROUTES:
        dW, db = solve_affine_rows(x, p, batch, rho, delta, bias, route_in, route_out)
        # L-BFGS stops at |∇H̃| ~ 1e-9: agreement to ~1e-7 is all it can certify
        torch.testing.assert_close(dW, ref_w, rtol=1e-5, atol=1e-7)
        # one Newton step on the exactly quadratic H̃ (dense Hessian by autograd) is exact
        torch.testing.assert_close(dW, exact_w, rtol=1e-9, atol=1e-11)
        if bias:
            torch.testing.assert_close(db, ref_b, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(db, exact_b, rtol=1e-9, atol=1e-11)
        else:
            assert db is None


@pytest.mark.parametrize("case", CASES)
def test_routes_agree_to_rounding(case):
    x, p = _problem(*case, seed=3)
    ref, ref_b = solve_affine_rows(x, p, case[1], 2.0, 0.7, True, "primal", "primal")
    for route_in, route_out in ROUTES[1:]:
        dW, db = solve_affine_rows(x, p, case[1], 2.0, 0.7, True, route_in, route_out)
        torch.testing.assert_close(dW, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(db, ref_b, rtol=1e-10, atol=1e-12)


def test_closed_form_is_a_stationary_point_and_beats_perturbations():
    x, p = _problem(9, 3, 6, 5, seed=7)
    dW, db = solve_affine_rows(x, p, 3, 1.5, 0.4, True)
    best = affine_augmented_hamiltonian(dW, db, x, p, 3, 1.5, 0.4)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        eps_w = 1e-3 * torch.randn(dW.shape, generator=g, dtype=DT)
        eps_b = 1e-3 * torch.randn(db.shape, generator=g, dtype=DT)
        assert affine_augmented_hamiltonian(dW + eps_w, db + eps_b, x, p, 3, 1.5, 0.4) < best


@pytest.mark.parametrize("bias", [True, False])
def test_stats_route_equals_rows_route(bias):
    x, p = _problem(15, 5, 6, 4, seed=2)
    st = affine_stats(x, p, 5)
    grad_w = -(p.T @ x) / 5
    grad_b = -(p.sum(0) / 5) if bias else None
    dW, db = solve_affine_stats(grad_w, grad_b, st, 0.8, 1.3)
    ref_w, ref_b = solve_affine_rows(x, p, 5, 0.8, 1.3, bias)
    torch.testing.assert_close(dW, ref_w, rtol=1e-10, atol=1e-12)
    if bias:
        torch.testing.assert_close(db, ref_b, rtol=1e-10, atol=1e-12)


def test_rho_zero_is_a_gradient_step():
    x, p = _problem(10, 10, 4, 3)
    dW, db = solve_affine_rows(x, p, 10, 0.0, 4.0, True)
    torch.testing.assert_close(dW, (p.T @ x) / 10 / 4.0)
    torch.testing.assert_close(db, p.sum(0) / 10 / 4.0)


@pytest.mark.parametrize("n_rows,batch,n_in", [(16, 16, 40), (30, 10, 6)])
@pytest.mark.parametrize("bias", [True, False])
def test_isotropic_equals_exact_when_costate_covariance_is_isotropic(n_rows, batch, n_in, bias):
    n_out = 5
    x, _ = _problem(n_rows, batch, n_in, n_out, seed=4)
    # P̂ with orthogonal columns of equal norm: C_p = s·I exactly
    q, _ = torch.linalg.qr(torch.randn(n_rows, n_out, dtype=DT, generator=torch.Generator().manual_seed(5)))
    p = q * math.sqrt(0.3 * batch)
    torch.testing.assert_close(p.T @ p / batch, 0.3 * torch.eye(n_out, dtype=DT))
    exact = solve_affine_rows(x, p, batch, 2.0, 0.5, bias)
    iso = solve_affine_rows_isotropic(x, p, batch, 2.0, 0.5, bias)
    torch.testing.assert_close(iso[0], exact[0], rtol=1e-9, atol=1e-11)
    if bias:
        torch.testing.assert_close(iso[1], exact[1], rtol=1e-9, atol=1e-11)


def test_isotropic_is_close_when_costates_are_small():
    # the measured regime of MLPs: C_p a tiny fraction of C_x
    x, p = _problem(32, 32, 20, 6, seed=6)
    p = p * 1e-3
    exact = solve_affine_rows(x, p, 32, 1.0, 1.0, True)[0]
    iso = solve_affine_rows_isotropic(x, p, 32, 1.0, 1.0, True)[0]
    assert (iso - exact).norm() / exact.norm() < 1e-5


def test_delta_must_be_positive():
    x, p = _problem(4, 4, 3, 2)
    with pytest.raises(ValueError, match="delta"):
        solve_affine_rows(x, p, 4, 1.0, 0.0, True)


def test_eigh_psd_floor_and_reconstruction():
    a = torch.randn(6, 3, dtype=DT)
    mat = a @ a.T  # rank 3: three (numerically) zero eigenvalues
    vals, vecs = eigh_psd(mat, floor=0.0)
    assert (vals >= 0).all()
    torch.testing.assert_close(vecs @ torch.diag(vals) @ vecs.T, mat, atol=1e-10, rtol=1e-10)
    vals, _ = eigh_psd(mat, floor=0.25)
    assert vals.min() == 0.25


# ------------------------------------------------------------------------ adapters + general H̃


def _module_fn(module):
    def fn(theta, x, extra):
        return torch.func.functional_call(module, theta, (x,))

    return fn


def test_generic_hamiltonian_equals_affine_formula_for_linear():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    x, p = _problem(7, 7, 4, 3, seed=8)
    theta_k = {k: v.detach() for k, v in lin.named_parameters()}
    dW = 0.1 * torch.randn(3, 4, dtype=DT)
    db = 0.1 * torch.randn(3, dtype=DT)
    theta = {"weight": theta_k["weight"] + dW, "bias": theta_k["bias"] + db}
    fn = _module_fn(lin)
    xr = x.clone().requires_grad_(True)
    y_k = fn(theta_k, xr, None)
    gx_k = torch.autograd.grad((p * y_k).sum(), xr)[0]
    calls = [(x, p, None, y_k.detach(), gx_k)]
    generic = augmented_hamiltonian(fn, theta, theta_k, calls, 7, 1.3, 0.6)
    h_k = (p * y_k.detach()).sum() / 7  # the generic form includes H(θ_k)
    direct = affine_augmented_hamiltonian(dW, db, x, p, 7, 1.3, 0.6)
    torch.testing.assert_close(generic - h_k, direct, rtol=1e-12, atol=1e-12)


def test_iterative_maximiser_reaches_closed_form_on_linear():
    torch.manual_seed(1)
    lin = nn.Linear(5, 3).double()
    x, p = _problem(8, 8, 5, 3, seed=9)
    theta_k = {k: v.detach() for k, v in lin.named_parameters()}
    new = iterative_maximise(_module_fn(lin), theta_k, [(x, p, None)], 8, 1.0, 1.0, steps=200, lr=1.0, method="lbfgs")
    dW, db = solve_affine_rows(x, p, 8, 1.0, 1.0, True)
    # two independent implementations (generic double-backward H̃ + L-BFGS vs closed form);
    # L-BFGS's default stopping tolerance limits the agreement to ~1e-5
    torch.testing.assert_close(new["weight"] - theta_k["weight"], dW, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(new["bias"] - theta_k["bias"], db, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Conv2d(2, 3, (3, 2), stride=2, dilation=(1, 2), padding="valid"),
        nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect", bias=False),
        nn.Conv1d(2, 4, 5, stride=2, padding=2, padding_mode="circular"),
    ],
)
def test_conv_rows_reproduce_the_convolution(conv):
    conv = conv.double()
    x = torch.randn(3, 2, *((9, 8) if isinstance(conv, nn.Conv2d) else (11,)), dtype=DT)
    adapter = adapter_for(conv)
    rows = adapter.input_rows(conv, x)
    y = conv(x)
    w = conv.weight.reshape(conv.weight.shape[0], -1)
    out_rows = rows @ w.T + (conv.bias if conv.bias is not None else 0)
    torch.testing.assert_close(out_rows, adapter.output_rows(conv, y))
    assert adapter.batch_size(conv, x) == 3


def test_conv_state_penalty_and_gain_match_direct_convolution():
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    x = torch.randn(4, 2, 6, 6, dtype=DT)
    p_img = torch.randn(4, 3, 6, 6, dtype=DT)
    adapter = adapter_for(conv)
    xr, pr = adapter.input_rows(conv, x), adapter.output_rows(conv, p_img)
    dW = 0.1 * torch.randn_like(conv.weight)
    db = 0.1 * torch.randn(3, dtype=DT)
    # rho=0, delta=0: only the Hamiltonian gain; rho=1 minus the costate part: the state penalty
    gain_rows = affine_augmented_hamiltonian(dW.reshape(3, -1), db, xr, pr, 4, 0.0, 0.0)
    dy = F.conv2d(x, dW, db, padding=1)
    torch.testing.assert_close(gain_rows, (p_img * dy).sum() / 4)
    full = affine_augmented_hamiltonian(dW.reshape(3, -1), db, xr, pr, 4, 1.0, 0.0)
    costate_rows = (pr @ dW.reshape(3, -1)).pow(2).sum() / 4
    torch.testing.assert_close(full, gain_rows - 0.5 * dy.pow(2).sum() / 4 - 0.5 * costate_rows)
