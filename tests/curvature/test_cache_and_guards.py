"""No silent wrong answers: the graph cache follows every state it depends on, the train-mode guard
refuses any mode-dependent module and the global kernel switches survive threads."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvature import GGN, Hessian
from tests.curvature import reference as ref
from tests.curvature.models import build, make_batches


def _fresh(Op, model, loss_fn, data, v, **kw):
    return Op(model, loss_fn, data, cache_graph=False, **kw) @ v


def _mlp_dataset(n=64, seed=0):
    model, inputs = build("mlp", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = inputs(n, g)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, x, y


# -- graph cache: batch order -------------------------------------------------------------------
def test_shuffled_loader_with_partial_cache_gives_the_dataset_curvature():
    model, x, y = _mlp_dataset()
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3))
    H = Hessian(model, loss_fn, loader, graph_cache_bytes=7000)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    exact = _fresh(Hessian, model, loss_fn, (x, y), v)
    for _ in range(4):  # every pass draws a new batch order
        assert ref.rel_err(H @ v, exact) <= 1e-10
    assert 0 < H.cached_graph_bytes <= 7000 + 4000  # partial caching did happen (one graph over budget at most)


def test_list_of_batches_partial_cache_is_exact_and_hits():
    model, x, y = _mlp_dataset()
    loss_fn = nn.CrossEntropyLoss()
    batches = list(zip(x.split(16), y.split(16)))
    H = Hessian(model, loss_fn, batches, graph_cache_bytes=7000)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    exact = _fresh(Hessian, model, loss_fn, (x, y), v)
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
    fresh = _fresh(Op, model, loss_fn, batches, v)
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
    assert ref.rel_err(H @ v, _fresh(Hessian, model, loss_fn, batches, v)) <= 1e-12
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
    fresh = _fresh(Hessian, model, loss_fn, batches, v, params=["2.weight", "2.bias"])
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
            fresh = _fresh(Hessian, model, loss_fn, batches, v, allow_train_mode=True)
    finally:
        model.eval()
    assert ref.rel_err(fresh, eval_product) > 1e-3
    assert ref.rel_err(train_product, fresh) <= 1e-12
    assert ref.rel_err(H @ v, eval_product) <= 1e-12  # and back


# -- train-mode guard ---------------------------------------------------------------------------
class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.dropout(x, 0.5, self.training))


class Wrapper(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.body = inner

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize(
    "model, name, kind",
    [
        (Wrapper(FunctionalDropout()), "body", "FunctionalDropout"),
        (nn.Sequential(nn.Linear(4, 4), nn.RReLU(), nn.Linear(4, 3)), "1", "RReLU"),
    ],
)
def test_any_mode_dependent_module_in_train_mode_is_refused(model, name, kind):
    model = model.double().train()
    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError) as info:
        Hessian(model, nn.CrossEntropyLoss(), (x, y))
    message = str(info.value)
    assert f"'{name}' ({kind})" in message and "model.eval()" in message and "allow_train_mode=True" in message
    H = Hessian(model.eval(), nn.CrossEntropyLoss(), (x, y))
    v = torch.ones(H.shape[0], dtype=torch.float64)
    assert torch.equal(H @ v, H @ v)
    model.train()
    with pytest.raises(RuntimeError, match=f"'{name}'"):  # checked again at every product
        H @ v


def test_mode_independent_custom_module_in_train_mode_is_accepted():
    model = Wrapper(nn.Sequential(nn.Linear(4, 3), nn.Tanh())).double().train()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    H = Hessian(model, nn.MSELoss(), (x, y))
    assert H.shape == (15, 15)


# -- global kernel switches from two threads -------------------------------------------------
class _Rendezvous(nn.Module):
    """A layer whose forward waits for the other thread, to interleave two products exactly."""

    def __init__(self, arrive: threading.Event, wait: threading.Event):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.arrive, self.wait = arrive, wait

    def forward(self, x):
        self.arrive.set()
        assert self.wait.wait(10)
        return self.fc(x)


def test_kernel_switches_are_restored_after_two_threads():
    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()
    released = threading.Event()
    released.set()
    # Thread A enters its product first and leaves it while thread B is still inside its own.
    model_a = _Rendezvous(a_in, b_in).double().eval()
    model_b = _Rendezvous(b_in, a_done).double().eval()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    before = (
        torch.backends.mha.get_fastpath_enabled(),
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
    )
    errors = []

    def run_a():
        try:
            Hessian(model_a, nn.MSELoss(), (x, y)) @ torch.ones(8, dtype=torch.float64)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            a_done.set()

    def run_b():
        assert a_in.wait(10)
        try:
            Hessian(model_b, nn.MSELoss(), (x, y)) @ torch.ones(8, dtype=torch.float64)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run_a), threading.Thread(target=run_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    after = (
        torch.backends.mha.get_fastpath_enabled(),
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
    )
    assert after == before


from curvature.data import BatchSource, batch_weight  # noqa: E402


# -- the batch source ---------------------------------------------------------------------------
def test_batch_source_weights_counts_and_slices():
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    mean = BatchSource(batches, reduction="mean")
    assert [b.weight for b in mean] == [4.0, 6.0] and mean.total_weight == 10.0
    assert [b.weight for b in BatchSource(batches, reduction="sum")] == [1.0, 1.0]
    assert (mean.num_samples, mean.num_batches) == (10, 2)
    pieces = list(mean.minibatches(3))
    assert [p.num_samples for p in pieces] == [3, 1, 3, 3]
    assert torch.equal(torch.cat([p.inputs for p in pieces]), x)
    assert batch_weight(x, y, reduction="mean", normaliser=lambda i, t: 7) == 7.0
    with pytest.raises(ValueError, match="empty"):
        list(BatchSource([]))


def test_operators_expose_sample_and_batch_counts():
    model, x, y = _mlp_dataset(n=37)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    H = Hessian(model, nn.CrossEntropyLoss(), loader)
    assert (H.num_samples, H.num_batches) == (37, 3)  # counted before any product
    G = GGN(model, nn.CrossEntropyLoss(), (x, y))
    assert (G.num_samples, G.num_batches) == (37, 1)


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
