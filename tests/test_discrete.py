"""Tests of pmptrain.discrete: the argmax rule against a brute-force python loop, grids, EMA, packing."""

import math

import pytest
import torch

from pmptrain.discrete import (
    Grid,
    binary_grid,
    custom_grid,
    discrete_argmax,
    discrete_msa_step,
    ema_accumulate_,
    grid_indices,
    init_scale,
    make_grid,
    nearest_on_grid,
    on_grid,
    pack_codes,
    packed_nbytes,
    penalty_scale,
    relative_lambda,
    discrete_msa_delta,
    ternary_grid,
    uniform_grid,
    unpack_codes,
)

GRIDS = {
    "binary": binary_grid(),
    "ternary": ternary_grid(),
    "2bit": uniform_grid(2),
    "4bit": uniform_grid(4),
    "custom": custom_grid([-2.0, -0.5, 0.0, 0.25, 1.5]),
}


# ------------------------------------------------------------------ brute-force reference


def brute_rho_k(w, m, values, rho, lam):
    """rho * max |M| over entries whose W is not a maximiser of M q - lam |q| (python floats)."""
    worst, empty = 0.0, True
    for wi, mi in zip(w, m):
        best = max(mi * q - lam * abs(q) for q in values)
        if mi * wi - lam * abs(wi) < best:
            empty = False
            worst = max(worst, abs(mi))
    return rho * worst, empty


def brute_argmax(w, m, values, rho_k, lam):
    """Loop over the grid: scores as in the docstring; ties keep W, then closest to W, then the
    smaller |q|, then the smaller q."""
    out = []
    for wi, mi in zip(w, m):
        scores = []
        for q in values:
            d = q - wi
            scores.append((mi * q - lam * abs(q)) - (0.5 * rho_k) * (d * d))
        best = max(scores)
        cands = [q for q, s in zip(values, scores) if s == best]
        cands.sort(key=lambda q: (abs(q - wi), abs(q), q))
        out.append(cands[0])
    return out


def random_on_grid(grid, n, gen):
    idx = torch.randint(0, len(grid), (n,), generator=gen)
    return grid.tensor(torch.float64)[idx]


# ------------------------------------------------------------------------------- grids


def test_grid_constructors_and_conventions():
    assert binary_grid().values == (-1.0, 1.0) and binary_grid().bits == 1
    assert uniform_grid(1).values == binary_grid().values
    assert ternary_grid().values == (-1.0, 0.0, 1.0) and ternary_grid().bits == 2
    assert uniform_grid(2, zero=True).values == ternary_grid().values
    assert uniform_grid(2).values == pytest.approx((-1.0, -1 / 3, 1 / 3, 1.0))
    g4 = uniform_grid(4)
    assert len(g4) == 16 and g4.bits == 4 and g4.values[0] == -1.0 and g4.values[-1] == 1.0
    diffs = [b - a for a, b in zip(g4.values, g4.values[1:])]
    assert max(diffs) - min(diffs) < 1e-12 and not g4.has_zero
    g3z = uniform_grid(3, zero=True)
    assert len(g3z) == 7 and g3z.has_zero and g3z.bits == 3
    c = custom_grid([1.5, -2, 0])
    assert c.values == (-2.0, 0.0, 1.5) and c.bits == 2
    assert make_grid("binary") == binary_grid()
    assert make_grid("Ternary") == ternary_grid()
    assert make_grid(3) == uniform_grid(3)
    assert make_grid([0.5, -0.5]).values == (-0.5, 0.5)
    assert make_grid(c) is c
    assert Grid.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "bad, word",
    [("quaternary", "levels"), (0, "bits"), (9, "bits"), ([1.0], "values"), ([1.0, 1.0], "duplicates"),
     ([0.0, float("nan")], "finite"), (True, "levels"), (object(), "levels")],
)
def test_make_grid_errors_name_argument(bad, word):
    with pytest.raises(ValueError, match=word):
        make_grid(bad)


