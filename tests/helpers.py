"""Helpers shared by the test modules."""

import torch


def assert_same(a, b):
    """Nested dicts/lists of tensors and plain values are equal (tensors bit for bit, same shape)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


class ExpScale(torch.nn.Module):
    """``y = x · exp(s)`` per channel (dimension 1): a parameter that enters nonlinearly, so it has
    no closed form and takes the fallback step (the tests' stand-in for "a module without a rule")."""

    def __init__(self, channels: int = 1, init: float = 0.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((channels,), float(init)))

    def forward(self, x):
        return x * self.weight.exp()


def tensors_in(v):
    """Every tensor inside ``v`` (nested dicts, lists and tuples), in order."""
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, dict):
        return [t for x in v.values() for t in tensors_in(x)]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in tensors_in(x)]
    return []


def feed_gradient_average(params, avg: dict, beta: float) -> None:
    """Replace each ``.grad`` of ``params`` by its running average ``ḡ ← β ḡ + (1−β) g`` (the first
    gradient as it is; ``avg`` keeps ``ḡ`` per parameter): the reference a ``grad_decay = β``
    optimizer is compared with, fed the average as its plain gradient."""
    for p in params:
        avg[p] = p.grad.clone() if p not in avg else beta * avg[p] + (1 - beta) * p.grad
        p.grad.copy_(avg[p])


def tiny_gpt(vocab: int, block: int):
    """The GPT bench's model at 1 layer, 2 heads, width 8, in float64, seeded (the distributed GPT
    tests' model)."""
    from pmptrain.bench.models import GPT

    torch.manual_seed(0)
    return GPT(vocab_size=vocab, block_size=block, n_layer=1, n_head=2, n_embd=8).double()


def token_batches(steps: int, batch: int, t: int, vocab: int):
    """``steps`` seeded batches of ``batch`` token sequences of length ``t + 1`` (inputs and targets)."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (batch, t + 1), generator=g) for _ in range(steps)]


def gpt_emsa(model, kind: str):
    """The E-MSA configurations the distributed GPT tests compare with one process:
    ``transformer`` (``EMSA(model)``: the setting auto picks for a model with embeddings),
    ``costate`` (ρ 5 × rms costate, lr 1), ``plain`` (classic ρ 1: a clip scales its step linearly),
    ``averaged`` (running statistics and gradient, β 0.9) and ``averaged-unsharded``."""
    import pmptrain

    if kind == "transformer":
        return pmptrain.EMSA(model)
    if kind == "costate":
        return pmptrain.EMSA(model, lr=1.0, rho=5.0, rho_scale="costate")
    if kind == "plain":
        return pmptrain.EMSA(model, lr=1.0, rho=1.0, setting="classic")
    if kind in ("averaged", "averaged-unsharded"):
        return pmptrain.EMSA(model, lr=1.0, rho=1.0, stat_decay=0.9, grad_decay=0.9,
                             shard_solves=kind == "averaged")
    raise ValueError(kind)
