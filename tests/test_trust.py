"""The trust region of the closed-form E-MSA step (``max_step``, pmptrain/trust.py), the warning
for an Adam-like ``lr``, and what stays unguarded (MSA, the iterative/paper solver)."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pmptrain
from pmptrain import hamiltonian as H
from pmptrain.trust import trust_region_factor, unit_floor_sq

DT = torch.float64


def _t(v):
    return torch.tensor(float(v), dtype=DT)


def test_factor_is_one_inside_and_lands_on_the_radius_outside():
    # ‖θ‖ = 2 above the floor 1: radius 0.1 → ‖Δ‖ ≤ 0.2
    assert float(trust_region_factor(_t(0.19 ** 2), _t(4.0), 1.0, 0.1)) == 1.0
    a = trust_region_factor(_t(0.5 ** 2), _t(4.0), 1.0, 0.1)
    assert float(a) * 0.5 == pytest.approx(0.2, rel=1e-12)
    # a zero (or tiny) parameter uses the floor: ‖Δ‖ ≤ 0.1·√3
    a = trust_region_factor(_t(4.0), _t(0.0), 3.0, 0.1)
    assert float(a) * 2.0 == pytest.approx(0.1 * 3 ** 0.5, rel=1e-12)
    # Δ* = 0 and radius 0: no NaN
    assert float(trust_region_factor(_t(0.0), _t(1.0), 1.0, 0.1)) == 1.0
    assert float(trust_region_factor(_t(1.0), _t(1.0), 1.0, 0.0)) == 0.0
    with pytest.raises(ValueError, match="radius"):
        trust_region_factor(_t(1.0), _t(1.0), 1.0, -1.0)


def test_unit_floor_counts_output_rows():
    assert unit_floor_sq([torch.zeros(5, 3), torch.zeros(5), torch.zeros(())]) == 11.0


def test_a_shortened_maximiser_is_still_an_ascent_step_of_the_hamiltonian():
    """H̃(αΔ*) = α(1 − α/2)·⟨s, Δ*⟩ ≥ 0 for α ∈ [0, 1], against the direct definition (float64)."""
    torch.manual_seed(0)
    m, n, b = 4, 6, 10
    x, p = torch.randn(b, n, dtype=DT), torch.randn(b, m, dtype=DT)
    g = -(p.T @ x) / b
    rho, delta = 0.7, 0.05
    dense_l, dense_r = p.T @ p / b, x.T @ x / b
    dw = H.dense_sylvester_reference(-g, dense_l, dense_r, rho, delta)
    h_star = float(H.affine_augmented_hamiltonian(dw, None, x, p, b, rho, delta, grad_w=g))
    lin = float(-(g * dw).sum())
    assert h_star > 0 and lin > 0
    for a in (0.0, 0.1, 0.5, 0.9, 1.0):
        h = float(H.affine_augmented_hamiltonian(a * dw, None, x, p, b, rho, delta, grad_w=g))
        assert h == pytest.approx(a * (1 - a / 2) * lin, rel=1e-10, abs=1e-14)
        assert h >= 0.0


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm = nn.Linear(5, 8), nn.LayerNorm(8)
        self.conv, self.fc2 = nn.Conv1d(8, 8, 1, groups=4), nn.Linear(8, 2)

    def forward(self, x):
        h = self.norm(torch.tanh(self.fc1(x)))
        return self.fc2(self.conv(h.unsqueeze(-1)).squeeze(-1))


def _one_step(model, **kw):
    torch.manual_seed(3)
    x, y = torch.randn(16, 5, dtype=DT), torch.randn(16, 2, dtype=DT)
    opt = pmptrain.EMSA(model, strict=True, **kw)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    (100.0 * F.mse_loss(model(x), y)).backward()  # a large gradient: the region binds
    opt.step()
    table = opt.rule_table()
    opt.detach()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}, before, table


@pytest.mark.parametrize("tau", [0.01, 0.05])
def test_every_closed_form_unit_stays_in_its_region_and_binds_along_the_maximiser(tau):
    torch.manual_seed(0)
    base = _Net().to(DT)
    capped, before, table = _one_step(copy.deepcopy(base), lr=1e3, rho=0.1, max_step=tau)
    free, _, _ = _one_step(copy.deepcopy(base), lr=1e3, rho=0.1, max_step=None)
    bound = 0
    for row in table:
        names = row["params"]
        step = sum(float(capped[n].pow(2).sum()) for n in names) ** 0.5
        norm = sum(float(before[n].pow(2).sum()) for n in names) ** 0.5
        floor = unit_floor_sq([before[n] for n in names]) ** 0.5
        radius = tau * max(norm, floor)
        assert step <= radius * (1 + 1e-9), (row["unit"], step, radius)
        unguarded = sum(float(free[n].pow(2).sum()) for n in names) ** 0.5
        if unguarded > radius:  # shortened along the maximiser, onto the boundary
            bound += 1
            assert step == pytest.approx(radius, rel=1e-9)
            alpha = step / unguarded
            for n in names:
                torch.testing.assert_close(capped[n], alpha * free[n], rtol=1e-9, atol=1e-15)
        else:
            for n in names:
                torch.testing.assert_close(capped[n], free[n], rtol=0, atol=0)
        assert "step <= " in row["description"]
    assert bound >= 2


def test_a_schedule_still_scales_the_guarded_step_exactly():
    torch.manual_seed(0)
    base = _Net().to(DT)
    steps = {}
    for s in (1.0, 0.3):
        model = copy.deepcopy(base)
        torch.manual_seed(3)
        x, y = torch.randn(16, 5, dtype=DT), torch.randn(16, 2, dtype=DT)
        opt = pmptrain.EMSA(model, lr=1e3, rho=0.1, max_step=0.01)
        for g in opt.param_groups:
            g["lr"] = 1e3 * s
        w0 = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        (100.0 * F.mse_loss(model(x), y)).backward()
        opt.step()
        steps[s] = [p.detach() - w for p, w in zip(model.parameters(), w0)]
        opt.detach()
    for d1, ds in zip(steps[1.0], steps[0.3]):
        torch.testing.assert_close(ds, 0.3 * d1, rtol=1e-9, atol=1e-15)


def test_msa_and_the_iterative_solver_are_not_guarded():
    model = nn.Sequential(nn.Linear(3, 2))
    assert pmptrain.MSA(model).param_groups[0]["max_step"] is None
    assert "step <=" not in pmptrain.MSA(model).rule_table()[0]["description"]
    paper = pmptrain.EMSA.paper(model)
    assert "step <=" not in paper.rule_table()[0]["description"]


def test_max_step_is_validated():
    with pytest.raises(ValueError, match="max_step"):
        pmptrain.EMSA(nn.Linear(2, 2), max_step=0.0)
    with pytest.raises(ValueError, match="max_step"):
        pmptrain.EMSA(nn.Linear(2, 2), max_step=-1.0)


def test_an_adam_like_lr_warns_once_at_the_users_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
        opt = pmptrain.EMSA(net, params=net[0].parameters(), lr=1e-3)
        opt.add_param_group({"params": net[1].parameters(), "lr": 1e-4})  # warned once, not again
    msgs = [w for w in caught if "not an Adam learning rate" in str(w.message)]
    assert len(msgs) == 1 and msgs[0].filename == __file__
    for kw in (dict(lr=1.0), dict(lr=1e-3, rho=0.0), dict(lr=1e-3, solver="iterative"), dict(lr=0.0)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pmptrain.EMSA(nn.Linear(3, 3), **kw)
        assert not [w for w in caught if "Adam learning rate" in str(w.message)], kw


# ------------------------------------------------------------------ the predicted-gain guard (max_gain)

from pmptrain.trust import gain_factor  # noqa: E402


def test_gain_factor_caps_the_predicted_decrease_at_a_fraction_of_the_loss():
    assert gain_factor(0.4, 1.0, 0.5) == 1.0  # inside: unchanged
    assert gain_factor(10.0, 2.0, 0.5) * 10.0 == pytest.approx(0.5 * 2.0, rel=1e-15)
    for loss in (0.0, -1.0, float("nan"), float("inf")):  # no bound known: unchanged
        assert gain_factor(10.0, loss, 0.5) == 1.0
    assert gain_factor(-3.0, 1.0, 0.5) == 1.0  # an ascent of J is not this guard's business
    with pytest.raises(ValueError, match="kappa"):
        gain_factor(1.0, 1.0, 0.0)


class _LossNet(nn.Module):
    """Returns its own loss: a 0-dim tensor, or an object with ``.loss`` (Hugging Face's outputs)."""

    def __init__(self, wrapped: bool):
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)
        self.wrapped = wrapped

    def forward(self, x, y):
        loss = F.mse_loss(self.b(torch.tanh(self.a(x))), y)
        if self.wrapped:
            from types import SimpleNamespace
            return SimpleNamespace(loss=loss, logits=None)
        return loss


