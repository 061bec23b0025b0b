"""The GPT bench (``pmptrain bench --model gpt``) with karpathy/nanoGPT's own model definition.

``tests/nanogpt_faithful.py`` is nanoGPT's ``model.py`` as its users write it (its LayerNorm class with
a bias, ``c_attn``/``c_proj``, GELU MLP, the token embedding tied to ``lm_head``); this script builds it
at the bench's size (2 layers, 4 heads, width 128, 128 positions, 256 byte tokens, no dropout) in place
of the bench's GPT and runs the bench's own loop, data and report unchanged. Every argument is the
``pmptrain bench`` command line's (``--model gpt`` is implied)::

    python benchmarks/nanogpt_bench.py --seeds 0, --threads 1 --optimizers adamw,emsa-transformer
    python benchmarks/nanogpt_bench.py --seeds 0, --threads 1 --clip 0 --optimizers emsa-transformer \\
        --opt-arg emsa-transformer.stat_every=10 --opt-arg emsa-transformer.amortise=bounded
"""

import os
import sys

from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from nanogpt_faithful import GPT, GPTConfig  # noqa: E402

from pmptrain.bench import models  # noqa: E402
from pmptrain.bench.cli import main  # noqa: E402


class NanoGPT(nn.Module):
    """nanoGPT's GPT returning only the logits (its forward returns ``(logits, loss)``)."""

    def __init__(self, seq_len: int, vocab: int):
        super().__init__()
        self.gpt = GPT(GPTConfig(block_size=seq_len, vocab_size=vocab, n_layer=2, n_head=4, n_embd=128,
                                 dropout=0.0, bias=True))

    def forward(self, idx):
        return self.gpt(idx)[0]


_build = models.build_model


def build_model(name, input_shape, classes, **kwargs):
    if name == "gpt" and not kwargs:
        return NanoGPT(input_shape[0], classes)
    return _build(name, input_shape, classes, **kwargs)


if __name__ == "__main__":
    models.build_model = build_model  # the bench's loop imports it from pmptrain.bench.models when it runs
    sys.exit(main(["bench", "--model", "gpt", *sys.argv[1:]]))
