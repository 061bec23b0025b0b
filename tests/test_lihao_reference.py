"""Li & Hao's released code (LiQianxiao/discrete-MSA) as named options, and their presets.

Each option is checked against what the reference does (layers.py, utils.py, the notebooks):
BatchNorm init and eps, the pool-before-BN layer order, the uniform accumulator init, the ternary
"wrong set" W != sign(M) (against a literal NumPy transcription of the reference update), the
sparsity convention, the presets' settings, and the MNIST protocol end to end through the download
path with small generated IDX files.
"""

import hashlib
import json

import numpy as np
import pytest
import torch
from torch import nn

import pmptrain
from pmptrain import discrete as D
from pmptrain.bench import cli
from pmptrain.bench import data as bench_data
from pmptrain.bench.models import build_model, ref_mlp, ref_vgg
from pmptrain.export import density, summary

from test_bench_data import write_idx_set


# ------------------------------------------------------------------------- BatchNorm init, order


def _bns(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_ref_mlp_bn_init_reference_is_truncated_normal_with_eps_1e4():
    torch.manual_seed(0)
    m = ref_mlp(widths=(2048, 2048, 2048), bn_init="reference")
    bns = _bns(m)
    assert len(bns) == 4 and all(b.eps == 1e-4 for b in bns)
    vals = torch.cat([torch.cat([b.weight.detach(), b.bias.detach()]) for b in bns])
    assert vals.numel() == 2 * (3 * 2048 + 10)
    assert float(vals.abs().max()) <= 2.0
    # N(0, 1) truncated to [-2, 2]: mean 0, std 0.8796
    assert abs(float(vals.mean())) < 0.03 and abs(float(vals.std()) - 0.8796) < 0.02
    assert float((vals < 0).float().mean()) == pytest.approx(0.5, abs=0.02)
    torch.manual_seed(0)
    again = ref_mlp(widths=(2048, 2048, 2048), bn_init="reference")
    assert all(torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) for a, b in zip(bns, _bns(again)))
    # default: torch's 1 / 0 / 1e-5; an explicit eps overrides
    d = ref_mlp(widths=(8,))
    assert all(b.eps == 1e-5 and bool((b.weight == 1).all()) and bool((b.bias == 0).all()) for b in _bns(d))
    assert all(b.eps == 1e-3 for b in _bns(ref_mlp(widths=(8,), bn_init="reference", bn_eps=1e-3)))
    with pytest.raises(ValueError, match="bn_init"):
        ref_mlp(bn_init="tf")
    with pytest.raises(ValueError, match="bn_eps"):
        ref_mlp(bn_eps=0.0)


