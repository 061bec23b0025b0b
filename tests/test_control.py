"""pmptrain.control: attaching controls, the closed-form E-MSA step of a LoRA control against the
numerical maximiser of H̃ (float64), the frozen base untouched (no state, no hooks, bit-identical
weights), discrete controls on their grid, merge and export/load round trips."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pmptrain
from pmptrain import control
from pmptrain.bench.models import gpt
from pmptrain.discrete import on_grid, packed_nbytes
from pmptrain.export import PackedFileError
from test_layers import newton_maximiser

DT = torch.float64
RHO, LR = 1.3, 0.6
BLOCKS = r"re:h\.\d+"
GPT_LINEARS = ["c_attn", "c_proj", "mlp.0", "mlp.2"]


def small_gpt(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return gpt((16,), 64, n_layer=2, n_head=2, n_embd=16).to(dtype)


def tokens(seed=1, batch=3, t=16):
    return torch.randint(0, 64, (batch, t), generator=torch.Generator().manual_seed(seed))


def lm_loss(model, x):
    logits = model(x[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


KIND_TARGETS = [("lora", GPT_LINEARS), ("parallel", BLOCKS), ("nonlinear", BLOCKS), ("binary", BLOCKS),
                ("ternary", ["c_attn", "mlp.2"])]


def make_opt(kind, model):
    if kind in ("binary", "ternary"):
        return pmptrain.DiscreteMSA(model, rho=0.0, decay=0.0, fallback_lr=1e-2)
    return pmptrain.EMSA(model, strict=True)


# ------------------------------------------------------------------------------------- attach


@pytest.mark.parametrize("kind,targets", KIND_TARGETS, ids=[k for k, _ in KIND_TARGETS])
def test_attach_starts_at_the_base_model_and_freezes_the_rest(kind, targets):
    base = small_gpt()
    model = control.attach(copy.deepcopy(base), targets, kind=kind, rank=4, causal=True)
    x = tokens()
    assert torch.equal(model(x), base(x))  # u = 0 at initialisation, bit for bit
    ctrl = {id(p) for _, c in control.controls(model) for p in c.control_parameters()}
    for n, p in model.named_parameters():
        assert p.requires_grad == (id(p) in ctrl), n
    expected = {"lora": 2 * (16 * 4 + 4 * 48) + 2 * (16 * 4 + 4 * 16) + 2 * (16 * 4 + 4 * 64) + 2 * (64 * 4 + 4 * 16),
                "parallel": 2 * 2 * 16 * 4, "nonlinear": 2 * (2 * 16 * 4 + 4 + 16),
                "binary": 2 * (2 * 16 * 4) + 2, "ternary": 2 * (16 * 4 + 4 * 48) + 2 * (64 * 4 + 4 * 16) + 4}[kind]
    assert control.trainable_parameters(model) == expected


def test_select_modules_by_name_glob_regex_type_and_predicate():
    model = small_gpt()
    by = lambda t: [n for n, _ in control.select_modules(model, t)]
    assert by("c_attn") == ["h.0.attn.c_attn", "h.1.attn.c_attn"]
    assert by("h.*.mlp") == ["h.0.mlp", "h.1.mlp"]
    assert by(BLOCKS) == ["h.0", "h.1"]
    assert by(nn.LayerNorm) == ["h.0.ln_1", "h.0.ln_2", "h.1.ln_1", "h.1.ln_2", "ln_f"]
    assert by(lambda n, m: n == "lm_head") == ["lm_head"]
    assert by(["h.0", "h.0.attn.c_attn"]) == ["h.0"]  # the outermost selected module is the target


def test_attach_errors_name_the_problem():
    model = small_gpt()
    with pytest.raises(ValueError, match="matches no module"):
        control.attach(model, "nope", kind="lora")
    with pytest.raises(TypeError, match="kind='lora' controls Linear"):
        control.attach(model, BLOCKS, kind="lora")
    with pytest.raises(ValueError, match="kind"):
        control.attach(model, "c_attn", kind="dora")
    with pytest.raises(ValueError, match="rank"):
        control.attach(model, "c_attn", rank=0)
    assert not control.controls(model)  # nothing attached by a failed call
    control.attach(model, "c_attn", rank=2)
    assert [n for n, _ in control.select_modules(model, "re:.*")][:2] != ["h.0.attn.c_attn.A"]
    with pytest.raises(ValueError, match="matches no module"):  # the pieces of a control are not targets
        control.attach(model, "A", kind="lora")


def test_attach_keeps_named_parameters_trainable():
    model = control.attach(small_gpt(), "c_attn", rank=2, trainable=["ln_f.*"])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"ln_f.weight", "ln_f.bias"} <= names and "wte.weight" not in names


# ----------------------------------------------------------------- E-MSA on a LoRA control


def test_emsa_step_of_a_lora_control_is_the_maximiser_of_each_piece():
    """A and B are affine units with their own states (x and A x) and costates: each one's step is
    the maximiser of its augmented Hamiltonian, checked by a Newton step in float64."""
    torch.manual_seed(0)
    base = nn.Linear(5, 4).double()
    model = control.attach(nn.Sequential(base, nn.Tanh(), nn.Linear(4, 3).double()), "0", kind="lora", rank=2)
    ctrl = model[0]
    with torch.no_grad():
        ctrl.B.weight.normal_()  # a non-zero B, so that A has a costate
    opt = pmptrain.EMSA(model, lr=LR, rho=RHO, strict=True, route="primal", costate="exact")
    assert [r["unit"] for r in opt.rule_table()] == ["0.A", "0.B"]  # the frozen layers make no unit
    rec = {}

    def hook(name):
        def f(mod, args, out):
            rec[name + "x"] = args[0].detach()
            out.register_hook(lambda g: rec.__setitem__(name + "g", g.detach()))
        return f

    hs = [ctrl.A.register_forward_hook(hook("A")), ctrl.B.register_forward_hook(hook("B"))]
    x = torch.randn(7, 5, dtype=DT, generator=torch.Generator().manual_seed(3))
    target = torch.randn(7, 3, dtype=DT, generator=torch.Generator().manual_seed(4))
    F.mse_loss(model(x), target).backward()
    for h in hs:
        h.remove()
    g = torch.Generator().manual_seed(5)
    grads = {}
    for piece in ("A", "B"):
        w = getattr(ctrl, piece).weight
        w.grad.mul_(0.7).add_(1e-3 * torch.randn(w.shape, generator=g, dtype=DT))  # clipping + noise
        grads[piece] = w.grad.clone()
    before = {k: getattr(ctrl, k).weight.detach().clone() for k in ("A", "B")}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt.step()
    fn = lambda th, rows, extra: rows @ th["weight"].T
    for k in ("A", "B"):
        p_rows = -7 * rec[k + "g"]
        ref = newton_maximiser(fn, {"weight": before[k]}, [(rec[k + "x"], p_rows, None)], 7, RHO, 1 / LR,
                               {"weight": -grads[k]})
        change = getattr(ctrl, k).weight.detach() - before[k]
        assert change.abs().max() > 1e-3
        torch.testing.assert_close(change, ref["weight"], rtol=1e-8, atol=1e-11)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n])


# ------------------------------------------------------------------------- the frozen base


@pytest.mark.parametrize("opt_name", ["emsa", "adamw", "discrete-msa"])
def test_frozen_base_gets_no_state_no_hooks_and_stays_bit_identical(opt_name):
    kind = "binary" if opt_name == "discrete-msa" else "lora"
    model = control.attach(small_gpt(), GPT_LINEARS if kind == "lora" else BLOCKS, kind=kind, rank=4)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(".A." not in n and ".B." not in n for n in frozen)
    if opt_name == "emsa":
        opt = pmptrain.EMSA(model, strict=True)
    elif opt_name == "adamw":
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    else:
        opt = pmptrain.DiscreteMSA(model, rho=0.0, decay=0.0, fallback_lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for s in range(3):
        opt.zero_grad()
        lm_loss(model, tokens(s)).backward()
        opt.step()
    params = dict(model.named_parameters())
    for n, w in frozen.items():
        assert torch.equal(params[n], w), n
        assert params[n].grad is None, n
        assert params[n] not in opt.state, n
    assert any(not torch.equal(params[n], w) for n, w in before.items())
    if isinstance(opt, pmptrain.PMPOptimizer):
        pieces = {f"{c}.{k}" for c, _ in control.controls(model) for k in ("A", "B")}
        assert set(opt.capture._entries) <= pieces  # hooks on control pieces only
        for unit in opt.units.values():
            assert all(any(name.startswith(c + ".") for c in pieces) or name in pieces
                       for name in unit.param_names), unit.name


def test_discrete_controls_stay_on_their_grid_and_flip_like_bang_bang_controls():
    model = control.attach(small_gpt(), BLOCKS, kind="ternary", rank=8)
    opt = pmptrain.DiscreteMSA(model, rho=0.0, decay=0.0, fallback_lr=1e-2)
    dts = pmptrain.discrete_parameters(model)
    assert len(dts) == 4
    codes0 = [d.param.detach().clone() for d in dts]
    for s in range(4):
        opt.zero_grad()
        lm_loss(model, tokens(s)).backward()
        opt.step()
    for d, c0 in zip(dts, codes0):
        assert on_grid(d.param.detach(), d.grid)
    assert sum(int((d.param != c0).sum()) for d, c0 in zip(dts, codes0)) > 0


# ------------------------------------------------------------------------ merge and export


def test_merge_folds_linear_controls_and_refuses_state_based_ones():
    base = small_gpt(DT)
    model = control.attach(copy.deepcopy(base), ["c_attn", "mlp.2"], kind="lora", rank=3)
    control.attach(model, "c_proj", kind="binary", rank=6)
    control.attach(model, "h.1", kind="parallel", rank=2)
    for _, c in control.controls(model):
        with torch.no_grad():
            for p in c.control_parameters():
                p.copy_(torch.randn_like(p) if p.dim() else torch.tensor(0.3, dtype=DT))
        if isinstance(c, control.BinaryControl):
            for d in (c.A, c.B):
                w = d.parametrizations.weight.original
                with torch.no_grad():
                    w.copy_(torch.where(w >= 0, 1.0, -1.0))
    x = tokens()
    with torch.no_grad():
        y = model(x)
    with pytest.raises(ValueError, match=r"h\.1 \(ParallelControl\)"):
        control.merge(model)
    assert len(control.controls(model)) == 7  # nothing changed by a refusal
    merged = control.merge(model, strict=False)  # the controls inside the controlled block h.1 too
    assert sorted(merged) == sorted(["h.0.attn.c_attn", "h.0.mlp.2", "h.1.base.attn.c_attn", "h.1.base.mlp.2",
                                     "h.0.attn.c_proj", "h.1.base.attn.c_proj"])
    assert [n for n, _ in control.controls(model)] == ["h.1"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, rtol=1e-12, atol=1e-12)
    assert isinstance(model.h[0].attn.c_attn, nn.Linear)
    assert not torch.equal(model.h[0].attn.c_attn.weight, base.h[0].attn.c_attn.weight)


@pytest.mark.parametrize("kind,targets", KIND_TARGETS, ids=[k for k, _ in KIND_TARGETS])
def test_export_load_onto_a_fresh_base_reproduces_outputs_exactly(kind, targets, tmp_path):
    base = small_gpt()
    model = control.attach(copy.deepcopy(base), targets, kind=kind, rank=4, causal=True)
    opt = make_opt(kind, model)
    for s in range(2):
        opt.zero_grad()
        lm_loss(model, tokens(s)).backward()
        opt.step()
    path = tmp_path / "controls.pmp"
    manifest = control.export_controls(model, path)
    fresh = control.load_controls(path, copy.deepcopy(base))
    x = tokens(9)
    model.eval()
    fresh.eval()
    assert torch.equal(fresh(x), model(x))
    assert not torch.equal(fresh(x), base(x))
    if kind in ("binary", "ternary"):  # bit-packed codes (1 or 2 bits each) and the scales s_A, s_B
        dts = pmptrain.discrete_parameters(model)
        bits = 1 if kind == "binary" else 2
        assert manifest["payload_nbytes"] == sum(packed_nbytes(d.param.numel(), bits) + 4 for d in dts)
    else:
        assert manifest["payload_nbytes"] == 4 * sum(p.numel() for _, c in control.controls(model)
                                                     for p in c.control_parameters())
    assert {k for k in fresh.state_dict()} == {k for k in model.state_dict()}


def test_load_controls_refuses_another_base_or_a_corrupt_file_and_leaves_the_model_alone(tmp_path):
    base = small_gpt()
    model = control.attach(copy.deepcopy(base), "c_attn", rank=2)
    path = tmp_path / "c.pmp"
    control.export_controls(model, path)
    other = small_gpt(seed=7)
    snap = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="differs from the base"):
        control.load_controls(path, other)
    assert not control.controls(other) and all(torch.equal(v, other.state_dict()[k]) for k, v in snap.items())
    control.load_controls(path, other, check_base=False)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    bad = tmp_path / "bad.pmp"
    bad.write_bytes(bytes(data))
    fresh = copy.deepcopy(base)
    with pytest.raises(PackedFileError, match="checksum"):
        control.load_controls(bad, fresh)
    assert not control.controls(fresh)
    pmptrain.export_packed(pmptrain.discretize_(nn.Sequential(nn.Linear(4, 4)), keep=None), tmp_path / "m.pmp")
    with pytest.raises(PackedFileError, match="not a controls file"):
        control.load_controls(tmp_path / "m.pmp", fresh)
    with pytest.raises(ValueError, match="no control"):
        control.export_controls(base, tmp_path / "x.pmp")


# ------------------------------------------------------------------------------- memory


def test_parallel_control_saves_fewer_activations_than_lora_inside_the_block():
    """Autograd keeps each LoRA-controlled Linear's input; a control spanning the block keeps the
    block input (already kept) and A x only (docs/control.md, the memory argument)."""
    base = small_gpt()
    x = tokens(batch=4)
    lora = control.attach(copy.deepcopy(base), GPT_LINEARS, kind="lora", rank=4)
    par = control.attach(copy.deepcopy(base), BLOCKS, kind="parallel", rank=16)
    assert control.trainable_parameters(par) <= control.trainable_parameters(lora)
    _, b_lora = control.saved_tensor_bytes(lambda: lm_loss(lora, x), lora)
    _, b_par = control.saved_tensor_bytes(lambda: lm_loss(par, x), par)
    _, b_none = control.saved_tensor_bytes(lambda: lm_loss(base, x), base)
    assert b_par < b_lora
    assert b_par < b_none  # a frozen base saves less than the fully trained model: no weight gradients
