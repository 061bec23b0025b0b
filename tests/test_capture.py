"""Captured states/costates against autograd, accumulation rules, and the hook life cycle."""

import copy
import gc
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pmptrain.capture as capture_mod
from pmptrain.capture import CaptureSpec, ModuleCapture
from pmptrain.modules import adapter_for

DT = torch.float64
ROWS = CaptureSpec("rows", "rows", dtype=DT)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)
    ).double()


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, stride=2), nn.Flatten(), nn.Linear(5, 3),
    ).double()


def _controlled(model):
    return {n: m for n, m in model.named_modules() if adapter_for(m) is not None}


def _capture(model, spec=ROWS):
    cap = ModuleCapture()
    for name, m in _controlled(model).items():
        m_out, n_in = adapter_for(m).weight_shape_2d(m)
        s = CaptureSpec(spec.states, spec.costates, spec.calls, n_in, m_out, spec.dtype)
        cap.add(name, m, adapter_for(m), s, m.weight)
    return cap


def _data(n=7, shape=(6,), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("make,shape", [(_mlp, (7, 6)), (_cnn, (3, 2, 8, 8))])
def test_captured_costates_equal_autograd_and_rebuild_the_weight_gradient(make, shape):
    model = make()  # in-place ReLUs rewrite the outputs the hooks are attached to
    reference = make()
    for m in reference.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    x, target = _data(shape[0], shape[1:])
    # reference ∂J/∂y for every module output, by autograd on the out-of-place twin
    ref_mods = _controlled(reference)
    outputs = {}
    for n, m in ref_mods.items():
        m.register_forward_hook(lambda mod, i, o, n=n: outputs.__setitem__(n, o))
    names = list(ref_mods)
    grads = torch.autograd.grad(F.cross_entropy(reference(x), target), [outputs[n] for n in names])

    mods = _controlled(model)
    cap = _capture(model)
    F.cross_entropy(model(x), target).backward()
    for name, g_ref in zip(names, grads):
        st = cap.pop(name)
        module, adapter = mods[name], adapter_for(mods[name])
        g_rows, x_rows = st.costate_rows(DT), st.state_rows(DT)
        torch.testing.assert_close(g_rows, adapter.output_rows(module, g_ref))
        # G = −∇_W J = (1/B) Σ p̂ xᵀ with p̂ = −B g: the rows reproduce autograd's weight gradient
        torch.testing.assert_close(g_rows.T @ x_rows, module.weight.grad.reshape(g_rows.shape[1], -1))
        assert st.samples == shape[0] and st.rows == g_rows.shape[0]
        torch.testing.assert_close(st.g_sq, g_rows.pow(2).sum())
        torch.testing.assert_close(st.x_sum, x_rows.sum(0))
    cap.remove()


def test_dense_statistics_equal_the_rows_and_are_built_in_sample_chunks(monkeypatch):
    model = _cnn()
    x, y = _data(6, (2, 8, 8))
    cap_rows = _capture(model)
    F.cross_entropy(model(x), y).backward()
    ref = {n: cap_rows.pop(n) for n in cap_rows.keys()}
    cap_rows.remove()
    monkeypatch.setattr(capture_mod, "_CHUNK_ELEMENTS", 40)  # forces several slices of whole samples
    for spec in (CaptureSpec("dense", "dense", dtype=DT), CaptureSpec("auto", "auto", dtype=DT)):
        model.zero_grad()
        cap = _capture(model, spec)
        F.cross_entropy(model(x), y).backward()
        for name, r in ref.items():
            st = cap.pop(name)
            xr, gr = r.state_rows(DT), r.costate_rows(DT)
            xx = st.xx if st.xx is not None else st.state_rows(DT).T @ st.state_rows(DT)
            gg = st.gg if st.gg is not None else st.costate_rows(DT).T @ st.costate_rows(DT)
            torch.testing.assert_close(xx, xr.T @ xr)
            torch.testing.assert_close(gg, gr.T @ gr)
            if spec.states == "auto":  # rows while fewer rows than features, then dense
                assert (st.xx is None) == (xr.shape[0] < xr.shape[1])
        cap.remove()


def test_accumulation_adds_backward_passes_and_samples():
    model = _mlp()
    cap = _capture(model)
    for seed in (1, 2, 3):
        x, y = _data(4, seed=seed)
        F.cross_entropy(model(x), y).backward()
    st = cap.pop("0")
    assert st.samples == 12 and st.rows == 12 and len(st.x_rows) == 3
    cap.remove()


def test_reset_and_every_way_of_zeroing_the_gradient_drop_the_statistics():
    model = _mlp()
    cap = _capture(model)
    lin = model[0]

    def backward(seed):
        x, y = _data(4, seed=seed)
        F.cross_entropy(model(x), y).backward()

    backward(1)
    cap.reset()  # optimizer.zero_grad()
    backward(2)
    assert cap.peek("0").samples == 4
    model.zero_grad(set_to_none=True)  # p.grad = None: detected at the next backward
    backward(3)
    assert cap.peek("0").samples == 4
    model.zero_grad(set_to_none=False)  # zeroed in place
    backward(4)
    assert cap.peek("0").samples == 4
    lin.weight.grad.mul_(0.5)  # an in-place edit that is not a reset (e.g. clipping)
    backward(5)
    assert cap.peek("0").samples == 8
    cap.remove()


def test_a_forward_without_backward_leaves_nothing_behind():
    model = _mlp()
    cap = _capture(model)
    gc.collect()
    before = sum(type(o) is capture_mod._CostateHook for o in gc.get_objects())
    for i in range(50):  # train-mode forwards that never get a backward (metrics, generation)
        model(_data(4, seed=i)[0]).sum()
    gc.collect()
    after = sum(type(o) is capture_mod._CostateHook for o in gc.get_objects())
    assert after == before
    assert not cap.has_data()
    # a backward after such forwards still counts only its own batch
    x, y = _data(5)
    F.cross_entropy(model(x), y).backward()
    assert cap.peek("0").samples == 5
    cap.remove()


def test_shared_module_counts_its_calls_as_rows_of_one_batch():
    lin = nn.Linear(4, 4).double()
    cap = ModuleCapture()
    cap.add("lin", lin, adapter_for(lin), CaptureSpec("rows", "rows", in_dim=4, out_dim=4, dtype=DT), lin.weight)
    x = torch.randn(3, 4, dtype=DT)
    lin(torch.tanh(lin(x))).sum().backward()
    st = cap.pop("lin")
    assert st.samples == 3 and st.rows == 6 and len(st.x_rows) == 2
    cap.remove()


def test_nothing_recorded_in_eval_no_grad_paused_or_without_gradient():
    model = _mlp()
    cap = _capture(model)
    x, y = _data()
    model.eval()
    F.cross_entropy(model(x), y).backward()
    model.train()
    with torch.no_grad():
        model(x)
    with cap.paused():
        F.cross_entropy(model(x), y).backward()
    for p in model.parameters():
        p.requires_grad_(False)
    model(x)
    assert not cap.has_data()
    cap.remove()


def test_a_second_backward_through_one_call_is_counted_and_warned():
    model = _mlp()
    cap = _capture(model)
    x, y = _data()
    loss = F.cross_entropy(model(x), y)
    loss.backward(retain_graph=True)
    with pytest.warns(UserWarning, match="second backward"):
        loss.backward()
    st = cap.pop("0")
    assert st.samples == 7 and st.repeated == 1
    cap.remove()


def test_embedding_counts():
    emb = nn.Embedding(6, 3)
    cap = ModuleCapture()
    cap.add("emb", emb, adapter_for(emb), CaptureSpec("counts", "none", in_dim=6, out_dim=3), emb.weight)
    idx = torch.tensor([[0, 1, 1], [5, 1, 0]])
    emb(idx).sum().backward()
    st = cap.pop("emb")
    assert st.samples == 6 and st.rows == 6 and st.counts.tolist() == [2, 3, 0, 0, 0, 1]  # every index a sample
    cap.remove()


def test_remove_copies_and_a_second_capture():
    model = _mlp()
    n_hooks = [len(m._forward_hooks) for m in model.modules()]
    cap = _capture(model)
    # a copy of the hooked model carries inert hooks: it records nothing into the capture
    twin = copy.deepcopy(model)
    again = pickle.loads(pickle.dumps(model))
    x, y = _data()
    F.cross_entropy(twin(x), y).backward()
    F.cross_entropy(again(x), y).backward()
    assert not cap.has_data()
    # a second capture on the same modules removes the first
    cap2 = _capture(model)
    assert cap.removed and "another pmptrain optimizer" in cap.removed_reason
    F.cross_entropy(model(x), y).backward()
    assert cap2.peek("0").samples == 7 and not cap.has_data()
    cap2.remove()
    assert [len(m._forward_hooks) for m in model.modules()] == n_hooks
    assert all(len(p._post_accumulate_grad_hooks or {}) == 0 for p in model.parameters())


def test_costate_through_sign_activation_is_the_straight_through_gradient():
    import pmptrain

    torch.manual_seed(0)
    first, second = nn.Linear(5, 6).double(), nn.Linear(6, 3).double()
    model = nn.Sequential(first, pmptrain.SignActivation(), second)
    cap = _capture(model)
    x = torch.randn(8, 5, dtype=DT) * 2
    F.cross_entropy(model(x), torch.arange(8) % 3).backward()
    g1, g2 = cap.pop("0").costate_rows(DT), cap.pop("2").costate_rows(DT)
    y1 = first(x).detach()
    # ∂J/∂(sign input) = ∂J/∂(sign output) · 1{|y| ≤ 1}, and ∂J/∂(sign output) = g₂ W₂
    expected = (g2 @ second.weight.detach()) * (y1.abs() <= 1).double()
    torch.testing.assert_close(g1, expected)
    assert (g1[y1.abs() > 1] == 0).all() and (y1.abs() > 1).any()
    cap.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)  # no hooks left