def test_ref_vgg_reference_order_pools_before_batchnorm():
    kinds = lambda m: [type(x).__name__ for x in m]  # noqa: E731
    ref = ref_vgg(width_mult=0.125, order="reference", bn_init="reference")
    vgg = ref_vgg(width_mult=0.125)
    stage_ref = ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU"]
    stage_vgg = ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    tail = ["Flatten", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert kinds(ref) == stage_ref * 3 + tail and kinds(vgg) == stage_vgg * 3 + tail
    assert [p.shape for p in ref.parameters()] == [p.shape for p in vgg.parameters()]
    assert all(b.eps == 1e-4 for b in _bns(ref))
    assert ref(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    svhn = build_model("ref_vgg_svhn", (3, 32, 32), 10, order="reference")
    assert kinds(svhn)[:7] == stage_ref and svhn[0].out_channels == 64
    with pytest.raises(ValueError, match="order"):
        ref_vgg(order="pool-last")


# ------------------------------------------------------------------------- accumulator init


def test_initial_accumulator_uniform_is_seeded_bounded_and_leaves_the_global_rng():
    w = torch.ones(300, 200)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a = D.initial_accumulator(w, 1e-6, "uniform", seed=123)
    assert torch.equal(torch.get_rng_state(), before)  # private generator
    assert torch.equal(a, D.initial_accumulator(w, 1e-6, "uniform", seed=123))
    assert not torch.equal(a, D.initial_accumulator(w, 1e-6, "uniform", seed=124))
    assert a.dtype == w.dtype and float(a.abs().max()) <= 1e-6
    assert float(a.abs().max()) > 0.999e-6 and abs(float(a.mean())) < 2e-8  # U(-1e-6, 1e-6)
    assert float(a.std()) == pytest.approx(1e-6 / 3 ** 0.5, rel=0.02)
    s = D.initial_accumulator(torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64), 1e-12, "sign")
    assert s.tolist() == [-1e-12, 1e-12, 1e-12]
    with pytest.raises(ValueError, match="mode"):
        D.initial_accumulator(w, 1e-6, "normal")
    with pytest.raises(ValueError, match="seed"):
        D.initial_accumulator(w, 1e-6, "uniform")
    with pytest.raises(ValueError, match="scale"):
        D.initial_accumulator(w, 0.0, "sign")


def _binary_mlp(seed=0):
    torch.manual_seed(seed)
    m = ref_mlp((1, 4, 4), 3, widths=(6, 5))
    pmptrain.discretize_(m, "binary", keep=None, init="uniform")
    return m


def test_discrete_msa_uniform_acc_init_is_deterministic_and_state_dict_safe():
    m = _binary_mlp()
    opt = pmptrain.DiscreteMSA(m, acc_init=1e-6, acc_init_mode="uniform", acc_seed=3)
    accs = {n: opt.state_of(p).accumulator for n, p in m.named_parameters() if opt.state_of(p) is not None
            and hasattr(opt.state_of(p), "accumulator")}
    assert len(accs) == 3
    assert all(float(a.abs().max()) <= 1e-6 and bool((a != 0).all()) for a in accs.values())
    # about half the codes start "wrong" (M W < 0), unlike the sign init
    w0 = [p for p in m.parameters() if p.dim() == 2][0]
    assert 0.3 < float((opt.state_of(w0).accumulator * w0 < 0).float().mean()) < 0.7
    # a function of acc_seed and the parameter names only: another global seed, the same M_0
    m2 = _binary_mlp(seed=9)
    torch.manual_seed(1234)
    opt2 = pmptrain.DiscreteMSA(m2, acc_init=1e-6, acc_init_mode="uniform", acc_seed=3)
    for (n, p), (_, p2) in zip(m.named_parameters(), m2.named_parameters()):
        if n in accs:
            assert torch.equal(opt2.state_of(p2).accumulator, accs[n])
    opt3 = pmptrain.DiscreteMSA(_binary_mlp(), acc_init=1e-6, acc_init_mode="uniform", acc_seed=4)
    assert not torch.equal(opt3.state_of(list(opt3.units.values())[0].params[0]).accumulator,
                           opt.state_of(list(opt.units.values())[0].params[0]).accumulator)
    # one step, then the state (accumulators included) round trips into an optimizer seeded otherwise
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))
    nn.functional.cross_entropy(m(x), y).backward()
    opt.step()
    sd = opt.state_dict()
    fresh = pmptrain.DiscreteMSA(m, acc_init=1e-6, acc_init_mode="uniform", acc_seed=99)
    fresh.load_state_dict(sd)
    for p in m.parameters():
        st = opt.state_of(p)
        if st is not None and hasattr(st, "accumulator"):
            assert torch.equal(fresh.state_of(p).accumulator, st.accumulator)
    with pytest.raises(ValueError, match="acc_init_mode"):
        pmptrain.DiscreteMSA(_binary_mlp(), acc_init_mode="gauss")
    with pytest.raises(ValueError, match="acc_seed"):
        pmptrain.DiscreteMSA(_binary_mlp(), acc_init_mode="uniform", acc_seed=-1)


# ------------------------------------------------------------------------- the wrong set


def _reference_ternary_update(W, M, rho_ref, reg):
    """LiQianxiao/discrete-MSA layers.py, TernaryFullyConnectedLayer._train_op, in NumPy:
    the wrong set W != sign(M), rho_k = rho * max|M| over it, then the +1 / -1 / 0 conditions
    of the full-square penalty rho_k (q - W)^2 and the absolute regulariser reg."""
    wrong = W != np.sign(M)
    rho_k = rho_ref * np.abs(M)[wrong].max()
    plus = M > rho_k * (1.0 - 2.0 * W) + reg
    minus = M < -rho_k * (1.0 + 2.0 * W) - reg
    new = np.zeros_like(W)
    new[plus] = 1.0
    new[minus] = -1.0
    return new, rho_k


