"""The global kernel switches survive threads, the auto backend's choice is reproducible, pinnable and
memory-bounded, and the batch source weights and counts batches."""

from __future__ import annotations

import threading

import pytest
import torch
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


# -- the auto backend: reproducible, pinnable, memory-bounded ---------------------------------
from curvature import backend_choice  # noqa: E402
from curvature.data import BatchSource, batch_weight  # noqa: E402


@pytest.fixture
def clean_choices():
    backend_choice.clear()
    yield
    backend_choice.clear()


def _tanh_case():
    model, batches = make_batches("mlp", "ce", sizes=(16, 16))
    return model, nn.CrossEntropyLoss(), batches


def test_deterministic_auto_is_bitwise_reproducible_and_column_exact(clean_choices):
    model, loss_fn, batches = _tanh_case()
    H = Hessian(model, loss_fn, batches, deterministic=True)
    V = torch.randn(H.shape[0], 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    first = H @ V
    again = Hessian(model, loss_fn, batches, deterministic=True) @ V
    assert torch.equal(first, again) and torch.equal(first, H @ V)
    for j in range(V.shape[1]):  # each column bitwise equal to its own single product
        assert torch.equal(first[:, j], H @ V[:, j].contiguous())
    choice = H.backend_choice(6)
    assert (choice.backend, choice.source) == ("double_backward", "rule")
    assert not backend_choice.choices()  # a rule is not recorded as a measurement


def test_measured_choice_is_recorded_readable_and_shared(clean_choices):
    model, loss_fn, batches = _tanh_case()
    H = Hessian(model, loss_fn, batches, memory_budget=1 << 30)
    V = torch.randn(H.shape[0], 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = Hessian(model, loss_fn, batches, backend="double_backward") @ V
    assert ref.rel_err(H @ V, exact) <= 1e-12
    key = H.backend_key(4)
    choice = backend_choice.lookup(key)
    assert choice is not None and choice.source == "measured" and H.resolved_backend(4) == choice.backend
    assert set(choice.seconds_per_column) >= {"double_backward"}
    other = Hessian(model, loss_fn, batches)
    assert other.backend_key(4) == key and other.resolved_backend(4) == choice.backend  # no new timing
    assert choice.to_dict()["backend"] == choice.backend


def test_pinned_choice_wins(clean_choices):
    model, loss_fn, batches = _tanh_case()
    H = Hessian(model, loss_fn, batches)
    backend_choice.pin(H.backend_key(3), "forward_over_reverse")
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = Hessian(model, loss_fn, batches, backend="double_backward") @ V
    assert ref.rel_err(H @ V, exact) <= 1e-12
    assert H.backend_choice(3).source == "pinned" and H.resolved_backend(3) == "forward_over_reverse"
    with pytest.raises(ValueError, match="backend"):
        backend_choice.pin(H.backend_key(3), "magic")


def test_median_rule_ignores_one_lucky_sample():
    noisy = {"double_backward": [1.0, 1.02, 0.99], "double_backward_vmap": [0.3, 1.5, 1.4]}
    assert backend_choice.select_by_medians(noisy) == "double_backward"
    close = {"double_backward": [1.0, 1.0, 1.0], "forward_over_reverse": [0.93, 0.95, 0.94]}
    assert backend_choice.select_by_medians(close) == "double_backward"  # within 10%: the lighter loop
    clear_win = {"double_backward": [1.0, 1.0, 1.0], "forward_over_reverse": [0.5, 0.6, 0.55]}
    assert backend_choice.select_by_medians(clear_win) == "forward_over_reverse"


def test_recheck_drops_a_vmapped_choice_that_is_slower_than_the_loop(clean_choices):
    model, loss_fn, batches = _tanh_case()
    H = Hessian(model, loss_fn, batches)
    key = H.backend_key(4)
    fake = backend_choice.BackendChoice(
        "double_backward_vmap", "measured", seconds_per_column={"double_backward": 1e-12}, columns=4
    )
    backend_choice.record(key, fake)
    H._rechecks[4] = 1
    V = torch.randn(H.shape[0], 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = H @ V
    assert ref.rel_err(out, Hessian(model, loss_fn, batches, backend="double_backward") @ V) <= 1e-12
    assert H.resolved_backend(4) == "double_backward"
    assert backend_choice.lookup(key).reason.startswith("re-check")


def test_memory_budget_bounds_the_vmapped_columns(clean_choices):
    model, loss_fn, batches = _tanh_case()
    H = Hessian(model, loss_fn, batches, memory_budget=0)
    V = torch.randn(H.shape[0], 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = Hessian(model, loss_fn, batches, backend="double_backward") @ V
    assert ref.rel_err(H @ V, exact) <= 1e-12
    choice = H.backend_choice(8)
    assert choice.backend == "double_backward" and "memory budget" in choice.reason
    # An explicit vmapped backend takes as many columns per pass as the budget allows.
    Hv = Hessian(model, loss_fn, batches, backend="double_backward_vmap", memory_budget=0)
    Hv @ V[:, :1]
    Hv._graph_bytes = 1000
    Hv.memory_budget = 3000
    assert Hv._vmap_columns("double_backward_vmap", 0, 8) == 3
    assert ref.rel_err(Hv @ V, exact) <= 1e-12


def test_out_of_memory_falls_back_to_the_loop(clean_choices, monkeypatch, caplog):
    model, loss_fn, batches = _tanh_case()
    H = Hessian(model, loss_fn, batches, backend="double_backward_vmap")

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(H, "_vmapped_second_backward", boom)
    V = torch.randn(H.shape[0], 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with caplog.at_level("WARNING", logger="curvature.hessian"):
        out = H @ V
    assert ref.rel_err(out, Hessian(model, loss_fn, batches, backend="double_backward") @ V) <= 1e-12
    assert "out of memory" in caplog.text


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