def test_grid_direct_validation():
    with pytest.raises(ValueError, match="increasing"):
        Grid((1.0, -1.0))
    with pytest.raises(ValueError, match="bits"):
        Grid((-1.0, 0.0, 1.0), bits=1)
    with pytest.raises(ValueError, match="256"):
        custom_grid(range(300))


def test_nearest_on_grid_and_indices():
    x = torch.tensor([-3.0, -0.2, 0.0, 0.4, 0.5, 0.6, 7.0])
    assert nearest_on_grid(x, binary_grid()).tolist() == [-1, -1, 1, 1, 1, 1, 1]  # sign(0)=+1
    assert nearest_on_grid(x, ternary_grid()).tolist() == [-1, 0, 0, 0, 1, 1, 1]  # midpoint -> larger
    w = torch.tensor([-1.0, 0.0, 1.0, 1.0])
    assert grid_indices(w, ternary_grid()).tolist() == [0, 1, 2, 2]
    assert on_grid(w, ternary_grid()) and not on_grid(w, binary_grid())
    with pytest.raises(ValueError, match="not on the binary grid"):
        grid_indices(w, binary_grid())


# ------------------------------------------------------------------------------- the rule


def test_ema_accumulate_values():
    acc = torch.tensor([1e-7, -2.0, 4.0], dtype=torch.float64)
    g = torch.tensor([1.0, 2.0, -4.0], dtype=torch.float64)
    out = ema_accumulate_(acc, g, 0.75)
    assert out is acc
    assert acc.tolist() == [0.75e-7 + 0.25, -1.5 + 0.5, 3.0 - 1.0]
    ema_accumulate_(acc, g, 1.0)
    assert acc.tolist() == [0.75e-7 + 0.25, -1.0, 2.0]
    ema_accumulate_(acc, g, 0.0)
    assert acc.tolist() == g.tolist()
    with pytest.raises(ValueError, match="a: EMA rate"):
        ema_accumulate_(acc, g, 1.5)
    with pytest.raises(ValueError, match="ham_grad"):
        ema_accumulate_(acc, g[:2], 0.5)


@pytest.mark.parametrize("gname", list(GRIDS))
@pytest.mark.parametrize("lam", [0.0, 0.05])
@pytest.mark.parametrize("rho", [0.0, 0.3, 1.0, 2.0])
def test_argmax_equals_brute_force(gname, lam, rho):
    grid = GRIDS[gname]
    gen = torch.Generator().manual_seed(list(GRIDS).index(gname) * 100 + int(lam * 100) * 10 + int(rho * 10))
    n = 300
    w = random_on_grid(grid, n, gen)
    m = torch.randn(n, generator=gen, dtype=torch.float64) * 0.3
    rho_k, empty = penalty_scale(m, w, grid, rho, lam)
    ref_rho_k, ref_empty = brute_rho_k(w.tolist(), m.tolist(), grid.values, rho, lam)
    assert float(rho_k) == ref_rho_k and empty == ref_empty
    new = discrete_argmax(w, m, grid, rho_k, lam)
    assert new.tolist() == brute_argmax(w.tolist(), m.tolist(), grid.values, ref_rho_k, lam)
    assert on_grid(new, grid)
    # same through the combined step, on a 2-D tensor
    new2, stats = discrete_msa_step(w.reshape(20, 15), m.reshape(20, 15), grid, rho, lam)
    assert new2.shape == (20, 15) and new2.reshape(-1).tolist() == new.tolist()
    assert stats.flips == int((new != w).sum()) and stats.flip_ratio == stats.flips / n
    assert stats.density == float((new != 0).sum()) / n and stats.rho_k == ref_rho_k
    # the general (grid-loop) path agrees with the fast paths
    from pmptrain.discrete import _argmax_general

    assert _argmax_general(w, m, grid, float(rho_k), lam).tolist() == new.tolist()


