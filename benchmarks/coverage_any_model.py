"""Coverage of EMSA's closed-form rules on torch's attention layers and tiny Hugging Face models:
the share of trainable parameters a closed-form rule (not the fallback) updates, from
``opt.rule_table()``, and whether one ``step()`` works.

    PYTHONPATH=$PWD python3 benchmarks/coverage_any_model.py
"""

import os
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import pmptrain  # noqa: E402


def _torch_models():
    d = 16
    yield "nn.MultiheadAttention", lambda: nn.MultiheadAttention(d, 2), lambda m: m(*(torch.randn(5, 3, d),) * 3)[0]
    yield "nn.MultiheadAttention(kdim,vdim,bias_kv)", \
        lambda: nn.MultiheadAttention(d, 2, kdim=8, vdim=6, add_bias_kv=True, add_zero_attn=True), \
        lambda m: m(torch.randn(5, 3, d), torch.randn(4, 3, 8), torch.randn(4, 3, 6))[0]
    yield "nn.TransformerEncoderLayer", lambda: nn.TransformerEncoderLayer(d, 2, 32, batch_first=True), \
        lambda m: m(torch.randn(3, 5, d))
    yield "nn.TransformerDecoderLayer", lambda: nn.TransformerDecoderLayer(d, 2, 32, batch_first=True), \
        lambda m: m(torch.randn(3, 5, d), torch.randn(3, 4, d))
    yield "nn.Transformer", lambda: nn.Transformer(d, 2, 1, 1, 32, batch_first=True), \
        lambda m: m(torch.randn(3, 5, d), torch.randn(3, 4, d))


def _nanogpt():
    from nanogpt_faithful import GPT, GPTConfig

    yield "nanoGPT (faithful, tied)", lambda: GPT(GPTConfig()), lambda m: m(torch.randint(0, 64, (2, 8)))[0]


def _hf():
    import transformers as tf

    ids = lambda m: torch.randint(0, 64, (2, 8))  # noqa: E731
    yield "HF BERT (MLM, tied)", lambda: tf.BertForMaskedLM(tf.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)), \
        lambda m: m(input_ids=ids(m)).logits
    yield "HF T5", lambda: tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=2)), \
        lambda m: m(input_ids=ids(m), decoder_input_ids=ids(m)).logits
    yield "HF Gemma", lambda: tf.GemmaForCausalLM(tf.GemmaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16)), lambda m: m(input_ids=ids(m)).logits
    yield "HF ConvNeXt", lambda: tf.ConvNextForImageClassification(tf.ConvNextConfig(
        num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3, image_size=32)), \
        lambda m: m(pixel_values=torch.randn(2, 3, 32, 32)).logits
    yield "HF Mamba", lambda: tf.MambaForCausalLM(tf.MambaConfig(
        vocab_size=64, hidden_size=32, state_size=4, num_hidden_layers=1, expand=2, conv_kernel=3)), \
        lambda m: m(input_ids=ids(m)).logits


def measure(name, build, run):
    torch.manual_seed(0)
    model = build()
    model.train()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            opt = pmptrain.EMSA(model)
        except Exception as e:  # noqa: BLE001
            return f"| {name} | construct: {type(e).__name__}: {str(e)[:80]} | | |"
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fb = [r for r in opt.rule_table() if r["rule"] == "fallback"]
    fb_n = sum(sizes.get(pn, 0) for r in fb for pn in r["params"])
    try:
        strict_ok = pmptrain.EMSA(model, strict=True) is not None
    except ValueError:
        strict_ok = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = pmptrain.EMSA(model)
        try:
            out = run(model)
            out.float().pow(2).mean().backward()
            opt.step()
            ok = "ok"
        except Exception as e:  # noqa: BLE001
            ok = f"{type(e).__name__}: {str(e)[:70]}"
    fb2 = [r for r in opt.rule_table() if r["rule"] == "fallback"]
    fb2_n = sum(sizes.get(pn, 0) for r in fb2 for pn in r["params"])
    names = sorted({r["unit"].rsplit(".", 1)[-1] if "." in r["unit"] else r["unit"] for r in fb2})
    return (f"| {name} | {100.0 * (total - fb_n) / total:.1f} % | {100.0 * (total - fb2_n) / total:.1f} % | "
            f"{'yes' if strict_ok else 'no'} | {ok} | {', '.join(names[:6])} |")


def main():
    print("| model | % params on closed-form rules (construction) | (after step 1) | strict=True | step() | "
          "falls back |")
    print("|---|---|---|---|---|---|")
    for gen in (_torch_models, _nanogpt, _hf):
        try:
            for name, build, run in gen():
                print(measure(name, build, run), flush=True)
        except ImportError as e:
            print(f"| {gen.__name__} | skipped: {e} | | | | |")


if __name__ == "__main__":
    main()
