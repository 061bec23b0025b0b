"""The closed-form maximisers against slow, obviously-correct references (float64).

References: a dense (mn)×(mn) Kronecker solve of the Sylvester equation, and a Newton step (autograd
Hessian) or L-BFGS on the augmented Hamiltonian written from its definition — with a linear term
``G`` that is *not* the one the captured rows would give (as after clipping or accumulation).
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pmptrain.hamiltonian import (
    AffineMember,
    Curvature,
    affine_augmented_hamiltonian,
    affine_bias_steps,
    affine_system,
    augmented_hamiltonian,
    dense_sylvester_reference,
    eigh_psd,
    iterative_maximise,
    solve_sylvester,
)
from pmptrain.modules import adapter_for

DT = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _curvature(kind, k, n_rows, seed):
    g = _gen(seed)
    if kind == "scalar":
        return Curvature(k, scalar=0.7)
    if kind == "zero":
        return Curvature(k)
    if kind == "diag":
        d = torch.rand(k, generator=g, dtype=DT)
        d[0] = 0.0  # exact zeros: untouched embedding rows
        return Curvature(k, diag=d)
    if kind == "dense":
        a = torch.randn(k + 3, k, generator=g, dtype=DT)
        return Curvature(k, dense=a.T @ a / 5)
    if kind == "gram":
        return Curvature(k, rows=torch.randn(n_rows, k, generator=g, dtype=DT) / 2)
    if kind == "gram+shift":
        return Curvature(k, rows=torch.randn(n_rows, k, generator=g, dtype=DT) / 2, scalar=0.3)
    if kind == "rank-deficient gram":
        r = torch.randn(2, k, generator=g, dtype=DT)
        return Curvature(k, rows=torch.cat([r, r, 2 * r]))  # repeated rows: zero Gram eigenvalues
    if kind == "diag+gram":
        return Curvature(k, diag=torch.rand(k, generator=g, dtype=DT)) + Curvature(
            k, rows=torch.randn(n_rows, k, generator=g, dtype=DT))
    raise AssertionError(kind)


KINDS = ["scalar", "zero", "diag", "dense", "gram", "gram+shift", "rank-deficient gram", "diag+gram"]


@pytest.mark.parametrize("left,right", list(itertools.product(KINDS, KINDS)))
@pytest.mark.parametrize("n_rows", [3, 12])
def test_every_sylvester_route_equals_the_dense_solve(left, right, n_rows):
    m, n = 7, 9
    s = torch.randn(m, n, generator=_gen(1), dtype=DT)
    lc, rc = _curvature(left, m, n_rows, 2), _curvature(right, n, n_rows, 3)
    got = solve_sylvester(s, lc, rc, 0.8, 0.5)
    ref = dense_sylvester_reference(s, lc.to_dense(s), rc.to_dense(s), 0.8, 0.5)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    # overwrite_s: the same numbers, bit for bit (S may be used as the output buffer)
    assert torch.equal(solve_sylvester(s.clone(), lc, rc, 0.8, 0.5, overwrite_s=True), got)


def test_curvature_addition_stacks_gram_rows():
    a, b = _curvature("gram", 5, 4, 1), _curvature("dense", 5, 4, 2)
    s = torch.zeros(2, 5, dtype=DT)
    torch.testing.assert_close((a + a).to_dense(s), 2 * a.to_dense(s))
    assert (a + a).kind() == "gram" and (a + b).kind() == "dense"
    torch.testing.assert_close((a + b).to_dense(s), a.to_dense(s) + b.to_dense(s))


def test_delta_must_be_positive():
    s = torch.ones(2, 3, dtype=DT)
    with pytest.raises(ValueError, match="delta"):
        solve_sylvester(s, Curvature(2), Curvature(3), 1.0, 0.0)


# ------------------------------------------------------------------------------ affine modules


def _rows(n_rows, n_in, n_out, seed, shift=0.5):
    g = _gen(seed)
    x = torch.randn(n_rows, n_in, generator=g, dtype=DT) + shift  # non-zero mean: bias coupling
    p = torch.randn(n_rows, n_out, generator=g, dtype=DT)
    return x, p


def _member(form, x, p, batch, grad_b=None, delta_b=None):
    """An AffineMember of rows X, costates P̂ in the requested storage form."""
    b = float(batch)
    kw = dict(samples=b, rows_per_sample=x.shape[0] / b, grad_b=grad_b, delta_b=delta_b)
    state = dict(x_rows=x) if form[0] == "rows" else dict(cxx=x.T @ x / b)
    if form[1] == "rows":
        costate = dict(p_rows=p / math.sqrt(b))
    elif form[1] == "dense":
        costate = dict(cpp=p.T @ p / b)
    else:
        costate = dict(tau=float(p.pow(2).sum()) / (b * p.shape[1]))
    return AffineMember(**kw, **state, **costate, x_mean=x.sum(0) / b)


def _solve_member(form, x, p, batch, gw, gb, rho, dw_delta, db_delta):
    mb = _member(form, x, p, batch, gb, db_delta if gb is not None else None)
    s, left, right = affine_system(gw, [mb], rho)
    dw = solve_sylvester(s, left, right, rho, dw_delta)
    return dw, affine_bias_steps(dw, [mb], rho)[0]


def _newton(objective, shapes):
    """Maximiser of an exactly quadratic objective by one Newton step (dense autograd Hessian)."""
    sizes = [math.prod(s) for s in shapes]
    t0 = torch.zeros(sum(sizes), dtype=DT)

    def split(t):
        out, i = [], 0
        for s, k in zip(shapes, sizes):
            out.append(t[i:i + k].view(s))
            i += k
        return out

    def neg(t):
        return -objective(*split(t))

    hess = torch.autograd.functional.hessian(neg, t0)
    grad = torch.autograd.functional.jacobian(neg, t0)
    return split(torch.linalg.solve(hess, -grad))


CASES = [
    # rows, batch, n_in, n_out (rows > batch: convolution-like, several positions per sample)
    (12, 12, 5, 4),
    (6, 6, 10, 8),  # fewer rows than features on both sides: the Gram forms
    (20, 5, 7, 3),
    (8, 4, 3, 12),
]
FORMS = [("rows", "rows"), ("rows", "dense"), ("dense", "rows"), ("dense", "dense")]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rho,delta,delta_b,bias", [(1.0, 1.0, 1.0, True), (3.0, 0.3, 2.0, True),
                                                    (0.5, 2.0, None, False), (10.0, 0.1, 0.05, True)])
def test_closed_form_with_any_gradient_equals_the_numerical_maximiser(case, rho, delta, delta_b, bias):
    n_rows, batch, n_in, n_out = case
    x, p = _rows(n_rows, n_in, n_out, seed=0)
    g = _gen(11)
    gw = torch.randn(n_out, n_in, generator=g, dtype=DT)  # not −P̂ᵀX/B: an edited gradient
    gb = torch.randn(n_out, generator=g, dtype=DT) if bias else None

    def h(dw, *db):
        return affine_augmented_hamiltonian(dw, db[0] if db else None, x, p, batch, rho, delta, gw, gb, delta_b)

    ref = _newton(h, [(n_out, n_in)] + ([(n_out,)] if bias else []))
    for form in FORMS:
        dw, db = _solve_member(form, x, p, batch, gw, gb, rho, delta, delta_b)
        torch.testing.assert_close(dw, ref[0], rtol=1e-9, atol=1e-11)
        if bias:
            torch.testing.assert_close(db, ref[1], rtol=1e-9, atol=1e-11)
        else:
            assert db is None


def test_closed_form_agrees_with_lbfgs_and_beats_perturbations():
    x, p = _rows(9, 6, 5, seed=7)
    g = _gen(3)
    gw, gb = torch.randn(5, 6, generator=g, dtype=DT), torch.randn(5, generator=g, dtype=DT)
    dw, db = _solve_member(("rows", "rows"), x, p, 3, gw, gb, 1.5, 0.4, 0.4)
    w = torch.zeros(5, 6, dtype=DT, requires_grad=True)
    b = torch.zeros(5, dtype=DT, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -affine_augmented_hamiltonian(w, b, x, p, 3, 1.5, 0.4, gw, gb)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    torch.testing.assert_close(dw, w.detach(), rtol=1e-5, atol=1e-7)
    best = affine_augmented_hamiltonian(dw, db, x, p, 3, 1.5, 0.4, gw, gb)
    for _ in range(20):
        ew, eb = 1e-3 * torch.randn(dw.shape, generator=g, dtype=DT), 1e-3 * torch.randn(5, generator=g, dtype=DT)
        assert affine_augmented_hamiltonian(dw + ew, db + eb, x, p, 3, 1.5, 0.4, gw, gb) < best


def test_captured_gradient_is_the_default_linear_term():
    x, p = _rows(10, 4, 3, seed=2)
    gw, gb = -(p.T @ x) / 10, -p.sum(0) / 10
    dw, db = torch.randn(3, 4, dtype=DT), torch.randn(3, dtype=DT)
    torch.testing.assert_close(affine_augmented_hamiltonian(dw, db, x, p, 10, 1.0, 1.0),
                               affine_augmented_hamiltonian(dw, db, x, p, 10, 1.0, 1.0, gw, gb))


def test_rho_zero_is_a_gradient_step():
    x, p = _rows(10, 4, 3, seed=5)
    gw, gb = torch.randn(3, 4, dtype=DT), torch.randn(3, dtype=DT)
    dw, db = _solve_member(("rows", "rows"), x, p, 10, gw, gb, 0.0, 4.0, 2.0)
    torch.testing.assert_close(dw, -gw / 4.0)
    torch.testing.assert_close(db, -gb / 2.0)


@pytest.mark.parametrize("n_rows,batch,n_in", [(16, 16, 40), (30, 10, 6)])
@pytest.mark.parametrize("bias", [True, False])
def test_isotropic_equals_exact_when_costate_covariance_is_isotropic(n_rows, batch, n_in, bias):
    n_out = 5
    x, _ = _rows(n_rows, n_in, n_out, seed=4)
    q, _ = torch.linalg.qr(torch.randn(n_rows, n_out, dtype=DT, generator=_gen(5)))
    p = q * math.sqrt(0.3 * batch)  # orthogonal columns of equal norm: C_p = 0.3·I exactly
    torch.testing.assert_close(p.T @ p / batch, 0.3 * torch.eye(n_out, dtype=DT))
    gw, gb = torch.randn(n_out, n_in, dtype=DT, generator=_gen(6)), (torch.randn(n_out, dtype=DT) if bias else None)
    exact = _solve_member(("rows", "rows"), x, p, batch, gw, gb, 2.0, 0.5, 0.5)
    for state in ("rows", "dense"):
        iso = _solve_member((state, "iso"), x, p, batch, gw, gb, 2.0, 0.5, 0.5)
        torch.testing.assert_close(iso[0], exact[0], rtol=1e-9, atol=1e-11)
        if bias:
            torch.testing.assert_close(iso[1], exact[1], rtol=1e-9, atol=1e-11)


def test_isotropic_is_close_when_costates_are_small():
    # the measured regime of MLPs: C_p a tiny fraction of C_x
    x, p = _rows(32, 20, 6, seed=6)
    p = p * 1e-3
    gw = -(p.T @ x) / 32
    exact = _solve_member(("rows", "rows"), x, p, 32, gw, None, 1.0, 1.0, None)[0]
    iso = _solve_member(("rows", "iso"), x, p, 32, gw, None, 1.0, 1.0, None)[0]
    assert (iso - exact).norm() / exact.norm() < 1e-5


# ---------------------------------------------------------------------- embeddings and ties


def _embedding_problem(v=9, d=4, batch=3, t=5, seed=0):
    g = _gen(seed)
    idx = torch.randint(0, v - 2, (batch, t), generator=g)  # the last two rows are never touched
    onehot = F.one_hot(idx.reshape(-1), v).to(DT)
    return idx, onehot


def test_embedding_step_equals_the_numerical_maximiser():
    """An embedding is a Linear ``y = Eᵀ e_i`` on one-hot states; its costate penalty is absent
    (the input is not differentiable), so H̃ is diagonal in the rows of E."""
    v, d, batch = 9, 4, 3
    idx, onehot = _embedding_problem(v, d, batch)
    ge = torch.randn(v, d, generator=_gen(1), dtype=DT)
    ge[-2:] = 0.0  # untouched rows have no gradient
    rho, delta = 1.3, 0.7
    zeros_p = torch.zeros(onehot.shape[0], d, dtype=DT)

    def h(de):  # W = Eᵀ: ΔW = ΔEᵀ, x = one-hot
        return affine_augmented_hamiltonian(de.T, None, onehot, zeros_p, batch, rho, delta, ge.T)

    (ref,) = _newton(h, [(v, d)])
    mb = AffineMember(float(batch), idx.shape[1], True, counts=onehot.sum(0) / batch)
    s, left, right = affine_system(ge, [mb], rho)
    assert left.kind() == "diag"
    got = solve_sylvester(s, left, right, rho, delta)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(got[-2:], torch.zeros(2, d, dtype=DT))


@pytest.mark.parametrize("costate", ["rows", "dense", "iso"])
@pytest.mark.parametrize("bias", [False, True])
def test_tied_embedding_and_output_layer_are_maximised_jointly(costate, bias):
    """Embedding E (V×d) and an output Linear with weight E: one quadratic, the sum of both
    augmented Hamiltonians, one proximal term, the summed gradient."""
    v, d, batch, t = 9, 4, 3, 5
    idx, onehot = _embedding_problem(v, d, batch, t, seed=2)
    n = batch * t
    h_rows, p_rows = _rows(n, d, v, seed=3)  # output layer: inputs h (d), costates p̂ (V)
    if costate == "iso":  # make C_p isotropic so that the approximation is exact
        q, _ = torch.linalg.qr(torch.randn(n, v, dtype=DT, generator=_gen(4)))
        p_rows = q * math.sqrt(0.2 * batch)
    g_total = torch.randn(v, d, generator=_gen(5), dtype=DT)
    gb = torch.randn(v, generator=_gen(6), dtype=DT) if bias else None
    rho, delta, delta_b = 0.9, 0.6, 1.4

    def h(de, *db):
        lin = affine_augmented_hamiltonian(de, db[0] if db else None, h_rows, p_rows, batch, rho, delta, g_total,
                                           gb, delta_b)
        emb_state = (onehot @ de).pow(2).sum() / batch  # ‖ΔEᵀ e_i‖² summed over rows
        return lin - 0.5 * rho * emb_state

    ref = _newton(h, [(v, d)] + ([(v,)] if bias else []))
    lin = _member(("rows", costate), h_rows, p_rows, batch, gb, delta_b if bias else None)
    emb = AffineMember(float(batch), float(t), True, counts=onehot.sum(0) / batch)
    s, left, right = affine_system(g_total, [lin, emb], rho)
    got = solve_sylvester(s, left, right, rho, delta)
    torch.testing.assert_close(got, ref[0], rtol=1e-9, atol=1e-11)
    if bias:
        torch.testing.assert_close(affine_bias_steps(got, [lin, emb], rho)[0], ref[1], rtol=1e-9, atol=1e-11)


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
    x, p = _rows(7, 4, 3, seed=8)
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


@pytest.mark.parametrize("edited", [False, True])
def test_iterative_maximiser_reaches_closed_form_on_linear(edited):
    torch.manual_seed(1)
    lin = nn.Linear(5, 3).double()
    x, p = _rows(8, 5, 3, seed=9)
    theta_k = {k: v.detach() for k, v in lin.named_parameters()}
    gw, gb = -(p.T @ x) / 8, -p.sum(0) / 8
    if edited:  # e.g. a clipped gradient: the linear term comes from it, the curvature from the rows
        gw, gb = 0.3 * gw + 0.01, 0.3 * gb
    new = iterative_maximise(_module_fn(lin), theta_k, [(x, p, None)], 8, 1.0, 1.0, steps=200, lr=1.0,
                             method="lbfgs", ham_grad={"weight": -gw, "bias": -gb})
    dW, db = _solve_member(("rows", "rows"), x, p, 8, gw, gb, 1.0, 1.0, 1.0)
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


def test_embedding_adapter_and_unsupported_reasons():
    from pmptrain.modules import unsupported_reason

    emb = nn.Embedding(7, 3)
    ad = adapter_for(emb)
    assert ad.transposed and ad.index_input and ad.weight_shape_2d(emb) == (3, 7)
    idx = torch.tensor([[1, 2, 2], [0, 6, 1]])
    assert ad.batch_size(emb, idx) == 6 and ad.input_rows(emb, idx).tolist() == [1, 2, 2, 0, 6, 1]
    assert "sparse" in unsupported_reason(nn.Embedding(7, 3, sparse=True))
    assert "max_norm" in unsupported_reason(nn.Embedding(7, 3, max_norm=1.0))
    assert adapter_for(nn.Conv2d(4, 4, 3, groups=2)).kind == "grouped"
    assert unsupported_reason(nn.ConvTranspose2d(4, 4, 3)) is None and adapter_for(nn.ConvTranspose2d(4, 4, 3)) is None

    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) ** 2

    assert "overrides Linear.forward" in unsupported_reason(Custom(2, 2)) and "register_module_type" in \
        unsupported_reason(Custom(2, 2))
    assert adapter_for(Custom(2, 2)) is None and unsupported_reason(nn.ReLU()) is None


def test_spd_solve_right_equals_the_inverse_and_falls_back_on_a_singular_matrix():
    from pmptrain.hamiltonian import _spd_solve_right
    g = _gen(7)
    a = torch.randn(6, 5, generator=g, dtype=DT)
    mat = a.T @ a + 0.5 * torch.eye(5, dtype=DT)
    b = torch.randn(3, 5, generator=g, dtype=DT)
    torch.testing.assert_close(_spd_solve_right(b, mat), b @ torch.linalg.inv(mat), rtol=1e-12, atol=1e-12)
    sing = torch.zeros(5, 5, dtype=DT)
    sing[:2, :2] = mat[:2, :2]  # rank 2: the LU solve reports it, the eigendecomposition takes over
    out = _spd_solve_right(b, sing)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :2], b[:, :2] @ torch.linalg.inv(mat[:2, :2]), rtol=1e-10, atol=1e-10)
