"""Which parameters of torch's built-in modules and of Hugging Face models E-MSA controls.

For every model of the zoo (torch.nn's parameterised modules, and HF architectures built from tiny
configs) build ``pmptrain.EMSA(model)`` and print, from ``opt.rule_table()``: the share of
parameters on a closed-form rule, what falls back (the fallback units) and why (the construction
warning that names them).

    python3 benchmarks/coverage.py                  # every model (HF ones skip without transformers)
    python3 benchmarks/coverage.py --models gpt2,bert --json cov.json
    python3 benchmarks/coverage.py --models clip --steps 6   # + unclipped steps at both zoo settings

The same zoo drives tests/test_zoo.py (``ZOO``: name → builder of ``(model, batch, loss_fn)``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

SEQ = 8      # tokens per sequence
BATCH = 2    # sequences per batch
VOCAB = 64


class Wrapped(nn.Module):
    """A module of torch.nn with the call that feeds it (``fn(module, batch)`` → a tensor)."""

    def __init__(self, module: nn.Module, fn: Callable):
        super().__init__()
        self.m = module
        self.fn = fn

    def forward(self, batch):
        return self.fn(self.m, batch)


def _regression(module, make_input, call=lambda m, x: m(x), out=lambda y: y):
    """A torch.nn module regressed onto a fixed random target of its output's shape."""
    def build():
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        mod = module()
        x = make_input(g)
        model = Wrapped(mod, lambda m, b: out(call(m, b)))
        with torch.no_grad():
            target = torch.randn(model(x).shape, generator=g)

        def loss(model, batch):
            return F.mse_loss(model(batch), target)
        return model, x, loss
    return build


def _randn(*shape):
    return lambda g: torch.randn(*shape, generator=g)


def _tokens(g, n=BATCH, t=SEQ, vocab=VOCAB):
    return torch.randint(0, vocab, (n, t), generator=g)


