"""The first column of an uncached batch by forward mode (curvature.forward_jvp): the same products
as the double backward wherever it is used, and the double backward wherever forward mode would
differentiate another function than ``loss.backward()`` does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvature import GGN, EmpiricalFisher, Fisher
from curvature.forward_jvp import ForwardModeUnavailable, forward_jvp
from tests import cases

f64 = torch.float64
OPERATORS = [GGN, Fisher, EmpiricalFisher]


def _reverse(op_cls, *args, **kw):
    op = op_cls(*args, **kw)
    op._forward_first = False  # the double-backward J v for every column
    return op


def _data(n=10, dim=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=f64), torch.randint(0, classes, (n,), generator=g)


def _mlp(seed=0):
    return cases._seeded(seed, lambda: cases._mlp()).to(f64)


@pytest.mark.parametrize("op_cls", OPERATORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("k", [1, 3])
def test_first_column_matches_double_backward(op_cls, k):
    model, data = _mlp(), _data()
    d = sum(p.numel() for p in model.parameters())
    V = torch.randn(d, k, dtype=f64, generator=torch.Generator().manual_seed(1))
    op = op_cls(model, nn.CrossEntropyLoss(), data)
    ref = _reverse(op_cls, model, nn.CrossEntropyLoss(), data)
    first, again = op @ V, op @ V  # the second product reuses the graph kept by the first
    assert op._forward_first is True
    torch.testing.assert_close(first, ref @ V, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(again, ref @ V, rtol=1e-12, atol=1e-14)


def test_uncached_batches_and_budget():
    """A data set over the cache budget: every batch's first column by forward mode, nothing kept."""
    model = _mlp()
    batches = [_data(n, seed=s) for s, n in enumerate([5, 3, 7])]
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=f64)
    op = GGN(model, nn.CrossEntropyLoss(), batches, graph_cache_bytes=0)
    ref = _reverse(GGN, model, nn.CrossEntropyLoss(), batches, cache_graph=False)
    for _ in range(2):
        torch.testing.assert_close(op @ v, ref @ v, rtol=1e-12, atol=1e-14)
    assert len(op._cache) <= 1  # the budget admits the first graph only


def test_cached_bytes_counted():
    """The kept graph's bytes are measured (not 0 because the graph was built elsewhere, nor
    inflated by the forward-mode tangents freed after the forward): the reverse path's graph plus
    the cotangent ``w`` it saves, one outputs-sized tensor."""
    model, (x, y) = _mlp(), _data(n=64)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=f64)
    op, ref = GGN(model, nn.CrossEntropyLoss(), (x, y)), _reverse(GGN, model, nn.CrossEntropyLoss(), (x, y))
    op @ v, ref @ v
    outputs_bytes = 64 * 3 * 8
    assert 0 < ref.cached_graph_bytes and op.cached_graph_bytes <= ref.cached_graph_bytes + outputs_bytes // 4


class _HookedHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.out = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        if h.requires_grad:
            h.register_hook(lambda g: 0.5 * g)
        return self.out(h)


def _module_hook():
    model = _mlp()
    model[0].register_full_backward_hook(lambda m, gi, go: None)
    return model


def _param_hook():
    model = _mlp()
    model[2].weight.register_hook(lambda g: 2 * g)
    return model


@pytest.mark.parametrize("make, reason", [
    (lambda: cases.MODELS["no_grad_part"].build(), "no_grad"),
    (lambda: cases._seeded(0, _HookedHidden).to(f64), "tensor hook"),
    (lambda: cases.MODELS["custom_function"].build(), "custom Function without jvp"),
    (_module_hook, "module backward hook"),
    (_param_hook, "parameter hook"),
], ids=["no_grad", "tensor_hook", "no_jvp", "module_hook", "param_hook"])
def test_reverse_mode_where_forward_mode_differs(make, reason):
    model, data = make(), _data()
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=f64, generator=torch.Generator().manual_seed(2))
    op = GGN(model, nn.CrossEntropyLoss(), data)
    ref = _reverse(GGN, model, nn.CrossEntropyLoss(), data)
    torch.testing.assert_close(op @ v, ref @ v, rtol=1e-12, atol=1e-14)
    assert op._forward_first is False, reason


def test_no_grad_part_would_differ():
    """The no_grad case is a real difference: forward mode alone gives another J v."""
    model = cases.MODELS["no_grad_part"].build()
    x, _ = _data()
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    tangents = [torch.randn_like(p) for p in params]
    with pytest.raises(ForwardModeUnavailable, match="no_grad"):
        forward_jvp(model, names, params, tangents, lambda: model(x))


@pytest.mark.filterwarnings("ignore:the model is in train mode")
def test_registry_problems_first_products():
    """Every registry model with forward mode on: products equal the double backward's."""
    for name in ["tied_lm", "called_twice", "frozen", "batchnorm_train", "mixed_dtype"]:
        loss = "token_ce" if cases.MODELS[name].inputs == "tokens" else "ce"
        p = cases.problem(name, loss, "uneven")
        kw = {"allow_train_mode": True} if cases.MODELS[name].train else {}
        if name == "mixed_dtype":  # one dtype per operator: the float64 head (its J v crosses the cast)
            kw["params"] = "head.*"
        op = GGN(p.model, p.loss_fn, p.data, **kw)
        ref = _reverse(GGN, p.model, p.loss_fn, p.data, **kw)
        v = torch.randn(op.shape[0], dtype=op.dtype, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(op @ v, ref @ v, rtol=1e-9, atol=1e-12, msg=name)
        assert op._forward_first is True, name


def test_deterministic_uses_one_form():
    model, data = _mlp(), _data()
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=f64)
    op = GGN(model, nn.CrossEntropyLoss(), data, deterministic=True)
    first = op @ v
    assert op._forward_first is False and torch.equal(op @ v, first)
