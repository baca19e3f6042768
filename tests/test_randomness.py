"""The one randomness policy: only ``generator=``; ``None`` means fresh OS entropy; the global RNG
is never read, advanced or reseeded."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import estimators
import spectra
from curvature import Fisher
from tests.matrices import gen, goe


def _global_state_unchanged(call):
    before = torch.random.get_rng_state()
    call()
    return torch.equal(before, torch.random.get_rng_state())


@pytest.mark.parametrize(
    "call",
    [
        lambda A: estimators.trace(A, num_matvecs=8),
        lambda A: estimators.diagonal(A, num_matvecs=8),
        lambda A: estimators.block_traces(A, num_matvecs=8),
        lambda A: estimators.frobenius_norm(A, num_matvecs=8),
        lambda A: spectra.eigsh(A, k=2),
        lambda A: spectra.lanczos(A, num_steps=5, num_probes=2),
        lambda A: spectra.slq(A, num_probes=2, num_steps=5),
        lambda A: spectra.power_iteration(A, k=1, max_iter=5),
    ],
    ids=["trace", "diagonal", "block_traces", "frobenius", "eigsh", "lanczos", "slq", "power_iteration"],
)
def test_generator_none_leaves_the_global_rng_alone_and_is_fresh(call):
    A = goe(30, seed=3)
    assert _global_state_unchanged(lambda: call(A))
    # Two runs without a generator draw different probes (fresh entropy, no hidden fixed seed).
    torch.manual_seed(0)
    first = call(A)
    torch.manual_seed(0)
    second = call(A)
    assert _differ(first, second)


def _differ(a, b) -> bool:
    if isinstance(a, estimators.BlockTraceEstimates):
        a, b = a.total, b.total
    for name in ("value", "nodes", "alpha", "eigenvectors"):
        x, y = getattr(a, name, None), getattr(b, name, None)
        if x is not None:
            if name == "eigenvectors":  # converged eigenvectors agree; the work done differs
                return a.num_matvecs != b.num_matvecs or not torch.equal(x, y)
            return not (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y)
    raise AssertionError("nothing to compare")


def test_monte_carlo_fisher_has_no_hidden_seed():
    g = gen(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    x, y = torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=g, dtype=torch.float64)
    loss = nn.CrossEntropyLoss()
    a = Fisher(model, loss, (x, y), mc_samples=2) @ v
    b = Fisher(model, loss, (x, y), mc_samples=2) @ v
    assert not torch.equal(a, b)
    seeded = [Fisher(model, loss, (x, y), mc_samples=2, generator=gen(7)) @ v for _ in range(2)]
    assert torch.equal(*seeded)
    assert _global_state_unchanged(lambda: Fisher(model, loss, (x, y), mc_samples=2) @ v)
