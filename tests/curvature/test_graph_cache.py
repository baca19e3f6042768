"""The graph cache (curvature.graph_cache) follows every state it depends on: batch order and content,
parameter and buffer writes, train/eval mode, the byte budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvature import GGN, Hessian
from tests.curvature import reference as ref
from tests.curvature.models import fresh_product, make_batches, mlp_dataset


# -- graph cache: batch order -------------------------------------------------------------------
def test_shuffled_loader_with_partial_cache_gives_the_dataset_curvature():
    model, x, y = mlp_dataset()
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3))
    H = Hessian(model, loss_fn, loader, graph_cache_bytes=7000)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    exact = fresh_product(Hessian, model, loss_fn, (x, y), v)
    for _ in range(4):  # every pass draws a new batch order
        assert ref.rel_err(H @ v, exact) <= 1e-10
    assert 0 < H.cached_graph_bytes <= 7000 + 4000  # partial caching did happen (one graph over budget at most)


def test_list_of_batches_partial_cache_is_exact_and_hits():
    model, x, y = mlp_dataset()
    loss_fn = nn.CrossEntropyLoss()
    batches = list(zip(x.split(16), y.split(16)))
    H = Hessian(model, loss_fn, batches, graph_cache_bytes=7000)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    exact = fresh_product(Hessian, model, loss_fn, (x, y), v)
    for _ in range(3):
        assert ref.rel_err(H @ v, exact) <= 1e-10
    assert 0 < len(H._cache) < 4


# -- graph cache: parameter writes that bypass the version counter ------------------------------
@pytest.mark.parametrize("Op", [Hessian, GGN])
@pytest.mark.parametrize("how", ["data_add", "data_assign"])
def test_dot_data_writes_are_seen(Op, how):
    model, batches = make_batches("mlp", "ce")
    loss_fn = nn.CrossEntropyLoss()
    op = Op(model, loss_fn, batches, cache_graph=True)
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    first = op @ v
    w = model[0].weight
    if how == "data_add":
        w.data.add_(0.3)
    else:
        w.data = w.data * 1.7
    fresh = fresh_product(Op, model, loss_fn, batches, v)
    assert ref.rel_err(fresh, first) > 1e-3
    assert ref.rel_err(op @ v, fresh) <= 1e-12


# -- graph cache: all parameters, buffers and modes ----------------------------------------------
def test_batchnorm_recalibration_under_no_grad_is_seen():
    model, batches = make_batches("batchnorm", "ce")
    loss_fn = nn.CrossEntropyLoss()
    H = Hessian(model, loss_fn, batches, cache_graph=True)
    G = GGN(model, loss_fn, batches, cache_graph=True)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    H @ v
    G.to_dense()
    model.train()  # what torch.optim.swa_utils.update_bn does
    with torch.no_grad():
        for xb, _ in batches:
            model(xb * 3.0 + 1.0)
    model.eval()
    assert ref.rel_err(H @ v, fresh_product(Hessian, model, loss_fn, batches, v)) <= 1e-12
    D = G.to_dense()
    assert ref.rel_err(D, D.T) <= 1e-12
    assert ref.rel_err(D, GGN(model, loss_fn, batches, cache_graph=False).to_dense()) <= 1e-12


def test_reloading_parameters_outside_params_is_seen():
    model, batches = make_batches("mlp", "ce")
    loss_fn = nn.CrossEntropyLoss()
    for p in model[0].parameters():  # a frozen backbone
        p.requires_grad_(False)
    H = Hessian(model, loss_fn, batches, params=["2.weight", "2.bias"], cache_graph=True)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    first = H @ v
    other = nn.Linear(4, 6).double()
    model[0].load_state_dict(other.state_dict())
    fresh = fresh_product(Hessian, model, loss_fn, batches, v, params=["2.weight", "2.bias"])
    assert ref.rel_err(fresh, first) > 1e-3
    assert ref.rel_err(H @ v, fresh) <= 1e-12


def test_switching_to_train_mode_with_allow_train_mode_is_seen():
    model, batches = make_batches("batchnorm", "ce")
    loss_fn = nn.CrossEntropyLoss()
    H = Hessian(model, loss_fn, batches, cache_graph=True, allow_train_mode=True)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eval_product = H @ v
    model.train()
    try:
        with pytest.warns(UserWarning, match="allow_train_mode"):
            train_product = H @ v
        with pytest.warns(UserWarning):
            fresh = fresh_product(Hessian, model, loss_fn, batches, v, allow_train_mode=True)
    finally:
        model.eval()
    assert ref.rel_err(fresh, eval_product) > 1e-3
    assert ref.rel_err(train_product, fresh) <= 1e-12
    assert ref.rel_err(H @ v, eval_product) <= 1e-12  # and back



def test_unchanged_state_reuses_the_cached_graph():
    model, batches = make_batches("batchnorm", "ce")
    loss_fn = nn.CrossEntropyLoss()
    x, y = batches[0]
    H = Hessian(model, loss_fn, (x, y))
    v = torch.ones(H.shape[0], dtype=torch.float64)
    H @ v
    graph = H._cache[0].value
    H @ v
    assert H._cache[0].value is graph  # the fingerprint check does not rebuild needlessly
    model.train()
    try:  # train mode: our own forwards bump the BatchNorm buffers' versions (values restored)
        with pytest.warns(UserWarning):
            Ht = Hessian(model, loss_fn, (x, y), allow_train_mode=True)
        with pytest.warns(UserWarning):
            Ht @ v
        graph = Ht._cache[0].value
        with pytest.warns(UserWarning):
            Ht @ v
        assert Ht._cache[0].value is graph
    finally:
        model.eval()


# -- the cache on its own ------------------------------------------------------------------------
def test_graph_cache_keeps_by_key_drops_unseen_and_follows_the_model():
    from curvature.graph_cache import GraphCache

    model = nn.Linear(2, 1)
    cache = GraphCache(model, mode=True, by_content=True)
    x1, x2 = torch.ones(3, 2), torch.zeros(3, 2)
    builds = []

    def build(x):
        builds.append(1)
        return model(x).sum()

    def one_pass(*xs):
        with cache.product_pass():
            for i, x in enumerate(xs):
                cache.register(i, (x,))
                cache.get_or_build(i, lambda x=x: build(x))

    one_pass(x1, x2)
    one_pass(x1, x2)
    assert len(builds) == 2 and len(cache) == 2 and cache.nbytes > 0
    one_pass(x2)  # another batch at position 0; position 1 not met: dropped
    assert len(builds) == 3 and len(cache) == 1
    with torch.no_grad():
        model.weight.add_(1.0)
    one_pass(x2)  # the model changed: rebuilt
    assert len(builds) == 4
    budgeted = GraphCache(model, mode=None, budget_bytes=1, by_content=True)
    with budgeted.product_pass():
        for i, x in enumerate((x1, x2)):
            budgeted.register(i, (x,))
            budgeted.get_or_build(i, lambda x=x: build(x))
    assert len(budgeted) == 1  # kept while under the budget; the first graph spends it
    cache.release()
    assert len(cache) == 0 and cache.nbytes == 0