def _nanogpt():
    """karpathy/nanoGPT's own model definition (its LayerNorm class, tied wte/lm_head), as in
    tests/nanogpt_faithful.py, trained on its own next-token loss."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from nanogpt_faithful import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB))
    ids = _tokens(torch.Generator().manual_seed(0))

    def loss(model, batch):
        return model(batch[:, :-1], batch[:, 1:].contiguous())[1]
    return model, ids, loss


TORCH_ZOO = {
    "Linear": _regression(lambda: nn.Linear(6, 5), _randn(8, 6)),
    "Conv1d": _regression(lambda: nn.Conv1d(3, 4, 3), _randn(2, 3, 10)),
    "Conv2d": _regression(lambda: nn.Conv2d(3, 4, 3), _randn(2, 3, 6, 6)),
    "Conv3d": _regression(lambda: nn.Conv3d(2, 3, 2), _randn(2, 2, 4, 4, 4)),
    "Conv2d-depthwise": _regression(lambda: nn.Conv2d(4, 4, 3, groups=4), _randn(2, 4, 6, 6)),
    "ConvTranspose1d": _regression(lambda: nn.ConvTranspose1d(3, 4, 3), _randn(2, 3, 6)),
    "ConvTranspose2d": _regression(lambda: nn.ConvTranspose2d(3, 4, 3), _randn(2, 3, 4, 4)),
    "ConvTranspose3d": _regression(lambda: nn.ConvTranspose3d(2, 3, 2), _randn(2, 2, 3, 3, 3)),
    "ConvTranspose2d-grouped": _regression(lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2),
                                           _randn(2, 4, 4, 4)),
    "BatchNorm1d": _regression(lambda: nn.BatchNorm1d(5), _randn(8, 5)),
    "BatchNorm2d": _regression(lambda: nn.BatchNorm2d(3), _randn(4, 3, 4, 4)),
    "LayerNorm": _regression(lambda: nn.LayerNorm(6), _randn(8, 6)),
    "GroupNorm": _regression(lambda: nn.GroupNorm(2, 4), _randn(4, 4, 5)),
    "InstanceNorm2d": _regression(lambda: nn.InstanceNorm2d(3, affine=True), _randn(4, 3, 4, 4)),
    "RMSNorm": _regression(lambda: nn.RMSNorm(6), _randn(8, 6)),
    "Embedding": _regression(lambda: nn.Embedding(VOCAB, 6), _tokens),
    "EmbeddingBag": _regression(lambda: nn.EmbeddingBag(VOCAB, 6, mode="mean"), _tokens),
    "RNN": _regression(lambda: nn.RNN(4, 5, batch_first=True), _randn(2, SEQ, 4), out=lambda y: y[0]),
    "LSTM": _regression(lambda: nn.LSTM(4, 5, batch_first=True), _randn(2, SEQ, 4), out=lambda y: y[0]),
    "GRU": _regression(lambda: nn.GRU(4, 5, batch_first=True), _randn(2, SEQ, 4), out=lambda y: y[0]),
    "LSTMCell": _regression(lambda: nn.LSTMCell(4, 5), _randn(6, 4), out=lambda y: y[0]),
    "MultiheadAttention": _regression(lambda: nn.MultiheadAttention(8, 2, batch_first=True), _randn(2, SEQ, 8),
                                      call=lambda m, x: m(x, x, x)[0]),
    "TransformerEncoder": _regression(
        lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2,
                                      enable_nested_tensor=False), _randn(2, SEQ, 8)),
    "MultiheadAttention-kdim-vdim-bias_kv": _regression(
        lambda: nn.MultiheadAttention(8, 2, kdim=6, vdim=5, add_bias_kv=True, add_zero_attn=True, batch_first=True),
        lambda g: (torch.randn(2, SEQ, 8, generator=g), torch.randn(2, SEQ - 2, 6, generator=g),
                   torch.randn(2, SEQ - 2, 5, generator=g)),
        call=lambda m, x: m(*x)[0]),
    "Transformer": _regression(
        lambda: nn.Transformer(8, 2, 1, 1, 16, dropout=0.0, batch_first=True), _randn(2, SEQ, 8),
        call=lambda m, x: m(x, x)),
    "TransformerDecoder": _regression(
        lambda: nn.TransformerDecoder(nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1),
        _randn(2, SEQ, 8), call=lambda m, x: m(x, x)),
    "Bilinear": _regression(lambda: nn.Bilinear(4, 3, 5), lambda g: (torch.randn(6, 4, generator=g),
                                                                      torch.randn(6, 3, generator=g)),
                            call=lambda m, x: m(*x)),
    "PReLU": _regression(lambda: nn.PReLU(4), _randn(8, 4)),
    "nanoGPT": _nanogpt,
}


# ---------------------------------------------------------------------------------------- Hugging Face
_TINY = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=VOCAB,
             max_position_embeddings=32, bos_token_id=1, eos_token_id=2)


def _causal(config_name, **extra):
    def build():
        import transformers

        cfg = getattr(transformers, config_name)(**{**_TINY, **extra})
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        ids = _tokens(torch.Generator().manual_seed(0))

        def loss(model, batch):
            return model(input_ids=batch, labels=batch).loss
        return model, ids, loss
    return build


def _masked(config_name, **extra):
    def build():
        import transformers

        cfg = getattr(transformers, config_name)(**{**_TINY, **extra})
        torch.manual_seed(0)
        model = transformers.AutoModelForMaskedLM.from_config(cfg)
        ids = _tokens(torch.Generator().manual_seed(0))

        def loss(model, batch):
            return model(input_ids=batch, labels=batch).loss
        return model, ids, loss
    return build


def _seq2seq(config_name, **extra):
    def build():
        import transformers

        cfg = getattr(transformers, config_name)(**extra)
        torch.manual_seed(0)
        model = transformers.AutoModelForSeq2SeqLM.from_config(cfg)
        g = torch.Generator().manual_seed(0)
        batch = (_tokens(g), _tokens(g))

        def loss(model, batch):
            return model(input_ids=batch[0], labels=batch[1]).loss
        return model, batch, loss
    return build


def _image(config_name, auto="AutoModelForImageClassification", **extra):
    def build():
        import transformers

        cfg = getattr(transformers, config_name)(**extra)
        torch.manual_seed(0)
        model = getattr(transformers, auto).from_config(cfg)
        g = torch.Generator().manual_seed(0)
        batch = (torch.randn(BATCH, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g),
                 torch.randint(0, cfg.num_labels, (BATCH,), generator=g))

        def loss(model, batch):
            return model(pixel_values=batch[0], labels=batch[1]).loss
        return model, batch, loss
    return build


def _whisper():
    import transformers

    cfg = transformers.WhisperConfig(vocab_size=VOCAB, num_mel_bins=8, d_model=16, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                     decoder_ffn_dim=32, max_source_positions=8, max_target_positions=16,
                                     decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                     suppress_tokens=[], begin_suppress_tokens=[])
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(BATCH, 8, 16, generator=g), _tokens(g))

    def loss(model, batch):
        return model(input_features=batch[0], labels=batch[1]).loss
    return model, batch, loss


def _clip():
    import transformers

    text = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=SEQ, bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                  patch_size=4, num_channels=3)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg)
    g = torch.Generator().manual_seed(0)
    batch = (_tokens(g), torch.randn(BATCH, 3, 8, 8, generator=g))

    def loss(model, batch):
        return model(input_ids=batch[0], pixel_values=batch[1], return_loss=True).loss
    return model, batch, loss


_SMALL_IMG = dict(image_size=8, num_channels=3, num_labels=3)
_S2S = dict(vocab_size=VOCAB, decoder_start_token_id=0, pad_token_id=0)

HF_ZOO = {
    "bert": _masked("BertConfig"),
    "roberta": _masked("RobertaConfig", pad_token_id=1, max_position_embeddings=40),
    "distilbert": _masked("DistilBertConfig", dim=16, hidden_dim=32, n_layers=2, n_heads=2),
    "vit": _image("ViTConfig", hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  patch_size=4, **_SMALL_IMG),
    "t5": _seq2seq("T5Config", d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, **_S2S),
    "bart": _seq2seq("BartConfig", d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                     **_S2S),
    "whisper": _whisper,
    "clip": _clip,
    "gpt2": _causal("GPT2Config", n_embd=16, n_layer=2, n_head=2, n_positions=32),
    "gpt_neox": _causal("GPTNeoXConfig"),
    "llama": _causal("LlamaConfig", num_key_value_heads=1),
    "mistral": _causal("MistralConfig", num_key_value_heads=1),
    "mixtral": _causal("MixtralConfig", num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": _causal("Qwen2Config", num_key_value_heads=1),
    "phi3": _causal("Phi3Config", num_key_value_heads=1, pad_token_id=0),
    "gemma": _causal("GemmaConfig", num_key_value_heads=1, head_dim=8),
    "mamba": _causal("MambaConfig", state_size=4, expand=2, conv_kernel=2),
    "mamba2": _causal("Mamba2Config", state_size=4, expand=2, conv_kernel=2, num_heads=4, head_dim=8, n_groups=1,
                      chunk_size=8),
    "convnext": _image("ConvNextConfig", num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], patch_size=2,
                       **_SMALL_IMG),
    "swin": _image("SwinConfig", embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=2, patch_size=2,
                   **_SMALL_IMG),
}

ZOO: Dict[str, Callable[[], Tuple[nn.Module, object, Callable]]] = {**TORCH_ZOO, **HF_ZOO}


def have_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: not usable here
        return False
    return True


_UNSUPPORTED = re.compile(r"module '(.*?)' \((\w+)\) has no closed-form maximiser: (.*); its parameters take")


def coverage(model: nn.Module, batch=None, loss_fn=None, **emsa_kwargs) -> dict:
    """``EMSA(model, **emsa_kwargs)``'s rule table summarised: ``share`` of trainable parameters on
    a closed-form rule, ``fallback`` (unit → parameter count) and ``why`` (each reason of the
    warnings → the modules it names). With ``batch`` and ``loss_fn`` the table is read after one
    training step: additive parameters are recognised at the first forward, and a claimed module
    whose hooks never fired falls back at the first step."""
    import pmptrain

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = pmptrain.EMSA(model, **emsa_kwargs)
        if batch is not None:
            model.train()
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
    numel = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    total = sum(numel.values())
    controlled, fallback = 0, {}
    for row in opt.rule_table():
        unit = opt.units.get(row["unit"])
        fallen = set(unit.rule.fallback_params(unit)) if hasattr(unit.rule, "fallback_params") else set()
        for p in fallen:  # an additive unit's parameters that entered otherwise (exp, …)
            fallback[p] = numel.get(p, 0)
        n = sum(numel.get(p, 0) for p in row["params"] if p not in fallen)
        if row["rule"] == "fallback":
            fallback[row["unit"]] = n
        else:
            controlled += n
    opt.detach()
    why = {}
    for w in caught:
        text = str(w.message)
        m = _UNSUPPORTED.match(text)
        if m:  # one line per class and reason, not per module
            why.setdefault(f"{m.group(2)}: {m.group(3)}", []).append(m.group(1))
        elif "fallback" in text:
            why.setdefault(text, [])
    return {"share": controlled / total if total else 1.0, "params": total, "fallback": fallback, "why": why}


#: two settings of the zoo test (``EMSA(model)``'s default, ``setting="auto"``, is ``transformer`` for
#: models with token embeddings or attention, ``conv`` — classic with amortised statistics — for other
#: models with convolutions, ``classic`` otherwise)
SETTINGS = {"classic": dict(setting="classic"), "transformer": dict(setting="transformer")}


def steps(model: nn.Module, batch, loss_fn, n: int, **emsa_kwargs) -> Tuple[list, list]:
    """``(losses, gain_scales)``: ``n`` unclipped E-MSA steps on one fixed batch (the same dropout
    masks every step), the losses before each step and after the last, and each step's
    predicted-gain factor (``opt.last_step["gain_scale"]``)."""
    import pmptrain

    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = pmptrain.EMSA(model, **emsa_kwargs)
        losses, scales = [], []
        for _ in range(n):
            opt.zero_grad()
            torch.manual_seed(1)
            loss = loss_fn(model, batch)
            losses.append(float(loss))
            loss.backward()
            opt.step()
            scales.append(float(opt.last_step.get("gain_scale", 1.0)))
        torch.manual_seed(1)
        with torch.no_grad():
            losses.append(float(loss_fn(model, batch)))
    opt.detach()
    return losses, scales


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="all", help="comma-separated names of ZOO (default: all)")
    ap.add_argument("--json", default=None, help="also write the table as JSON here")
    ap.add_argument("--steps", type=int, default=0,
                    help="also run this many unclipped steps on a fixed batch at both settings of tests/test_zoo.py "
                         "and print the losses and the predicted-gain factors (default 0: coverage only)")
    args = ap.parse_args(argv)
    names = list(ZOO) if args.models == "all" else args.models.split(",")
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {list(ZOO)}")
    rows = {}
    print(f"{'model':<20} {'params':>8} {'controlled':>10}  falls back (why)")
    for name in names:
        if name in HF_ZOO and not have_transformers():
            print(f"{name:<20} skipped: transformers is not installed")
            continue
        model, batch, loss_fn = ZOO[name]()
        cov = coverage(model, batch, loss_fn)
        rows[name] = cov
        fb = ", ".join(f"{u} ({n})" for u, n in cov["fallback"].items()) or "-"
        print(f"{name:<20} {cov['params']:>8} {100 * cov['share']:>9.1f}%  {fb}")
        for w, mods in cov["why"].items():
            where = f" [{', '.join(mods[:2])}{', ...' if len(mods) > 2 else ''}]" if mods else ""
            print(f"{'':<42}why: {w}{where}")
        for setting, kw in SETTINGS.items() if args.steps > 0 else ():
            model, batch, loss_fn = ZOO[name]()
            losses, scales = steps(model, batch, loss_fn, args.steps, **kw)
            cov.setdefault("steps", {})[setting] = {"losses": losses, "gain_scale": scales}
            print(f"{'':<42}{setting}: loss {' -> '.join(f'{v:.3f}' for v in losses)}; "
                  f"gain_scale {' '.join(f'{a:.3g}' for a in scales)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
