"""Numerical edge cases: empty batches, rank-1 statistics, float16 fallbacks, out-of-range ρ/lr."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pmptrain
from pmptrain import hamiltonian as H
from pmptrain.bench.models import build_model

from helpers import ExpScale, assert_same

EMPTY = "empty batch (zero samples)"


# ------------------------------------------------------------------------------ empty batches


def _mlp_prelu():
    return nn.Sequential(nn.Linear(5, 4), ExpScale(), nn.Linear(4, 3))


def _grouped_conv():
    return nn.Sequential(nn.Conv2d(2, 4, 3, groups=2, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 3))


def _binary_mlp():
    m = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    pmptrain.discretize_(m, "binary", keep=None)
    return m


def _gpt():
    return build_model("gpt", (6,), 16, n_layer=1, n_head=2, n_embd=8)


EMPTY_CASES = {
    # an Adam-fallback parameter (ExpScale) moved on an empty batch (momentum), weight decay shrank
    "emsa-prelu-decay": (_mlp_prelu, lambda m: pmptrain.EMSA(m, weight_decay=0.1), (5,)),
    # the backward pass of a grouped convolution raised on an empty batch
    "grouped-conv": (_grouped_conv, lambda m: pmptrain.EMSA(m), (2, 4, 4)),
    # the costate-scaled rho raised ValueError (no costate statistic) on an empty batch
    "gpt-costate": (_gpt, lambda m: pmptrain.EMSA(m, rho_scale="costate"), None),
    # nothing is captured (rho = 0): the root's input tells the empty batch
    "msa-prelu": (_mlp_prelu, lambda m: pmptrain.MSA(m, weight_decay=0.1), (5,)),
    "binaryconnect": (_binary_mlp, lambda m: pmptrain.BinaryConnect(m), (5,)),
    "discrete-msa": (_binary_mlp, lambda m: pmptrain.DiscreteMSA(m), (5,)),
}


def _loss(model, shape, b, gen):
    if shape is None:  # the GPT: token ids [B, T], next-token targets
        x = torch.randint(0, 16, (b, 6), generator=gen)
        out = model(x)
        return F.cross_entropy(out.reshape(-1, 16), torch.randint(0, 16, (b * 6,), generator=gen), reduction="sum")
    x = torch.randn(b, *shape, generator=gen)
    return F.cross_entropy(model(x), torch.randint(0, 3, (b,), generator=gen), reduction="sum")


@pytest.mark.parametrize("case", sorted(EMPTY_CASES))
def test_empty_batch_is_skipped_counted_and_changes_nothing(case):
    make, build, shape = EMPTY_CASES[case]
    torch.manual_seed(0)
    model = make()
    twin = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt, opt_twin = build(model), build(twin)
    gen, gen_twin = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for o, m, g in ((opt, model, gen), (opt_twin, twin, gen_twin)):  # one ordinary step each
        o.zero_grad()
        _loss(m, shape, 4, g).backward()
        o.step()
    def params(m):  # the optimizer's part of the model (a BatchNorm's forward moves its buffers)
        return {n: p.detach().clone() for n, p in m.named_parameters()}

    before_w = params(model)
    before_s = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    _loss(model, shape, 0, torch.Generator().manual_seed(2)).backward()
    opt.step()
    assert opt.skipped_steps == 1
    assert opt.last_step["skipped"] and opt.last_step["skip_reason"] == EMPTY
    assert_same(params(model), before_w)
    sd = opt.state_dict()
    sd["pmptrain"]["skipped_steps"] = 0
    assert_same(sd, before_s)
    # the next step is exactly the one of an optimizer that never saw the empty batch
    for o, m, g in ((opt, model, gen), (opt_twin, twin, gen_twin)):
        o.zero_grad()
        _loss(m, shape, 4, g).backward()
        o.step()
    assert not opt.last_step["skipped"]
    assert_same(params(model), params(twin))


def test_zero_gradient_of_a_nonempty_batch_is_not_skipped():
    torch.manual_seed(0)
    model = _mlp_prelu()
    opt = pmptrain.EMSA(model)
    opt.zero_grad()
    (model(torch.randn(4, 5)) * 0.0).sum().backward()
    opt.zero_grad(set_to_none=False)  # zeroed gradients, statistics dropped: an ordinary step
    (model(torch.randn(4, 5)) * 0.0).sum().backward()
    opt.step()
    assert opt.skipped_steps == 0 and not opt.last_step["skipped"]


# ------------------------------------------------------------------- rank-1 / batch-of-1 statistics


def _eig_reference_step(x, p, gw, gb, rho, delta):
    """The float64 maximiser of one Linear's augmented Hamiltonian (B = 1, L = 1: C_x = xxᵀ,
    C_p = ppᵀ), written out independently of pmptrain: bias eliminated, then the Sylvester
    equation solved in the eigenbases of both sides."""
    x, p, gw, gb = (t.double() for t in (x, p, gw, gb))
    c = rho / (rho + delta)
    cx = torch.outer(x, x) * (1.0 - c)
    cp = torch.outer(p, p)
    s = -gw + c * torch.outer(gb, x)
    mu, v = torch.linalg.eigh(cp)
    lam, u = torch.linalg.eigh(cx)
    dw = v @ ((v.T @ s @ u) / (rho * (mu.clamp_min(0)[:, None] + lam.clamp_min(0)[None, :]) + delta)) @ u.T
    db = (-gb - rho * dw @ x) / (rho + delta)
    return dw, db


def test_batch_of_one_float32_primal_route_is_solved_not_skipped():
    """A conv + BatchNorm net, one constant image, lr = 1e3, the primal route: the head's C_x is
    the rank-1 1024×1024 xxᵀ, on which MKL's float32 eigensolver returns NaN at 2 threads (it
    raised at 1). The step was skipped as 'non-finite statistics'; it is now the float64 solve."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 64, 10))
    head = model[4]
    opt = pmptrain.EMSA(model, lr=1e3, route="primal", max_step=None)  # the exact solve, unguarded
    seen = {}

    def record(module, args, out):
        seen["x"] = args[0].detach()[0]
        out.register_hook(lambda g: seen.update(g=g.detach()[0]))

    head.register_forward_hook(record)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        F.cross_entropy(model(torch.ones(1, 8, 8, 8)), torch.tensor([3])).backward()
        w0, b0 = head.weight.detach().clone(), head.bias.detach().clone()
        gw, gb = head.weight.grad.clone(), head.bias.grad.clone()
        opt.step()
    finally:
        torch.set_num_threads(threads)
    assert opt.skipped_steps == 0 and not opt.last_step["skipped"]
    dw_ref, db_ref = _eig_reference_step(seen["x"], -1.0 * seen["g"], gw, gb, 1.0, 1e-3)
    dw, db = head.weight.detach() - w0, head.bias.detach() - b0
    assert torch.allclose(dw.double(), dw_ref, rtol=1e-3, atol=1e-5 * dw_ref.abs().max().item())
    assert torch.allclose(db.double(), db_ref, rtol=1e-3, atol=1e-5 * db_ref.abs().max().item())


