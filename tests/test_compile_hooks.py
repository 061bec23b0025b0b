"""torch.compile and the capture hooks (issue 17): a model compiled for another optimizer first must
not make a second instance of its class lose its hooks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pmptrain

torch_dynamo = pytest.importorskip("torch._dynamo")


def _model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))


def _train(model, opt, x, y, steps=2):
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_two_instances_of_one_class_one_compiled_for_sgd_first_keep_their_hooks():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 12, generator=g), torch.randint(0, 3, (10,), generator=g)
    first = _model(0)
    sgd = torch.optim.SGD(first.parameters(), lr=0.1)
    c_first = torch.compile(first)
    _train(c_first, sgd, x, y)                       # traced without hooks
    eager, second = _model(1), _model(1)
    o_eager, o_second = pmptrain.EMSA(eager), pmptrain.EMSA(second)  # the documented order
    c_second = torch.compile(second)
    _train(c_second, o_second, x, y)                 # raised "no captured states" before issue 17
    _train(eager, o_eager, x, y)
    assert o_second.last_step["controlled"] == 2 and not o_second.last_step["skipped"]
    for p, q in zip(eager.parameters(), second.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    # the SGD instance keeps running (it retraces once) and records nothing into E-MSA's statistics
    o_second.zero_grad()
    _train(c_first, sgd, x, y)
    assert o_second.capture.peek("1").samples == 0
    _train(c_second, o_second, x, y)                 # and the hooked instance still records
    assert o_second.last_step["controlled"] == 2
    torch._dynamo.reset()
