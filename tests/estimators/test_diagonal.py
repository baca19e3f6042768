import math

import pytest
import torch

from curvature import DenseOperator
from curvature.blocks import make_blocks
from estimators import diagonal
from tests.matrices import fast_decay, gen, indefinite, low_rank, psd


def test_exact_diagonal_and_per_block_shapes():
    A = indefinite(14)
    op = DenseOperator(A, blocks=make_blocks(["w", "b"], [(3, 4), (2,)]))
    est = diagonal(op, method="exact", probe_batch_size=5)
    assert torch.equal(est.value, A.diagonal())
    assert torch.equal(est.stderr, torch.zeros(14, dtype=torch.float64))
    assert est.num_matvecs == op.num_matvecs == 14
    blocks = est.per_block()
    assert blocks["w"].shape == (3, 4) and blocks["b"].shape == (2,)
    assert torch.equal(blocks["w"].flatten(), A.diagonal()[:12])
    assert est.stderr_per_block()["b"].shape == (2,)


def test_exact_float32():
    A = psd(10).float()
    est = diagonal(A, method="exact")
    assert est.value.dtype == torch.float64
    assert torch.allclose(est.value, A.diagonal().double())


@pytest.mark.parametrize("method,budget", [("hutchinson", 5000), ("xdiag", 160)])
def test_stochastic_diagonal_within_error_bars(method, budget):
    A = indefinite(200)
    est = diagonal(A, num_matvecs=budget, method=method, generator=gen(0), probe_batch_size=500)
    z = (est.value - A.diagonal()) / est.stderr
    assert float(z.abs().max()) < 4.5
    assert 0.85 < float((z.abs() <= 2).double().mean()) < 1.0
    assert est.num_matvecs == budget


def test_hutchinson_variance_formula():
    A = indefinite(30)
    m = 20_000
    est = diagonal(A, num_matvecs=m, generator=gen(1), probe_batch_size=5000)
    expected = ((A**2).sum(1) - A.diagonal() ** 2) / m  # Σ_{l≠j} A_jl² / m
    assert torch.allclose(est.stderr**2, expected, rtol=0.06)


@pytest.mark.parametrize("method,budget", [("hutchinson", 4), ("xdiag", 6)])
def test_unbiased_over_seeds(method, budget):
    A = indefinite(20)
    vals = torch.stack([diagonal(A, num_matvecs=budget, method=method, generator=gen(s)).value
                        for s in range(400)])
    se = vals.std(0) / math.sqrt(vals.shape[0])
    assert float(((vals.mean(0) - A.diagonal()).abs() / se).max()) < 4.5


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_xdiag_exact_below_rank_k(distribution):
    A = low_rank(60, 7)
    est = diagonal(A, num_matvecs=16, method="xdiag", distribution=distribution, generator=gen(0),
                   probe_batch_size=3)
    assert torch.allclose(est.value, A.diagonal(), atol=1e-12)



def test_xdiag_exact_on_structured_low_rank():
    # Exact zero rows make the sketch's rounding structured.  (Gaussian test vectors: Rademacher
    # ones restricted to 2 coordinates repeat, so leaving one out can lose rank.)
    D = torch.diag(torch.cat([torch.tensor([3.0, -2.0]), torch.zeros(30)]).double())
    est = diagonal(D, num_matvecs=10, method="xdiag", distribution="normal", generator=gen(0))
    assert torch.allclose(est.value, D.diagonal(), atol=1e-12)


def test_xdiag_beats_hutchinson_on_fast_decay():
    A = fast_decay(200, power=2.0)
    err = {m: sum(float((diagonal(A, num_matvecs=60, method=m, generator=gen(s)).value - A.diagonal()).norm())
                  for s in range(20)) for m in ("hutchinson", "xdiag")}
    assert err["xdiag"] < 0.3 * err["hutchinson"]


def test_rademacher_exact_on_diagonal_matrix():
    D = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    est = diagonal(D, num_matvecs=3, generator=gen(0))
    assert torch.equal(est.value, D.diagonal()) and torch.equal(est.stderr, torch.zeros(5, dtype=torch.float64))


def test_deterministic_and_confidence_interval():
    A = indefinite(20)
    a = diagonal(A, num_matvecs=10, generator=gen(3))
    b = diagonal(A, num_matvecs=10, generator=gen(3))
    assert torch.equal(a.value, b.value) and torch.equal(a.stderr, b.stderr)
    lo, hi = a.confidence_interval(0.9)
    assert bool((lo <= a.value).all() and (a.value <= hi).all())


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(), TypeError, "num_matvecs"),
        (dict(num_matvecs=0), ValueError, "num_matvecs"),
        (dict(num_matvecs=5, method="xdiag"), ValueError, "even"),
        (dict(num_matvecs=5, method="exact"), ValueError, "num_matvecs"),
        (dict(num_matvecs=5, method="diag++"), ValueError, "method"),
        (dict(num_matvecs=5, distribution="cauchy"), ValueError, "distribution"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        diagonal(psd(20), **kwargs)
