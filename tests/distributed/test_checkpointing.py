"""Activation checkpointing (``torch.utils.checkpoint``, ``use_reentrant=False``) in the model leaves
the curvature products unchanged: the recomputed forward is the same function, and double
backward goes through the recomputation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from curvature import GGN, Hessian
from tests.distributed.problems import full_data


class Blocks(nn.Module):
    def __init__(self, checkpointed: bool):
        super().__init__()
        self.checkpointed = checkpointed
        self.inner = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Softplus())
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = checkpoint(self.inner, x, use_reentrant=False) if self.checkpointed else self.inner(x)
        return self.head(h)


def _pair() -> tuple[nn.Module, nn.Module]:
    plain, ckpt = Blocks(False).double().eval(), Blocks(True).double().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in plain.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    ckpt.load_state_dict(plain.state_dict())
    return plain, ckpt


@pytest.mark.parametrize("kind", [Hessian, GGN])
@pytest.mark.parametrize("cache_graph", [None, False])
def test_checkpointed_products_equal_plain(kind, cache_graph):
    plain, ckpt = _pair()
    x, y = full_data()
    data = [(x[i : i + 16], y[i : i + 16]) for i in range(0, len(y), 16)]
    ce = nn.CrossEntropyLoss()
    A, B = kind(plain, ce, data, cache_graph=cache_graph), kind(ckpt, ce, data, cache_graph=cache_graph)
    V = torch.randn(A.shape[0], 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = A @ V
    for _ in range(2):  # the second product may reuse cached graphs
        torch.testing.assert_close(B @ V, expected, rtol=1e-12, atol=1e-12)
