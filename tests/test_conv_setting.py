"""``EMSA(model)`` on convolutional models: the ``conv`` setting (issue 17, per second) — the classic
step with ``stat_every=10``, ``amortise="bounded"``, ``stat_reduce=True`` — and the ``auto`` rule
that keeps every explicit keyword's meaning."""

import copy
import warnings

import pytest
import torch
from torch import nn

import pmptrain
from pmptrain.optim.emsa import SETTINGS, SETTING_KEYS, choose_setting, conv_modules


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 6, 3, stride=2), nn.Tanh(),
                         nn.Flatten(), nn.Linear(6 * 5 * 5, 3)).double()


def test_auto_picks_conv_for_convolutional_models_only():
    cnn, mlp = _cnn(), nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    assert conv_modules(cnn) == ["0", "2"] and conv_modules(mlp) == []
    assert choose_setting("auto", cnn, {})[:2] == ("conv", "auto: convolutions (0 and 1 more)")
    assert choose_setting("auto", mlp, {})[0] == "classic"
    frozen = _cnn()
    for m in (frozen[0], frozen[2]):
        m.requires_grad_(False)
    assert choose_setting("auto", frozen, {})[0] == "classic"  # no trainable convolution
    seq = nn.ModuleDict({"emb": nn.Embedding(10, 4), "conv": nn.Conv1d(4, 4, 3)})
    assert choose_setting("auto", seq, {})[0] == "transformer"  # token models keep theirs
    assert SETTINGS["conv"] == dict(SETTINGS["classic"], stat_every=10, amortise="bounded", stat_reduce=True)
    assert set(SETTINGS["conv"]) == set(SETTING_KEYS)


@pytest.mark.parametrize("given", [dict(lr=1.0), dict(rho=0.5), dict(rho_scale="none"), dict(stat_every=1),
                                   dict(stat_every=10), dict(amortise="kept"), dict(stat_reduce=False),
                                   dict(costate="isotropic"), dict(costate="exact"), dict(penalty_units="sum"),
                                   dict(stat_decay=0.9), dict(grad_decay=0.0), dict(route="primal"),
                                   dict(eig_refresh=3)])
def test_an_explicit_keyword_keeps_its_classic_meaning(given):
    """Code written before the setting existed gets the same optimizer: any of these keywords given
    means the classic setting, the others at the classic values (``stat_every=1``, ``"kept"``, full
    statistics)."""
    name, why, values = choose_setting("auto", _cnn(), given)
    assert name == "classic" and "given" in why
    for k in ("stat_every", "amortise", "stat_reduce"):
        assert values[k] == given.get(k, SETTINGS["classic"][k])
    # the defaults of costate/penalty_units do not count as given
    assert choose_setting("auto", _cnn(), dict(costate="auto", penalty_units="mean", route="auto",
                                               eig_refresh=1))[0] == "conv"


def test_conv_setting_steps_as_the_classic_step_with_the_amortisation_spelled_out():
    """``EMSA(cnn)`` takes exactly the steps of ``EMSA(cnn, setting="classic", stat_every=10,
    amortise="bounded", stat_reduce=True)`` (float64, 12 steps: a refresh, 9 bounded steps, a refresh
    and one more), and differs from the exact classic step after the first refresh."""
    torch.manual_seed(1)
    batches = [(torch.randn(8, 1, 12, 12, dtype=torch.float64), torch.randint(0, 3, (8,))) for _ in range(12)]
    models = [_cnn() for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opts = [pmptrain.EMSA(models[0]),
                pmptrain.EMSA(models[1], setting="classic", stat_every=10, amortise="bounded", stat_reduce=True),
                pmptrain.EMSA(models[2], stat_every=1)]
    assert [o.setting for o in opts] == ["conv", "classic", "classic"]
    assert str(opts[0].rule_table()).splitlines()[0].startswith("setting: conv (auto: convolutions")
    for x, y in batches:
        for m, o in zip(models, opts):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for o in opts:
        assert o.skipped_steps == 0
        o.detach()
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=0)
    gap = max(float((p - q).detach().abs().max()) for p, q in zip(models[0].parameters(), models[2].parameters()))
    assert gap > 1e-6