def _guarded_pair(wrapped, kappa, closure=False):
    """One step with and one without the guard from the same start (float64): the changes and the loss."""
    torch.manual_seed(0)
    base = _LossNet(wrapped).double()
    x, y = torch.randn(16, 3, dtype=DT), 10 * torch.randn(16, 2, dtype=DT)
    out = {}
    for k in (kappa, None):
        model = copy.deepcopy(base)
        opt = pmptrain.EMSA(model, lr=1e3, rho=0.1, max_gain=k)

        def run():
            opt.zero_grad()
            r = model(x, y)
            loss = r.loss if wrapped else r
            loss.backward()
            return loss

        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        if closure:
            loss = opt.step(run)
        else:
            loss = run()
            opt.step()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        change = {n: p.detach() - before[n] for n, p in model.named_parameters()}
        out[k] = (change, grads, float(loss.detach()), opt.last_step)
    return out


@pytest.mark.parametrize("wrapped,closure", [(False, False), (True, False), (False, True)],
                         ids=["root-returns-loss", "root-returns-output.loss", "closure"])
def test_guard_shortens_the_whole_step_along_itself_to_kappa_times_the_loss(wrapped, closure):
    kappa = 0.01
    out = _guarded_pair(wrapped, kappa, closure)
    (guarded, grads, loss, info), (free, _, _, free_info) = out[kappa], out[None]
    g_free = -sum(float((grads[n] * free[n]).sum()) for n in free)
    assert g_free > kappa * loss  # the unguarded step predicts more than κJ: the guard acts
    a = info["gain_scale"]
    assert a == pytest.approx(kappa * loss / g_free, rel=1e-6) and a < 1.0  # the shell sums ⟨g, Δ⟩ in float32
    for n in free:  # every unit's step shortened by the same factor: the direction is kept
        torch.testing.assert_close(guarded[n], a * free[n], rtol=1e-10, atol=1e-14)
    assert -sum(float((grads[n] * guarded[n]).sum()) for n in guarded) == pytest.approx(kappa * loss, rel=1e-6)
    assert info["hamiltonian_gain"] == pytest.approx(kappa * loss, rel=1e-6)
    assert free_info["gain_scale"] == 1.0


def test_guard_is_off_without_a_known_loss_and_with_max_gain_none():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x, y = torch.randn(16, 3, dtype=DT), 10 * torch.randn(16, 2, dtype=DT)
    opt = pmptrain.EMSA(model, lr=1e3, rho=0.1)
    F.mse_loss(model(x), y).backward()  # the loss is computed outside the model: unknown to the step
    opt.step()
    assert opt.last_step["gain_scale"] == 1.0
    assert pmptrain.EMSA.paper(nn.Linear(2, 2)).max_gain is None and pmptrain.MSA(nn.Linear(2, 2)).max_gain is None
    for bad in (0.0, -1.0, float("inf"), "x"):
        with pytest.raises(ValueError, match="max_gain"):
            pmptrain.EMSA(nn.Linear(2, 2), max_gain=bad)
