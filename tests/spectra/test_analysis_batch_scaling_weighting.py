"""Issue 21 item 8: batch_size_scaling(adam=True) weights samples like the loss does (class weights,
ignored targets), and a sweep ending at B = N (identical batches, zero variance) fits.

At ``B = N`` every batch is the whole data set, so ``v̂_N = ḡ²`` with ``ḡ`` the full-data gradient
and ``adam_lambda_max`` must be ``λ_max(S H S)``, ``S = (|ḡ| + ε)^{-1/2}``: a dense float64 truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectra import analysis
from tests import cases
from tests.curvature.reference import dense_hessian

EPS = 1e-8


def _problem(loss_case):
    p = cases.problem("mlp", loss_case, "uneven", seed=3)
    x, y = cases.concatenated(p.batches)
    if loss_case == "ce_ignore_index":
        y = y.clone()
        y[[0, 5]] = cases.IGNORE  # a sample whose (only) target is ignored
    return p.model, p.loss_fn, x, y


def _adam_truth(model, loss_fn, x, y):
    names = [n for n, _ in model.named_parameters()]
    H = dense_hessian(model, loss_fn, [(x, y)], names)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))])
    s = (g.abs() + EPS).rsqrt()
    return float(torch.linalg.eigvalsh(s[:, None] * H * s[None, :]).max())


@pytest.mark.parametrize("loss_case", ["ce", "ce_weighted", "ce_ignore_index"])
def test_adam_lambda_max_at_full_batch_equals_dense_truth(loss_case):
    model, loss_fn, x, y = _problem(loss_case)
    N = x.shape[0]
    res = analysis.batch_size_scaling(
        model, loss_fn, (x, y), batch_sizes=(4, 8, N), num_batches=2, smallest=False, full_data=False,
        adam_eps=EPS, tol=1e-9, generator=torch.Generator().manual_seed(0),
    )
    assert torch.isfinite(res.adam_lambda_max).all()
    truth = _adam_truth(model, loss_fn, x, y)
    assert np.allclose(res.adam_lambda_max[-1].numpy(), truth, rtol=1e-7), (res.adam_lambda_max[-1], truth)


@pytest.mark.parametrize("seed", range(6))
def test_a_sweep_ending_at_n_fits(seed):
    """All batches at B = N are the same samples: their spread is rounding noise, not an error bar."""
    model, loss_fn, x, y = _problem("ce")
    N = x.shape[0]
    res = analysis.batch_size_scaling(
        model, loss_fn, (x, y), batch_sizes=(3, 6, N), num_batches=3, smallest=False, adam=False,
        full_data=False, generator=torch.Generator().manual_seed(seed),
    )
    assert np.isfinite(res.fit.coefficients).all()
