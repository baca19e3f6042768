import pytest
import torch
from hypothesis import settings

# Property tests draw from a fixed seed per test: the suite never flakes, and a failure reproduces.
settings.register_profile("deterministic", derandomize=True, print_blob=True)
settings.load_profile("deterministic")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _one_thread():
    """Test problems are tiny: intra-op threads only add overhead, and a second OpenMP thread on a
    busy 2-core machine can slow each small product down by 100x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
