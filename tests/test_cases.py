"""The case registry itself: every combination builds, is reproducible, and its truths are what they say."""

import pytest
import torch

from tests import cases


@pytest.mark.parametrize("p", cases.problems(), ids=str)
def test_case_builds_and_full_batch_loss_is_finite(p):
    assert torch.isfinite(cases.full_batch_loss(p.model, p.loss_fn, p.batches))


def test_same_arguments_same_tensors():
    a, b = cases.problem("tied_lm", "token_ce", "uneven"), cases.problem("tied_lm", "token_ce", "uneven")
    for (xa, ya), (xb, yb) in zip(a.batches, b.batches):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_padded_layouts_hold_the_declared_valid_counts():
    p = cases.problem("tied_lm", "token_ce", "fully_padded")
    assert [int((y != cases.IGNORE).sum()) for _, y in p.batches] == [3, 0, 4]
    p = cases.problem("mlp", "ce_ignore_index", "uneven")
    assert [int((y != cases.IGNORE).sum()) for _, y in p.batches] == [5, 1, 7]


def test_tied_and_called_twice_models_are_what_they_claim():
    lm = cases.MODELS["tied_lm"].build()
    assert lm.head.weight is lm.embed.weight
    assert len(list(lm.parameters())) == 3  # the tied weight counted once


def test_shuffled_loader_changes_order_between_passes():
    p = cases.problem("mlp", "ce", "shuffled")
    first = [int(y.sum()) for _, y in p.data]
    orders = {tuple(int(y.sum()) for _, y in p.data) for _ in range(5)}
    assert sorted(first) == sorted(int(y.sum()) for _, y in p.batches) and len(orders) > 1


@pytest.mark.parametrize("zeroing", sorted(cases.CLOSURES))
def test_closures_zero_as_named(zeroing):
    p = cases.problem("mlp", "ce", "single_batch")
    opt = torch.optim.SGD(p.model.parameters(), lr=0.0)
    closure = cases.make_closure(opt, p.model, p.loss_fn, p.batches[0], zeroing)
    closure()
    grads = [q.grad for q in p.model.parameters()]
    closure()
    same_storage = all(g is q.grad for g, q in zip(grads, p.model.parameters()))
    assert same_storage == (zeroing != "set_to_none")