def test_argmax_exact_ties_keep_current():
    # Binary: W=+1 flips iff -M > rho_k. With M = -rho_k exactly (dyadic numbers) it is a tie: keep.
    g = binary_grid()
    w = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    m = torch.tensor([-0.25, -0.25 - 2**-10, -0.125, 0.25, 0.5], dtype=torch.float64)
    new = discrete_argmax(w, m, g, 0.25, 0.0)
    assert new.tolist() == [1.0, -1.0, 1.0, -1.0, 1.0]
    assert new.tolist() == brute_argmax(w.tolist(), m.tolist(), g.values, 0.25, 0.0)
    # Ternary, rho_k = 0: W=0 with M = lam ties between 0 and +1 -> keep 0; W=-1 with M = lam:
    # 0 and +1 tie (both score 0) while -1 scores -2 lam: the closer one (0) is taken.
    t = ternary_grid()
    w = torch.tensor([0.0, -1.0, 1.0, 0.0], dtype=torch.float64)
    m = torch.tensor([0.5, 0.5, -0.5, -0.5], dtype=torch.float64)
    new = discrete_argmax(w, m, t, 0.0, 0.5)
    assert new.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert new.tolist() == brute_argmax(w.tolist(), m.tolist(), t.values, 0.0, 0.5)
    # Unpenalised tie is not "wrong": W=0, |M| = lam -> wrong set empty -> unchanged.
    rho_k, empty = penalty_scale(m[[0, 3]], w[[0, 3]], t, 0.5, 0.5)
    assert empty and float(rho_k) == 0.0
    # Exact tie at M = 0 for binary: both values score equal -> keep.
    assert discrete_argmax(torch.tensor([1.0, -1.0]), torch.zeros(2), g, 0.0).tolist() == [1.0, -1.0]


def test_ties_on_random_dyadic_inputs_match_brute_force():
    # Dyadic accumulators and rho on a dyadic grid make many exact ties; compare with brute force.
    gen = torch.Generator().manual_seed(0)
    for grid in [custom_grid([-1.0, -0.5, 0.0, 0.5, 1.0]), ternary_grid(), binary_grid(), uniform_grid(2, zero=True)]:
        w = random_on_grid(grid, 500, gen)
        m = torch.randint(-16, 17, (500,), generator=gen).double() / 16
        for rho_k in [0.0, 0.25, 0.5, 1.0]:
            for lam in [0.0, 0.125, 0.25]:
                new = discrete_argmax(w, m, grid, rho_k, lam)
                assert new.tolist() == brute_argmax(w.tolist(), m.tolist(), grid.values, rho_k, lam)
                ref_rho, ref_empty = brute_rho_k(w.tolist(), m.tolist(), grid.values, 0.5, lam)
                got_rho, got_empty = penalty_scale(m, w, grid, 0.5, lam)
                assert (float(got_rho), got_empty) == (ref_rho, ref_empty)


def test_binary_rho_zero_flips_every_wrong_sign_and_rho_one_freezes():
    gen = torch.Generator().manual_seed(1)
    g = binary_grid()
    w = random_on_grid(g, 1000, gen)
    m = torch.randn(1000, generator=gen, dtype=torch.float64)
    new, st = discrete_msa_step(w, m, g, 0.0)
    wrong = m * w < 0
    assert torch.equal(new, torch.where(wrong, -w, w)) and st.flips == int(wrong.sum()) and st.rho_k == 0
    for rho in [1.0, 1.5, 10.0]:
        new, st = discrete_msa_step(w, m, g, rho)
        assert torch.equal(new, w) and st.flips == 0 and not st.empty
    # rho = 0.5: flips exactly the wrong entries with |M| > 0.5 max_wrong |M|
    new, st = discrete_msa_step(w, m, g, 0.5)
    thr = 0.5 * m.abs()[wrong].max()
    assert torch.equal(new, torch.where(wrong & (m.abs() > thr), -w, w)) and st.rho_k == float(thr)


