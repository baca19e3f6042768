"""Issue 21: a batch of weight 0 (every target ignore_index) contributes zero to every consumer of the
data, not NaN or an error; data of weight 0 in all is a named error (tests/cases.py layout "fully_padded")."""

from __future__ import annotations

import pytest
import torch

from curvature import EmptyDataError, Hessian, collect_gradients
from spectra import dataset_loss
from tests import cases


@pytest.mark.parametrize("loss_case", ["token_ce", "token_ce_sum"])
def test_dataset_loss_skips_a_fully_padded_batch(loss_case):
    p = cases.problem("tied_lm", loss_case, "fully_padded")
    got = dataset_loss(Hessian(p.model, p.loss_fn, p.data))
    want = cases.full_batch_loss(p.model, p.loss_fn, p.batches)
    assert abs(float(got.detach()) - float(want.detach())) < 1e-12


def test_dataset_loss_of_only_padding_is_a_named_error():
    p = cases.problem("mlp", "ce_ignore_index", "fully_padded")
    with pytest.raises(EmptyDataError):
        dataset_loss(Hessian(p.model, p.loss_fn, [p.batches[1]]))


@pytest.mark.parametrize("loss_case", ["ce_ignore_index", "token_ce"])
def test_collect_gradients_skips_a_fully_padded_batch(loss_case):
    model_case = "tied_lm" if loss_case.startswith("token") else "mlp"
    p = cases.problem(model_case, loss_case, "fully_padded")
    G = collect_gradients(p.model, p.loss_fn, p.batches, num_grads=2)
    want = torch.stack([cases.full_batch_gradient(p.model, p.loss_fn, [b]) for b in (p.batches[0], p.batches[2])])
    assert torch.allclose(G, want, rtol=1e-12, atol=1e-14)
