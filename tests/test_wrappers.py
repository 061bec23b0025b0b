"""Training wrappers beyond DDP/FSDP2 (issue 20, item 3): each works (tested) or is refused clearly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pmptrain


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)


def test_deepspeed_engine_is_refused_naming_it():
    DeepSpeedEngine = type("DeepSpeedEngine", (nn.Module,), {})  # the class name the engine has
    engine = DeepSpeedEngine()
    engine.module = _net()
    with pytest.raises(TypeError, match="DeepSpeed.*FSDP2"):
        pmptrain.EMSA(engine)


def test_zero3_partitioned_parameters_are_refused():
    net = _net()
    net[0].weight.ds_id = 0  # what ZeRO-3 attaches to the parameters it partitions
    with pytest.raises(TypeError, match="DeepSpeed"):
        pmptrain.EMSA(net)


def test_accelerate_prepared_optimizer_steps_as_the_bare_one():
    accelerate = pytest.importorskip("accelerate")
    x, y = _batch()
    out = []
    for wrap in (False, True):
        net = _net()
        opt = pmptrain.EMSA(net)
        if wrap:
            acc = accelerate.Accelerator(cpu=True)
            net, opt = acc.prepare(net, opt)
            assert type(opt).__name__ == "AcceleratedOptimizer"
        for _ in range(3):
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            (acc.backward(loss) if wrap else loss.backward())
            opt.step()
        out.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*out):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert any(not torch.equal(a, b) for a, b in zip(out[0], _net().parameters()))