def test_empty_wrong_set_leaves_tensor_unchanged():
    g = ternary_grid()
    w = torch.tensor([[1.0, -1.0], [0.0, 1.0]])
    m = torch.tensor([[0.3, -0.2], [0.01, 0.5]])  # every W already maximises M q - lam |q| (lam=0.05)
    rho_k, empty = penalty_scale(m, w, g, 0.5, 0.05)
    assert empty and float(rho_k) == 0.0
    new, st = discrete_msa_step(w, m, g, 0.5, 0.05)
    assert torch.equal(new, w) and new is not w and st.empty and st.flips == 0 and st.density == 0.75
    assert torch.equal(discrete_argmax(w, m, g, None), w)
    # the math gives the same without the short-cut: rho_k = 0 and every W is a maximiser
    assert torch.equal(discrete_argmax(w, m, g, 0.0, 0.05), w)


def test_ternary_lambda_sparsifies():
    g = ternary_grid()
    w = torch.ones(4)
    m = torch.tensor([0.05, 0.2, -0.05, -0.2])
    new = discrete_argmax(w, m, g, 0.0, 0.1)  # |M| < lam -> 0, M > lam -> +1, M < -lam -> -1
    assert new.tolist() == [0.0, 1.0, 0.0, -1.0]


def test_uniform_grid_is_rounding_of_w_plus_m_over_rho():
    g = uniform_grid(3)
    gen = torch.Generator().manual_seed(2)
    w = random_on_grid(g, 400, gen)
    m = torch.randn(400, generator=gen, dtype=torch.float64)
    rho_k = 0.7
    new = discrete_argmax(w, m, g, rho_k, 0.0)
    expected = nearest_on_grid(w + m / rho_k, g)
    assert torch.equal(new, expected)


def test_float32_and_shapes_and_errors():
    g = binary_grid()
    w = torch.ones(3, 4, 2)
    m = -torch.rand(3, 4, 2) - 0.1
    new, st = discrete_msa_step(w, m, g, 0.0)
    assert new.dtype == torch.float32 and torch.equal(new, -w) and st.flip_ratio == 1.0
    with pytest.raises(ValueError, match="rho"):
        penalty_scale(m, w, g, -1.0)
    with pytest.raises(ValueError, match="lam"):
        penalty_scale(m, w, g, 0.5, lam=-0.1)
    with pytest.raises(ValueError, match="acc"):
        discrete_argmax(w, m[:1], g, 0.1)
    with pytest.raises(ValueError, match="rho_k"):
        discrete_argmax(w, m, g, float("nan"))


def test_init_scale():
    w = torch.tensor([[1.0, -3.0], [0.0, 0.0]])
    assert float(init_scale(w, "tensor")) == 1.0
    assert init_scale(w, "channel").tolist() == [[2.0], [1.0]]  # zero channel -> 1
    assert init_scale(torch.zeros(2, 3, 3, 3), "channel").shape == (2, 1, 1, 1)
    with pytest.raises(ValueError, match="mode"):
        init_scale(w, "row")


# ------------------------------------------------------------------------------- packing


def slow_pack(codes, bits):
    out = [0] * packed_nbytes(len(codes), bits)
    pos = 0
    for c in codes:
        for j in range(bits):
            if (c >> j) & 1:
                out[pos // 8] |= 1 << (pos % 8)
            pos += 1
    return out


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 9, 1001])
def test_pack_unpack_round_trip_vs_slow_loop(bits, n):
    gen = torch.Generator().manual_seed(bits * 10007 + n)
    codes = torch.randint(0, 2**bits, (n,), generator=gen)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    assert packed.tolist() == slow_pack(codes.tolist(), bits)
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_pack_layout_and_errors():
    assert pack_codes(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1).tolist() == [0b00001101, 1]
    assert pack_codes(torch.tensor([[3, 0], [1, 2]]), 2).tolist() == [0b10010011]
    with pytest.raises(ValueError, match="codes"):
        pack_codes(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match="codes"):
        pack_codes(torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.tensor([0]), 9)
    with pytest.raises(ValueError, match="packed"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 2, 16)


