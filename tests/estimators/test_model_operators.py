"""The estimators on real curvature operators of a tiny float64 MLP."""

import pytest
import torch
from torch import nn

from curvature import GGN, Hessian
from estimators import block_traces, diagonal, trace


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64, generator=g))
    x = torch.randn(16, 4, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (16,), generator=g)
    return model, nn.CrossEntropyLoss(), (x, y)


def test_hessian_trace_and_block_traces_within_error_bars(problem):
    H = Hessian(*problem)
    dense = H.to_dense()
    exact_diag = diagonal(H, method="exact")
    assert torch.allclose(exact_diag.value, dense.diagonal(), atol=1e-10)
    exact = float(dense.trace())

    H.num_matvecs = 0
    est = trace(H, num_matvecs=600, generator=torch.Generator().manual_seed(1), probe_batch_size=200)
    assert H.num_matvecs == 600
    assert abs(est.value - exact) < 4 * est.stderr

    H.num_matvecs = 0
    per_block = block_traces(H, num_matvecs=600, generator=torch.Generator().manual_seed(1), probe_batch_size=200)
    assert H.num_matvecs == 600  # one shared set of products
    assert list(per_block) == [b.name for b in H.blocks]
    assert sum(e.value for e in per_block.values()) == pytest.approx(est.value, rel=1e-10)
    for b in H.blocks:
        block_exact = float(exact_diag.value[b.slice].sum())
        assert abs(per_block[b.name].value - block_exact) < 4 * per_block[b.name].stderr + 1e-12

    layers = block_traces(H, num_matvecs=50, group_by_module=True, generator=torch.Generator().manual_seed(2))
    assert list(layers) == ["0", "2"]
    per_param = exact_diag.per_block()
    assert per_param["0.weight"].shape == (6, 4) and per_param["2.bias"].shape == (3,)


@pytest.mark.parametrize("method", ["hutch++", "xtrace", "auto"])
def test_ggn_trace_low_rank_methods(problem, method):
    G = GGN(*problem)
    exact = float(G.to_dense().trace())
    est = trace(G, num_matvecs=48, method=method, generator=torch.Generator().manual_seed(3))
    assert abs(est.value - exact) < max(4 * est.stderr, 1e-6 * abs(exact))
