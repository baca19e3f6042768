"""The global kernel switches survive threads, and the batch source weights and counts batches."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvature import GGN, Hessian
from tests.curvature.models import mlp_dataset


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
    assert batch_weight(x, y, reduction="mean", normalizer=lambda i, t: 7) == 7.0
    with pytest.raises(ValueError, match="empty"):
        list(BatchSource([]))


def test_operators_expose_sample_and_batch_counts():
    model, x, y = mlp_dataset(n=37)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    H = Hessian(model, nn.CrossEntropyLoss(), loader)
    assert (H.num_samples, H.num_batches) == (37, 3)  # counted before any product
    G = GGN(model, nn.CrossEntropyLoss(), (x, y))
    assert (G.num_samples, G.num_batches) == (37, 1)