def test_wrong_set_sign_reproduces_the_reference_ternary_update():
    g = torch.Generator().manual_seed(0)
    grid = D.ternary_grid()
    differs = 0
    for trial in range(20):
        W = torch.randint(-1, 2, (40, 30), generator=g).double()
        M = torch.randn(40, 30, generator=g, dtype=torch.float64) * 1e-4
        reg = float(M.abs().median()) * 0.05  # lambda small against |M| (the reference's 1e-7)
        if trial % 2:  # every sign right, weakly supported codes: the two definitions part
            u = torch.rand(40, 30, generator=g, dtype=torch.float64)
            M = torch.where(W != 0, W * u, (u - 0.5) * 0.2) * 1e-4
            reg = 0.3e-4
        rho_ref = 0.25
        want, rho_k_ref = _reference_ternary_update(W.numpy(), M.numpy(), rho_ref, reg)
        # ours: half-square penalty, so rho = 2 rho_ref
        new, st = D.discrete_msa_step(W, M, grid, 2 * rho_ref, reg, wrong_set="sign")
        np.testing.assert_array_equal(new.numpy(), want)
        assert st.rho_k == pytest.approx(2 * rho_k_ref, rel=1e-12)
        delta, rho_k, _ = D.discrete_msa_delta(W, M, grid, 2 * rho_ref, reg, wrong_set="sign")
        np.testing.assert_array_equal((W + delta).numpy(), want)
        assert float(rho_k) == pytest.approx(2 * rho_k_ref, rel=1e-12)
        ours, _ = D.discrete_msa_step(W, M, grid, 2 * rho_ref, reg)  # the default wrong set
        differs += int(not torch.equal(ours, new))
        if trial % 2 == 0:  # a small lambda: the largest wrong |M| is the same in both sets
            assert torch.equal(ours, new)
    assert differs >= 5  # where every sign is right the two definitions differ


def test_wrong_set_sign_binary_is_the_default_rule_and_bad_values_are_refused():
    g = torch.Generator().manual_seed(1)
    W = torch.randint(0, 2, (50, 20), generator=g).double() * 2 - 1
    M = torch.randn(50, 20, generator=g, dtype=torch.float64)
    a, _ = D.discrete_msa_step(W, M, D.binary_grid(), 0.5, wrong_set="sign")
    b, _ = D.discrete_msa_step(W, M, D.binary_grid(), 0.5)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="wrong_set"):
        D.penalty_scale(M, W, D.binary_grid(), 0.5, wrong_set="maximiser")
    with pytest.raises(ValueError, match="binary and ternary"):
        D.penalty_scale(M, W.clamp(-1, 1) * 0 + 1, D.uniform_grid(2), 0.5, wrong_set="sign")


def test_discrete_msa_wrong_set_option_reaches_the_rule(monkeypatch):
    import pmptrain.optim.elementwise as E

    seen = []
    real = E.discrete_msa_delta
    monkeypatch.setattr(E, "discrete_msa_delta", lambda *a, **k: seen.append(k.get("wrong_set")) or real(*a, **k))
    torch.manual_seed(0)
    m = ref_mlp((1, 4, 4), 3, widths=(6,))
    pmptrain.discretize_(m, "ternary", keep=None, init="uniform")
    x, y = torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,))
    for ws in ("hamiltonian", "sign"):
        seen.clear()
        opt = pmptrain.DiscreteMSA(m, rho=0.5, lam=1e-7, wrong_set=ws)
        assert opt.param_groups[0]["wrong_set"] == ws
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        assert seen == [ws, ws]  # both ternary layers
    with pytest.raises(ValueError, match="wrong_set"):
        pmptrain.DiscreteMSA(m, wrong_set="tf")


# ------------------------------------------------------------------------- sparsity convention


def test_density_conventions_count_batchnorm_in_the_reference_denominator():
    torch.manual_seed(0)
    m = ref_mlp((1, 4, 4), 3, widths=(6,))  # 16*6 + 6*3 = 114 weights, 2*(6+3) = 18 BN affine
    pmptrain.discretize_(m, "ternary", keep=None, init="uniform")
    codes = [p for p in m.parameters() if p.dim() == 2]
    nz = sum(int((p != 0).sum()) for p in codes)
    assert density(m) == pytest.approx(nz / 114)
    assert density(m, "trainable") == pytest.approx(nz / 132)
    t = summary(m, file=open("/dev/null", "w"))
    assert t.density() == pytest.approx(nz / 114) and t.density("trainable") == pytest.approx(nz / 132)
    m[2].weight.requires_grad_(False)  # frozen parameters are not trainable variables
    assert density(m, "trainable") == pytest.approx(nz / 126)
    assert density(nn.Linear(2, 2)) is None
    with pytest.raises(ValueError, match="convention"):
        density(m, "all")