# ------------------------------------------------------------------ per-channel ρ_k, relative λ


def _brute_rows(w, m, values, rho, lam_rows):
    """Per output row: brute-force ρ_k (over that row's wrong set) and argmax; python floats."""
    rks, news, empties = [], [], []
    for i in range(w.shape[0]):
        wr, mr = w[i].reshape(-1).tolist(), m[i].reshape(-1).tolist()
        rk, empty = brute_rho_k(wr, mr, values, rho, lam_rows[i])
        rks.append(rk)
        empties.append(empty)
        news.append(brute_argmax(wr, mr, values, rk, lam_rows[i]))
    return rks, news, all(empties)


@pytest.mark.parametrize("gname", list(GRIDS))
@pytest.mark.parametrize("lam", [0.0, 0.05])
@pytest.mark.parametrize("rho", [0.0, 0.5, 0.95, 1.5])  # ρ = 1: float ties at each row max
def test_channel_scope_equals_brute_force_per_row(gname, lam, rho):
    grid = GRIDS[gname]
    gen = torch.Generator().manual_seed(7 + list(GRIDS).index(gname))
    w = random_on_grid(grid, 12 * 3 * 5, gen).reshape(12, 3, 5)  # conv-like: rows = dim 0
    m = torch.randn(12, 3, 5, generator=gen, dtype=torch.float64) * 0.3
    sgn = torch.where(m[3] >= 0, 1.0, -1.0).double()  # row 3: an empty wrong set (λ = 0): extreme codes
    m[3] = sgn * (0.1 + m[3].abs())                   # with the sign of M
    w[3] = torch.where(sgn > 0, grid.values[-1], grid.values[0])
    rk, empty = penalty_scale(m, w, grid, rho, lam, scope="channel")
    ref_rk, ref_new, ref_empty = _brute_rows(w, m, grid.values, rho, [lam] * 12)
    assert rk.shape == (12, 1, 1) and rk.reshape(-1).tolist() == ref_rk and empty == ref_empty
    if lam == 0.0:
        assert ref_rk[3] == 0.0  # that row is all right: ρ_k = 0 there, unchanged below
    new = discrete_argmax(w, m, grid, rk, lam)
    assert [new[i].reshape(-1).tolist() for i in range(12)] == ref_new
    if lam == 0.0:
        assert torch.equal(new[3], w[3])
    # the tensor scope is the max over rows
    rk_t, _ = penalty_scale(m, w, grid, rho, lam)
    assert float(rk_t) == max(ref_rk)
    if grid.values in ((-1.0, 1.0), (-1.0, 0.0, 1.0)):  # the fused rule: identical decisions and ρ_k
        delta, rk2, mx = discrete_msa_delta(w, m, grid, rho, lam, scope="channel")
        assert torch.equal(rk2, rk) and torch.equal(w + delta, new) and float(mx) == float(m.abs().max())


