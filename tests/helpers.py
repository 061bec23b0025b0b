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
