"""Estimators and spectra on model operators over the shared case registry (tests/cases.py).

For each problem (tied and twice-called layers, frozen parameters, class-weighted, padded and sum
losses; uneven, fully padded and shuffled layouts) the entry points run on the operator and on the
dense float64 truth of the concatenated batches with the same generator: the same probes must give
the same estimates, and eigenvalues must match ``eigvalsh`` of the truth.
"""

from __future__ import annotations

import pytest
import torch

import estimators
import spectra
from curvature import GGN, DenseOperator, Hessian
from tests import cases
from tests.curvature.reference import dense_ggn, dense_hessian

PROBLEMS = [
    p
    for p in cases.problems(
        models=["mlp", "tied_lm", "called_twice", "frozen"],
        losses=["ce_sum", "ce_weighted", "ce_ignore_index", "token_ce", "token_ce_sum", "mse"],
        layouts=["uneven", "fully_padded", "shuffled"],
    )
]


def _names(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _close(a, b, tol=1e-9):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max())), (a, b)


@pytest.mark.parametrize("p", PROBLEMS, ids=str)
def test_estimators_and_spectra_on_the_operator_equal_those_on_the_truth(p):
    H = Hessian(p.model, p.loss_fn, p.data)
    D = dense_hessian(p.model, p.loss_fn, p.batches, _names(p.model))
    est = estimators.trace(H, num_matvecs=6, generator=_gen())
    ref = estimators.trace(D, num_matvecs=6, generator=_gen())
    _close(est.value, ref.value)
    _close(est.stderr, ref.stderr)
    diag = estimators.diagonal(H, num_matvecs=4, generator=_gen(1))
    _close(diag.value, estimators.diagonal(D, num_matvecs=4, generator=_gen(1)).value)
    top = spectra.eigsh(H, k=2, tol=1e-10, generator=_gen(2))
    _close(top.eigenvalues, torch.linalg.eigvalsh(D).flip(0)[:2], 1e-8)
    density = spectra.slq(H, num_probes=2, num_steps=6, generator=_gen(3))
    truth_density = spectra.slq(D, num_probes=2, num_steps=6, generator=_gen(3))
    _close(density.nodes, truth_density.nodes, 1e-8)
    _close(spectra.dataset_loss(H).detach(), cases.full_batch_loss(p.model, p.loss_fn, p.batches).detach(), 1e-12)


@pytest.mark.parametrize("p", [q for q in PROBLEMS if q.layout == "fully_padded"], ids=str)
def test_block_traces_of_the_ggn_with_a_fully_padded_batch(p):
    G = GGN(p.model, p.loss_fn, p.data)
    D = DenseOperator(dense_ggn(p.model, p.loss_fn, p.batches, _names(p.model)), blocks=G.blocks)
    got = estimators.block_traces(G, num_matvecs=8, generator=_gen(4))
    want = estimators.block_traces(D, num_matvecs=8, generator=_gen(4))
    assert list(got) == list(want)
    for name in got:
        _close(got[name].value, want[name].value)
    _close(got.total.value, want.total.value)
