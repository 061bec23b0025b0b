"""The model zoo: E-MSA on torch's built-in parameterised modules and on Hugging Face architectures.

Every model of ``benchmarks/coverage.py``'s ``ZOO`` (torch.nn modules regressed onto a fixed
target; HF models from tiny configs, sequence length 8, skipped without transformers) is checked
for: ``step()`` works; the share of parameters on a closed-form rule is at least its expected
minimum; ``strict=True`` is accepted exactly when nothing falls back; three steps on a fixed batch
lower the loss — with the defaults and with the transformer setting, without gradient clipping —
and no step raises it above its starting value.
"""

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch

import pmptrain

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from coverage import HF_ZOO, SETTINGS, ZOO, coverage, have_transformers  # noqa: E402

# The share of trainable parameters on a closed-form rule after one training step (additive
# parameters are recognised at the first forward; a claimed module whose hooks never fired falls
# back at the first step), as measured with EMSA(model) (python3 benchmarks/coverage.py). Floors:
# raise an entry when its coverage grows. Below 1, only parameters that enter nonlinearly: CLIP's
# logit_scale and Mamba/Mamba2's A_log (both through exp). Mamba's conv1d and dt_proj and Mamba2's
# conv1d, whose weights the mixer applies functionally, are recorded by pmptrain.taps.
EXPECTED_MIN_SHARE = {name: 1.0 for name in ZOO}
EXPECTED_MIN_SHARE.update({"clip": 0.9998, "mamba": 0.952, "mamba2": 0.9986})

# Known defects (the test runs and reports them as xfail; remove an entry when its fix lands).
STEP_FAILS = {}  # step() raises
STRICT_DISAGREES = {}  # strict=True disagrees with the rule table

RAISES = {}  # (model, setting): a step raises the loss above its start

STEPS = 3


def _skip_without_transformers(name):
    if name in HF_ZOO and not have_transformers():
        pytest.skip("transformers is not installed")


def _xfail(name, known):
    if name in known:
        pytest.xfail(known[name])


def test_every_model_has_an_expected_share():
    assert set(EXPECTED_MIN_SHARE) == set(ZOO)
    assert {"bert", "roberta", "distilbert", "vit", "t5", "bart", "whisper", "clip", "gpt2", "gpt_neox", "llama",
            "mistral", "mixtral", "qwen2", "phi3", "gemma", "mamba", "convnext", "swin"} <= set(HF_ZOO)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_share_and_strict(name):
    _skip_without_transformers(name)
    model, batch, loss_fn = ZOO[name]()
    cov = coverage(copy.deepcopy(model), batch, loss_fn)  # after one step (additive/silent modules decided)
    assert cov["share"] >= EXPECTED_MIN_SHARE[name] - 1e-9, (cov["share"], cov["fallback"])
    assert (cov["share"] == 1.0) == (not cov["fallback"])
    _xfail(name, STRICT_DISAGREES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # strict raises at construction, or at the first step for what only a forward shows
            opt = pmptrain.EMSA(model, strict=True)
            model.train()
            loss_fn(model, batch).backward()
            opt.step()
            opt.detach()
            accepted = True
        except ValueError:
            accepted = False
    assert accepted == (not cov["fallback"]), cov["fallback"]


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("name", sorted(ZOO))
def test_a_few_steps_lower_the_loss_without_clipping(name, setting):
    _skip_without_transformers(name)
    _xfail(name, STEP_FAILS)
    _xfail((name, setting), RAISES)
    model, batch, loss_fn = ZOO[name]()
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = pmptrain.EMSA(model, **SETTINGS[setting])
        losses = []
        for _ in range(STEPS):
            opt.zero_grad()
            torch.manual_seed(1)  # the same dropout masks every step: one fixed objective
            loss = loss_fn(model, batch)
            losses.append(float(loss))
            loss.backward()
            opt.step()
        torch.manual_seed(1)
        with torch.no_grad():
            losses.append(float(loss_fn(model, batch)))
    opt.detach()
    assert opt.skipped_steps == 0
    assert losses[-1] < losses[0], losses
    assert max(losses[1:]) <= losses[0], losses


@pytest.mark.parametrize("name", sorted(ZOO))
def test_the_default_setting_follows_the_model_structure(name):
    """``EMSA(model)`` (``setting="auto"``) takes the transformer setting exactly for the models with
    a token embedding or attention module, the conv setting for the other models with a trainable
    convolution, and prints its choice in ``rule_table()``."""
    _skip_without_transformers(name)
    from torch import nn

    model, _, _ = ZOO[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = pmptrain.EMSA(model)
    kinds = (nn.Embedding, nn.EmbeddingBag, nn.MultiheadAttention)
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    expected = ("transformer" if any(isinstance(m, kinds) for m in model.modules()) else
                "conv" if any(isinstance(m, convs) and m.weight.requires_grad for m in model.modules()) else "classic")
    assert opt.setting == expected
    assert str(opt.rule_table()).splitlines()[0].startswith(f"setting: {expected} (auto")
    group = opt.param_groups[0]
    assert {k: group[k] for k in pmptrain.optim.emsa.SETTING_KEYS} == pmptrain.optim.emsa.SETTINGS[expected]
    opt.detach()