def test_relative_lambda_values_and_ternary_rule_with_it():
    m = torch.tensor([[0.5, -2.0, 1.0], [0.25, 0.125, -0.5]], dtype=torch.float64)
    assert float(relative_lambda(m, 0.25)) == 0.5  # 0.25 · max|M| = 0.25 · 2
    lc = relative_lambda(m, 0.25, "channel")
    assert lc.shape == (2, 1) and lc.reshape(-1).tolist() == [0.5, 0.125]
    with pytest.raises(ValueError, match="scope"):
        relative_lambda(m, 0.25, "row")
    with pytest.raises(ValueError, match="lam"):
        relative_lambda(m, -1.0)
    # ternary with a relative λ equals brute force with the numeric λ_k (per tensor and per row)
    t = ternary_grid()
    gen = torch.Generator().manual_seed(3)
    for kind in range(2):
        w = random_on_grid(t, 20 * 16, gen).reshape(20, 16)
        if kind == 0:
            m = torch.randn(20, 16, generator=gen, dtype=torch.float64)
        else:  # dyadic: exact ties with λ_k and ρ_k
            m = torch.randint(-8, 9, (20, 16), generator=gen).double() / 8
        for rho in (0.0, 0.5, 0.95):
            for lam in (0.1, 0.25, 0.5):
                lt = relative_lambda(m, lam)
                rk, _ = penalty_scale(m, w, t, rho, lt)
                ref_rk, ref_empty = brute_rho_k(w.reshape(-1).tolist(), m.reshape(-1).tolist(), t.values, rho, float(lt))
                assert float(rk) == ref_rk
                new = discrete_argmax(w, m, t, rk, lt)
                assert new.reshape(-1).tolist() == brute_argmax(w.reshape(-1).tolist(), m.reshape(-1).tolist(), t.values, ref_rk, float(lt))
                d, rk2, _ = discrete_msa_delta(w, m, t, rho, lt)
                assert float(rk2) == ref_rk and torch.equal(w + d, new)
                lc = relative_lambda(m, lam, "channel")
                rkc, _ = penalty_scale(m, w, t, rho, lc, scope="channel")
                ref_rk_c, ref_new_c, _ = _brute_rows(w, m, t.values, rho, lc.reshape(-1).tolist())
                assert rkc.reshape(-1).tolist() == ref_rk_c
                newc = discrete_argmax(w, m, t, rkc, lc)
                assert [r.tolist() for r in newc] == ref_new_c
                dc, rkc2, _ = discrete_msa_delta(w, m, t, rho, lc, scope="channel")
                assert torch.equal(rkc2, rkc) and torch.equal(w + dc, newc)


def test_fused_rule_buffers_and_scope_errors():
    g, t = binary_grid(), ternary_grid()
    gen = torch.Generator().manual_seed(5)
    w = random_on_grid(t, 60, gen).reshape(6, 10).float()
    m = torch.randn(6, 10, generator=gen)
    out, s1, s2 = torch.empty(100), torch.empty(60), torch.empty(70)
    d, rk, _ = discrete_msa_delta(w, m, t, 0.5, 0.1, out=out, scratch=(s1, s2))
    d_ref, rk_ref, _ = discrete_msa_delta(w, m, t, 0.5, 0.1)
    assert torch.equal(d, d_ref) and torch.equal(rk, rk_ref) and d.data_ptr() == out.data_ptr()
    wb = torch.where(w >= 0, 1.0, -1.0)
    d, _, _ = discrete_msa_delta(wb, m, g, 0.5, out=out)
    assert torch.equal(wb + d, discrete_argmax(wb, m, g, penalty_scale(m, wb, g, 0.5)[0])) and d.data_ptr() == out.data_ptr()
    with pytest.raises(ValueError, match="buffer"):
        discrete_msa_delta(w, m, t, 0.5, out=torch.empty(10))
    with pytest.raises(ValueError, match="scope"):
        discrete_msa_delta(w, m, t, 0.5, scope="row")
    with pytest.raises(ValueError, match="scope"):
        penalty_scale(m[0], w[0], t, 0.5, scope="channel")  # 1-D: no channels
    with pytest.raises(ValueError, match="rho_k"):
        discrete_argmax(w, m, t, torch.ones(5, 1))


def test_ema_accumulate_into_a_buffer_equals_the_in_place_form_bit_for_bit():
    from pmptrain.discrete import ema_accumulate
    g = torch.Generator().manual_seed(4)
    acc, grad = torch.randn(257, generator=g), torch.randn(257, generator=g) * 1e-3
    before = acc.clone()
    out = torch.empty_like(acc)
    res = ema_accumulate(acc, grad, 0.999, out=out)
    assert res is out and torch.equal(acc, before)
    assert torch.equal(res, ema_accumulate_(acc.clone(), grad.neg(), 0.999))
    with pytest.raises(ValueError, match="loss_grad"):
        ema_accumulate(acc, grad[:3], 0.9, out=out)
    with pytest.raises(ValueError, match="EMA rate"):
        ema_accumulate(acc, grad, 1.5, out=out)
