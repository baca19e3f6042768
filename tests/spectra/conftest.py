import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    # These tests multiply small dense matrices, which run fastest on one thread; and a second
    # OpenMP thread on a shared 2-core machine can slow each tiny product down by 100x.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
