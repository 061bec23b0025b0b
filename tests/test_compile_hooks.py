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


def _cnn():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 3))


@pytest.mark.parametrize("build,shape", [(lambda: _model(0), (10, 12)), (_cnn, (10, 2, 6, 6))], ids=["mlp", "cnn"])
def test_the_compiled_capture_is_one_graph_with_the_eager_statistics(build, shape):
    """Under torch.compile the capture does not break the graph (one graph, no break, counted by
    torch._dynamo.explain; 6 graphs for the MLP before) and records exactly what the eager hooks
    record: the statistics and the steps of a compiled model equal the eager ones in float64."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3)]
    ys = [torch.randint(0, 3, (shape[0],), generator=g) for _ in range(3)]
    torch.manual_seed(0)
    eager = build().double()
    compiled = build().double()
    compiled.load_state_dict(eager.state_dict())
    init = [p.detach().clone() for p in eager.parameters()]
    o_eager = pmptrain.EMSA(eager, costate="exact")
    o_comp = pmptrain.EMSA(compiled, costate="exact")
    explained = torch._dynamo.explain(compiled)(xs[0])
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    c = torch.compile(compiled)
    for step, (x, y) in enumerate(zip(xs, ys)):
        for model, opt in ((eager, o_eager), (c, o_comp)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
        for key in o_eager.capture.keys():
            a, b = o_eager.capture.peek(key), o_comp.capture.peek(key)
            assert (a.samples, a.rows) == (b.samples, b.rows) and a.samples > 0
            for name in ("xx", "x_sum", "gg", "g_sq"):
                ta, tb = getattr(a, name), getattr(b, name)
                assert (ta is None) == (tb is None), name
                if ta is not None:  # measured ≤ 1e-16 relative (the compiled backward's rounding)
                    torch.testing.assert_close(tb, ta, rtol=1e-12, atol=1e-14)
            for ra, rb in ((a.x_rows, b.x_rows), (a.g_rows, b.g_rows)):
                assert len(ra) == len(rb)
                for u, v in zip(ra, rb):
                    torch.testing.assert_close(v, u, rtol=1e-12, atol=1e-14)
        o_eager.step()
        o_comp.step()
        assert o_comp.last_step["controlled"] == o_eager.last_step["controlled"] == 2
    for p, q, p0 in zip(eager.parameters(), compiled.parameters(), init):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)
    assert max(float((p.detach() - p0).abs().max()) for p, p0 in zip(eager.parameters(), init)) > 1e-3
    torch._dynamo.reset()


@pytest.mark.slow
def test_the_compiled_gpt_in_the_costate_setting_steps_as_eager():
    """The GPT of the bench (1 layer here) with rho_scale="costate" under torch.compile: the tied
    embedding's index counts, every module's sample and row counts and the steps equal the eager
    ones in float64 (measured 3.5e-15). Slow: ≈ 45 s of compilation on a loaded 2-core machine."""
    from pmptrain.bench.models import build_model
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 32, (4, 8), generator=g), torch.randint(0, 32, (4, 8), generator=g))
               for _ in range(3)]
    torch.manual_seed(0)
    eager = build_model("gpt", (8,), 32, n_layer=1, n_head=2, n_embd=16).double()
    compiled = build_model("gpt", (8,), 32, n_layer=1, n_head=2, n_embd=16).double()
    compiled.load_state_dict(eager.state_dict())
    kw = dict(rho=5.0, rho_scale="costate", lr=1e3)
    o_eager, o_comp = pmptrain.EMSA(eager, **kw), pmptrain.EMSA(compiled, **kw)
    c = torch.compile(compiled)
    for x, y in batches:
        for model, opt in ((eager, o_eager), (c, o_comp)):
            opt.zero_grad()
            out = model(x)
            F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        for key in o_eager.capture.keys():
            a, b = o_eager.capture.peek(key), o_comp.capture.peek(key)
            assert (a.samples, a.rows) == (b.samples, b.rows), key
            if a.counts is not None:
                assert torch.equal(a.counts, b.counts), key
        o_eager.step()
        o_comp.step()
        assert o_comp.last_step["controlled"] == o_eager.last_step["controlled"] > 0
    for p, q in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)
    torch._dynamo.reset()
