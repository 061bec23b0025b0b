"""Share of parameters on closed-form rules, for torch.nn models and Hugging Face models built from
tiny configs (docs/algorithms.md §2; issue 16's coverage table).

    PYTHONPATH=. python3 benchmarks/coverage.py [--models lstm,gru,...]

For each model: ``EMSA(model)``, one training forward/backward and a step (additive parameters
are recognised at the first forward), then the share of parameter entries whose unit is a
closed-form rule and that did not take the fallback step; and what falls back, with the reason of
the warning. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import re
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import pmptrain


class Seq(nn.Module):
    def __init__(self, rnn, out):
        super().__init__()
        self.rnn, self.head = rnn, nn.Linear(out, 5)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


class Decoder(nn.Module):
    """A ConvTranspose decoder (DCGAN-style)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 32 * 4 * 4)
        self.up = nn.Sequential(nn.ConvTranspose2d(32, 16, 4, 2, 1), nn.BatchNorm2d(16), nn.PReLU(16),
                                nn.ConvTranspose2d(16, 3, 4, 2, 1))

    def forward(self, z):
        return self.up(self.fc(z).view(-1, 32, 4, 4))


def _torch_models():
    seq = torch.randn(4, 7, 6)
    yield "nn.LSTM (2 layers, bidir)", Seq(nn.LSTM(6, 16, 2, bidirectional=True, batch_first=True), 32), \
        lambda m: m(seq).pow(2).mean()
    yield "nn.GRU", Seq(nn.GRU(6, 16, batch_first=True), 16), lambda m: m(seq).pow(2).mean()
    yield "nn.RNN", Seq(nn.RNN(6, 16, batch_first=True), 16), lambda m: m(seq).pow(2).mean()
    yield "ConvTranspose decoder", Decoder(), lambda m: m(torch.randn(2, 8)).pow(2).mean()


def _hf_models():
    import transformers as T

    ids = torch.randint(0, 64, (2, 8))
    lm = lambda m: m(input_ids=ids, labels=ids).loss  # noqa: E731
    img = torch.randn(2, 3, 32, 32)
    yield "Mixtral", T.MixtralForCausalLM(T.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
        experts_implementation="eager")), lm  # grouped_mm (the default) fails on CPU for F = 37
    yield "GPT-NeoX", T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)), lm
    yield "Mamba", T.MambaForCausalLM(T.MambaConfig(vocab_size=64, hidden_size=32, state_size=4,
                                                    num_hidden_layers=1, expand=2)), lm
    yield "ViT", T.ViTForImageClassification(T.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=37, num_labels=3)), lambda m: m(pixel_values=img, labels=torch.tensor([0, 1])).loss
    clip = T.CLIPConfig(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=16),
                        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                                           num_hidden_layers=1, num_attention_heads=2), projection_dim=16)
    yield "CLIP", T.CLIPModel(clip), lambda m: m(input_ids=ids, pixel_values=img, return_loss=True).loss
    yield "Swin", T.SwinForImageClassification(T.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
        num_labels=3)), lambda m: m(pixel_values=img, labels=torch.tensor([0, 1])).loss
    yield "ConvNeXt", T.ConvNextForImageClassification(T.ConvNextConfig(
        num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3)), \
        lambda m: m(pixel_values=img, labels=torch.tensor([0, 1])).loss
    wcfg = T.WhisperConfig(vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                           num_mel_bins=8, d_model=32, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=37,
                           decoder_ffn_dim=37, max_source_positions=8, max_target_positions=16)
    feats = torch.randn(2, 8, 16)
    yield "Whisper", T.WhisperForConditionalGeneration(wcfg), \
        lambda m: m(input_features=feats, decoder_input_ids=ids[:, :6], labels=ids[:, :6]).loss


def coverage(model, loss_fn):
    """``(share on closed-form rules, {param name: reason})``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = pmptrain.EMSA(model)
        model.train()
        loss_fn(model).backward()
        try:
            opt.step()
            error = None
        except Exception as exc:  # noqa: BLE001 — reported in the table
            error = f"step() raised {type(exc).__name__}: {str(exc)[:80]}"
    reasons = {}
    for w in caught:
        msg = str(w.message)
        m = re.search(r"module '([^']*)' \(\w+\) has no closed-form maximiser: ([^;]*)", msg)
        if m:
            reasons[m.group(1)] = m.group(2)[:60]
        m = re.search(r"parameter '([^']*)' of module '([^']*)' is not an additive parameter \(([^)]*)\)", msg)
        if m:
            reasons[f"{m.group(2)}.{m.group(1)}"] = m.group(3)
    total = controlled = 0
    falling = {}
    for unit in opt.units.values():
        for p, n in zip(unit.params, unit.param_names):
            total += p.numel()
            ok = unit.rule.name not in ("fallback",)
            if unit.rule.name == "emsa-additive":
                observation = getattr(opt.capture, "observation", None)
                obs = observation(unit.members[0].name) if observation is not None else None
                short = n.rsplit(".", 1)[-1]
                kinds = getattr(obs, "kinds", None)
                ok = obs is not None and ((kinds or {}).get(short) is not None or obs.uses.get(short) is not None)
            if ok:
                controlled += p.numel()
            else:
                falling[n] = p.numel()
    return controlled / max(1, total), falling, reasons, error


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="", help="comma-separated substrings of model names (default all)")
    args = ap.parse_args(argv)
    keys = [k.strip().lower() for k in args.models.split(",") if k.strip()]
    print("| model | % controlled | falls back (entries) | why |")
    print("|---|---|---|---|")
    for gen in (_torch_models, _hf_models):
        for name, model, loss_fn in gen():
            if keys and not any(k in name.lower() for k in keys):
                continue
            torch.manual_seed(0)
            share, falling, reasons, error = coverage(model, loss_fn)
            fb = ", ".join(f"{n} ({c})" for n, c in list(falling.items())[:6]) + (" …" if len(falling) > 6 else "")
            why = "; ".join(sorted({f"{k}: {v}" for k, v in reasons.items()}))[:300]
            print(f"| {name} | {100 * share:.1f} | {fb or '—'} | {error or why or '—'} |", flush=True)


if __name__ == "__main__":
    main()
