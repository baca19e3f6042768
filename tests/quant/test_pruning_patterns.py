"""N:M semi-structured pruning against brute force over every pattern-satisfying removal set."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import quant

f64 = torch.float64


def _layer_model(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 2, bias=False), nn.Tanh(), nn.Conv1d(1, 2, 4, bias=False)).to(f64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=f64))
    return model


def _brute_force(w, Finv, n, m, rows):
    """The removal set with exactly m − n weights per group of every row minimising Σρ, and its update."""
    rho = w**2 / (2 * Finv.diagonal())
    d = w.numel()
    groups = [list(range(s, s + m)) for s in range(0, d, m)]
    assert sum(len(r) for r in rows) == d
    best, best_set = float("inf"), None
    for choice in itertools.product(*[itertools.combinations(grp, m - n) for grp in groups]):
        removed = sorted(i for c in choice for i in c)
        cost = float(rho[removed].sum())
        if cost < best - 1e-15:
            best, best_set = cost, removed
    u = torch.zeros(d, dtype=f64)
    u[best_set] = w[best_set] / Finv.diagonal()[best_set]
    new = w - Finv @ u
    new[best_set] = 0
    return best_set, new, best


@pytest.mark.parametrize("block_size", [None, 8])
def test_two_four_pattern_matches_brute_force(block_size):
    model = _layer_model()
    w = torch.cat([model[0].weight.detach().reshape(-1), model[2].weight.detach().reshape(-1)])
    d = w.numel()  # 16 + 8: rows of 8 (Linear) and of 4 (Conv1d, one input channel, kernel 4)
    g = torch.Generator().manual_seed(5)
    G = torch.randn(6, d, generator=g, dtype=f64)
    lam = 0.05
    F = lam * torch.eye(d, dtype=f64) + G.T @ G / 6
    if block_size is not None:
        blocks = torch.block_diag(*[torch.ones(block_size, block_size) for _ in range(d // block_size)]).bool()
        F = torch.where(blocks, F, torch.zeros((), dtype=f64))
    Finv = torch.linalg.inv(F)
    removed, expected, cost = _brute_force(w, Finv, 2, 4, [range(0, 8), range(8, 16), range(16, 20), range(20, 24)])
    result = quant.prune(model, gradients=G, pattern="2:4", damping=lam, block_size=block_size)
    got = torch.cat([model[0].weight.detach().reshape(-1), model[2].weight.detach().reshape(-1)])
    assert torch.nonzero(got == 0).flatten().tolist() == removed
    assert (got - expected).abs().max() < 1e-10
    assert result.predicted_loss_increase == pytest.approx(cost, rel=1e-10)
    assert result.sparsity == 0.5 and result.pattern == (2, 4)
    # at most 2 nonzeros in every 4 consecutive weights of a row
    for weight in (model[0].weight, model[2].weight):
        rows = weight.detach().reshape(weight.shape[0], -1)
        assert ((rows.reshape(rows.shape[0], -1, 4) != 0).sum(-1) <= 2).all()


def test_nm_magnitude_and_existing_mask():
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, -1.0, 1.0, 2.0]]))
    # a weight already pruned counts toward the pattern: only one more goes (|w| = 1, lower index first)
    mask = quant.PruneMask({"0": torch.tensor([[True, True, True, False]])})
    result = quant.prune(model, method="magnitude", pattern=(2, 4), mask=mask)
    assert result.mask.masks["0"].tolist() == [[True, False, True, False]]
    assert model[0].weight.detach().tolist() == [[3.0, 0.0, 1.0, 0.0]]


def test_pattern_errors():
    model = nn.Sequential(nn.Linear(6, 1))
    with pytest.raises(ValueError, match="multiple of 4"):
        quant.prune(model, method="magnitude", pattern="2:4")
    with pytest.raises(ValueError, match="multiple of 4"):
        quant.prune(model, method="magnitude", pattern="2:4", layers=["0"])
    two = nn.Sequential(nn.Linear(6, 1), nn.Linear(1, 4, bias=False), nn.Linear(4, 2))
    result = quant.prune(two, method="magnitude", pattern="2:4")  # only the layer whose rows fit
    assert list(result.mask.masks) == ["2"]
    with pytest.raises(ValueError, match="N:M"):
        quant.prune(model, method="magnitude", pattern="4:2")
    with pytest.raises(ValueError, match="recomputations=1"):
        quant.prune(nn.Sequential(nn.Linear(4, 1)), method="magnitude", pattern="2:4", recomputations=2)