def test_eigh_psd_retries_a_silent_nan_in_float64(monkeypatch):
    real = torch.linalg.eigh
    calls = []

    def flaky(m):  # the failure mode of LAPACK's float32 divide and conquer: NaN, no error
        calls.append(m.dtype)
        ev, vec = real(m)
        return (ev * float("nan"), vec) if m.dtype == torch.float32 else (ev, vec)

    x = torch.randn(6, 1)
    mat = x @ x.T  # rank 1
    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    ev, vec = H.eigh_psd(mat)
    assert calls == [torch.float32, torch.float64]
    assert ev.dtype == torch.float32 and torch.isfinite(ev).all() and torch.isfinite(vec).all()
    ref = real(0.5 * (mat + mat.T).double())[0].clamp_min(0).float()
    assert torch.equal(ev, ref)
    assert torch.allclose(vec @ torch.diag(ev) @ vec.T, mat, atol=1e-5)
    with pytest.raises(torch.linalg.LinAlgError, match="non-finite"):
        H.eigh_psd(torch.full((3, 3), float("nan")))


def test_spd_solve_falls_back_to_eigh_on_a_non_finite_lu(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=gen)
    mat = a @ a.T + torch.eye(5)
    b = torch.randn(3, 5, generator=gen)
    real = torch.linalg.solve_ex
    monkeypatch.setattr(torch.linalg, "solve_ex",
                        lambda m, r: (real(m, r)[0] * float("inf"), torch.zeros((), dtype=torch.int32)))
    out = H._spd_solve_right(b, mat)
    ref = torch.linalg.solve(mat.double(), b.double().T).T
    assert torch.allclose(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_two_sided_gram_solve_at_the_rho_bound_is_finite_and_exact():
    """ρ = 2**64 on tiny statistics (ρC = O(1), a well-conditioned system): ρ² = 2**128 is beyond
    float32, which made the two-sided Gram route NaN."""
    gen = torch.Generator().manual_seed(0)
    m, n, rows = 7, 9, 3
    p = torch.randn(rows, m, generator=gen) * 2.0 ** -32
    a = torch.randn(rows, n, generator=gen) * 2.0 ** -32
    s = torch.randn(m, n, generator=gen)
    rho = 2.0 ** 64
    out = H.solve_sylvester(s, H.Curvature(m, rows=p), H.Curvature(n, rows=a), rho, 1.0)
    pd, ad = p.double(), a.double()
    ref = H.dense_sylvester_reference(s.double(), pd.T @ pd, ad.T @ ad, rho, 1.0)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------- float16 parameters


def test_float16_adam_fallback_trains_like_float32():
    """ε = 1e-8 is 0 in float16 (and g² underflows): the Adam fallback of a float16 parameter was 0/0
    on every step, and every step was skipped. It now computes in float32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), ExpScale(6, init=0.25), nn.Linear(6, 3)).half()
    prelu = model[1].weight
    opt = pmptrain.EMSA(model, fallback_lr=1e-2)
    ref = prelu.detach().float().clone().requires_grad_(True)
    adam = torch.optim.Adam([ref], lr=1e-2, eps=1e-8)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        x = torch.randn(16, 4, generator=gen).half()
        y = torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x).float(), y).backward()
        ref.grad = prelu.grad.float()
        adam.step()
        opt.step()
        assert not opt.last_step["skipped"], opt.last_step["skip_reason"]
        # the float32 Adam trajectory, rounded to float16 once per step
        ref.data.copy_(ref.data.half().float())
        assert torch.equal(prelu.detach(), ref.detach().half())
    assert opt.skipped_steps == 0
    st = opt.state_of(prelu)
    assert st.exp_avg.dtype == torch.float32 and st.exp_avg_sq.dtype == torch.float32


def test_float16_latent_adam_keeps_float32_latents():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).half()
    pmptrain.discretize_(model, "binary", keep=None)
    opt = pmptrain.BinaryConnect(model, lr=1e-2)
    x, y = torch.randn(16, 4).half(), torch.randint(0, 3, (16,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x).float(), y).backward()
        opt.step()
    assert opt.skipped_steps == 0
    st = opt.state_of(model[0].weight)
    assert st.latent.dtype == torch.float32
    assert torch.equal(model[0].weight.detach(), torch.where(st.latent >= 0, 1.0, -1.0).half())


def test_a_run_of_skipped_steps_warns_once_and_rearms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    opt = pmptrain.EMSA(model)
    n = opt.SKIP_WARN_AFTER

    def step(bad):
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        if bad:
            model[0].weight.grad[0, 0] = float("nan")
        opt.step()

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(2 * n):
            step(True)
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and f"last {n} steps were all skipped" in msgs[0] and "non-finite gradient" in msgs[0]
    assert opt.skipped_steps == 2 * n
    step(False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(n - 1):
            step(True)
        assert not [w for w in rec if issubclass(w.category, RuntimeWarning)]
        step(True)
        assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1


# ------------------------------------------------------------------------- ρ and lr bounds


@pytest.mark.parametrize("kw,key", [
    (dict(rho=3.5e38), "rho"), (dict(rho=1e300), "rho"), (dict(rho=2.0 ** 64 * 1.01), "rho"),
    (dict(rho=float("inf")), "rho"), (dict(lr=1e-30), "lr"), (dict(lr=1e20), "lr"),
    (dict(fallback_lr=1e39), "fallback_lr"), (dict(eig_floor=1e300), "eig_floor"),
    (dict(solver="iterative", rho=1e300), "rho"),
])
def test_out_of_range_penalties_are_refused(kw, key):
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=rf"invalid {key}=.*2\*\*64"):
        pmptrain.EMSA(model, **kw)
    opt = pmptrain.EMSA(model)
    with pytest.raises(ValueError, match=rf"invalid {key}="):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], **kw})
    # written into a group directly: refused before the step changes anything
    opt.param_groups[0].update(kw)
    w = model[0].weight.detach().clone()
    model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(ValueError, match=rf"invalid {key}="):
        opt.step()
    assert torch.equal(model[0].weight, w)


def test_discrete_msa_emsa_rho_is_bounded_like_rho():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    pmptrain.discretize_(model, "binary")
    with pytest.raises(ValueError, match=r"invalid emsa_rho=1e\+300"):
        pmptrain.DiscreteMSA(model, continuous="emsa", emsa_rho=1e300)


@pytest.mark.parametrize("kw", [dict(rho=2.0 ** 64), dict(lr=2.0 ** -64), dict(lr=0.0), dict(rho=0.0)])
def test_the_bounds_themselves_are_accepted_and_step(kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    opt = pmptrain.EMSA(model, **kw)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 4, (8,))).backward()
        opt.step()
    assert opt.skipped_steps == 0
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert math.isfinite(opt.last_step["hamiltonian_gain"])
