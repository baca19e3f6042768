import math

import pytest
import torch

from estimators import frobenius_norm
from tests.matrices import gen, indefinite, psd


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_squared_norm_unbiased_and_within_error_bars(distribution):
    A = indefinite(40)
    fro2 = float((A**2).sum())
    values = torch.tensor([frobenius_norm(A, num_matvecs=3, distribution=distribution, generator=gen(s)).squared
                           for s in range(300)])
    assert abs(float(values.mean()) - fro2) < 4 * float(values.std()) / math.sqrt(300)
    est = frobenius_norm(A, num_matvecs=2000, distribution=distribution, generator=gen(1), probe_batch_size=500)
    assert abs(est.squared - fro2) < 4 * est.squared_stderr
    assert est.value == pytest.approx(math.sqrt(est.squared))
    assert abs(est.value - math.sqrt(fro2)) < 4 * est.stderr
    lo, hi = est.confidence_interval()
    assert lo < est.value < hi


def test_exact_for_diagonal_with_rademacher_and_rtol():
    D = torch.diag(torch.tensor([3.0, 4.0], dtype=torch.float64))
    est = frobenius_norm(D, num_matvecs=20, rtol=1e-3, generator=gen(0))
    assert est.value == 5.0 and est.squared_stderr == 0.0
    assert est.converged and est.num_matvecs == 20  # one block of 20 columns


def test_rtol_stops_early():
    est = frobenius_norm(psd(100), num_matvecs=1000, rtol=0.01, generator=gen(0), probe_batch_size=10)
    assert est.converged and est.num_matvecs < 1000
    assert est.squared_stderr <= 0.01 * est.squared


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_matvecs"):
        frobenius_norm(psd(5), num_matvecs=0)
