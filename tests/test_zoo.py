"""The model zoo: E-MSA on torch's built-in parameterised modules and on Hugging Face architectures.

Every model of ``benchmarks/coverage.py``'s ``ZOO`` (torch.nn modules regressed onto a fixed
target; HF models from tiny configs, sequence length 8, skipped without transformers) is checked
for: ``step()`` works; the share of parameters on a closed-form rule is at least its expected
minimum; ``strict=True`` is accepted exactly when nothing falls back; three steps on a fixed batch
lower the loss — with the defaults and with the transformer setting, without gradient clipping —
and no step raises it above its starting value.
"""

import sys
import warnings
from pathlib import Path

import pytest
import torch

import pmptrain

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from coverage import HF_ZOO, ZOO, coverage, have_transformers  # noqa: E402

# The share of trainable parameters on a closed-form rule, as measured with EMSA(model) on this
# branch (python3 benchmarks/coverage.py). These are floors, not targets: issue 16 raises them
# (closed forms for RNNs, transposed convolutions, Bilinear, PReLU, EmbeddingBag, additive
# parameters, norms recognised by what they compute, MoE); raise an entry when its coverage grows.
EXPECTED_MIN_SHARE = {
    "Linear": 1.0, "Conv1d": 1.0, "Conv2d": 1.0, "Conv3d": 1.0, "Conv2d-depthwise": 1.0,
    "ConvTranspose1d": 0.0, "ConvTranspose2d": 0.0, "ConvTranspose3d": 0.0,
    "BatchNorm1d": 1.0, "BatchNorm2d": 1.0, "LayerNorm": 1.0, "GroupNorm": 1.0, "InstanceNorm2d": 1.0,
    "RMSNorm": 1.0, "Embedding": 1.0, "EmbeddingBag": 0.0,
    "RNN": 0.0, "LSTM": 0.0, "GRU": 0.0, "LSTMCell": 0.0,
    "MultiheadAttention": 0.25, "TransformerEncoder": 0.64, "TransformerDecoder": 0.522,
    "Bilinear": 0.0, "PReLU": 0.0,
    "bert": 1.0, "roberta": 1.0, "distilbert": 1.0, "vit": 0.982, "t5": 0.982, "bart": 0.859,
    "whisper": 0.968, "clip": 0.997, "gpt2": 1.0, "gpt_neox": 1.0, "llama": 1.0, "mistral": 1.0,
    "mixtral": 0.222, "qwen2": 1.0, "phi3": 1.0, "gemma": 0.985, "mamba": 0.931, "convnext": 0.977,
    "swin": 0.994,
}

# Known defects of issue 16 on this branch (fixed in parallel): the test runs and reports them as
# xfail; remove an entry when its fix lands.
STEP_FAILS = {  # step() raises: a claimed module whose hooks never fire
    "MultiheadAttention": "out_proj's weight is read by F.multi_head_attention_forward (issue 16, item 1)",
    "TransformerEncoder": "nn.MultiheadAttention's out_proj (issue 16, item 1)",
    "TransformerDecoder": "nn.MultiheadAttention's out_proj (issue 16, item 1)",
    "mamba": "MambaMixer's conv1d is read by a fused kernel (issue 16, item 1)",
}
STRICT_DISAGREES = {  # strict=True rejects a model whose every parameter is on a closed-form rule
    "bert": "the decoder tied to the word embedding (issue 16, item 3)",
    "roberta": "the decoder tied to the word embedding (issue 16, item 3)",
}

RAISES = {  # (model, setting): a step raises the loss above its start although the trust region holds
    ("clip", "transformer"): "CLIP's batch-2 contrastive loss behind L2-normalised projections and logit scale 14.3 "
                             "is sharper than a 10 % step assumes: 2.817 → 1.391 → 3.237 → 1.537 at max_step 0.1 "
                             "(also at 0.03 and 0.05; only 0.01 is monotone; AdamW 1e-3 is)",
}

SETTINGS = {"default": {}, "transformer": dict(rho=5, rho_scale="costate", lr=1e3)}
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
    model = ZOO[name]()[0]
    cov = coverage(model)
    assert cov["share"] >= EXPECTED_MIN_SHARE[name] - 1e-9, (cov["share"], cov["fallback"])
    assert (cov["share"] == 1.0) == (not cov["fallback"])
    _xfail(name, STRICT_DISAGREES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pmptrain.EMSA(model, strict=True).detach()
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