# ------------------------------------------------------------------------- presets, end to end


@pytest.mark.parametrize("name", [f"lihao-{lv}-{d}" for d in ("mnist", "cifar10", "svhn") for lv in ("binary", "ternary")])
def test_lihao_presets_pin_the_notebook_settings(name):
    _, levels, data = name.split("-")
    ns = cli.build_parser().parse_args(["bench", "--preset", name])
    cfg, _, _ = cli._resolve(ns)
    model = {"mnist": "ref_mlp", "cifar10": "ref_vgg", "svhn": "ref_vgg_svhn"}[data]
    epochs = {"mnist": 250, "cifar10": 500, "svhn": 200}[data]
    loss = "cross-entropy" if (levels, data) == ("ternary", "mnist") else "squared-hinge"
    assert (cfg.dataset, cfg.model, cfg.epochs, cfg.loss, cfg.batch_size) == (data, model, epochs, loss, 100)
    assert (cfg.keep, cfg.scale, cfg.init, cfg.density_convention) == ([], None, "uniform", "trainable")
    n_train = {"mnist": 60000, "cifar10": 50000, "svhn": 73257}[data]
    assert round(n_train * cfg.val_fraction) == 5000
    want_model = {"bn_init": "reference"} if data == "mnist" else {"bn_init": "reference", "order": "reference"}
    assert cfg.model_args == want_model
    assert cfg.optimizers == [f"{levels}-msa"]
    args = cfg.optimizer_args[f"{levels}-msa"]
    want = {"rho": 0.5, "decay": 0.999, "gamma": 0.98 if data == "cifar10" else 0.95, "acc_init": 1e-6,
            "acc_init_mode": "uniform"}
    if levels == "ternary":
        want.update(lam=1e-7, lam_mode="absolute", wrong_set="sign")
    assert args == want
    assert "final" in cli.PRESETS[name]["_doc"]


def test_lihao_mnist_protocol_runs_end_to_end_through_the_download_path(tmp_path, monkeypatch):
    """The preset with MNIST fetched (file:// URLs, MD5-checked) from small generated IDX files."""
    src = tmp_path / "src"
    write_idx_set(src, n_train=120, n_test=40, seed=3)
    res = tuple(bench_data.Resource(p.name, (p.as_uri(),), hashlib.md5(p.read_bytes()).hexdigest())
                for p in sorted(src.iterdir()))
    monkeypatch.setitem(bench_data.RESOURCES, "mnist", res)
    monkeypatch.delenv("PMPTRAIN_DATA", raising=False)
    for levels in ("binary", "ternary"):
        out = tmp_path / f"run-{levels}"
        rc = cli.main(["bench", "--preset", f"lihao-{levels}-mnist", "--download", "--data-dir", str(tmp_path / "data"),
                       "--model-args", "{widths: [32, 32, 32], bn_init: reference}", "--epochs", "2",
                       "--threads", "1", "--no-tensorboard", "--out", str(out)])
        assert rc == 0
        assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == sorted(r.filename for r in res)
        results = json.loads((out / "results.json").read_text())
        cfg = results["meta"]["config"]
        assert (cfg["preset"], cfg["epochs"], cfg["loss"]) == \
            (f"lihao-{levels}-mnist", 2, "squared-hinge" if levels == "binary" else "cross-entropy")
        (row,) = results["rows"]
        (run,) = [r for r in results["runs"] if r["selected"]]
        assert row["final_acc_median"] == run["curves"]["test_acc"][-1]  # the final, not the best epoch
        assert row["density_convention"] == "trainable"
        n_disc = 784 * 32 + 32 * 32 * 2 + 32 * 10
        n_bn = 2 * (3 * 32 + 10)
        if levels == "ternary":
            assert 0 < row["final_density"] <= n_disc / (n_disc + n_bn)
        else:
            assert row["final_density"] == pytest.approx(n_disc / (n_disc + n_bn))
