"""Finite-difference Hessian products of an FSDP-sharded model (fully_shard, 2 gloo processes on the
CPU), sharded vectors in and out, equal one process's products over all the data."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch import nn

from tests.distributed.launch import run_ranks

pytest.importorskip("torch.distributed.fsdp")

IGNORE = -100


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(13, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (13,), generator=g)
    y[[2, 7, 8]] = IGNORE  # padding: the batches are weighted by their valid targets
    # rank 0: batches of 5 and 3 samples; rank 1: one batch of 5 (uneven shards)
    shards = [[(x[:5], y[:5]), (x[5:8], y[5:8])], [(x[8:], y[8:])]]
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, generator=g, dtype=torch.float64)
    return model, shards, V


def fsdp_worker(rank: int, world_size: int, save: Callable[[dict], None]) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    from curvature import Hessian
    from curvature.fsdp import fsdp_hessian_products

    model, shards, V = _problem()
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    everything = [b for s in shards for b in s]
    exact = Hessian(model, loss_fn, everything, backend="loop") @ V
    fd_one = Hessian(model, loss_fn, everything, backend="finite_difference") @ V
    shapes = [p.shape for p in model.parameters()]
    mesh = init_device_mesh("cpu", (world_size,))
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = list(model.parameters())
    blocks, start = [], 0
    for p, shape in zip(params, shapes):
        n = shape.numel()
        cols = V[start:start + n].T.reshape(V.shape[1], *shape)
        blocks.append(torch.stack([distribute_tensor(c, p.device_mesh, p.placements).to_local() for c in cols]))
        start += n
    before = [p.to_local().clone() for p in params]
    local = fsdp_hessian_products(model, loss_fn, shards[rank], blocks)
    from torch.distributed.tensor import DTensor

    full = [
        torch.stack([DTensor.from_local(c, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
                     for c in r])
        for r, p in zip(local, params)
    ]
    HV = torch.cat([f.reshape(V.shape[1], -1) for f in full], 1).T
    return {
        "vs_exact": float((HV - exact).norm() / exact.norm()),
        "vs_one_process_fd": float((HV - fd_one).norm() / fd_one.norm()),
        "restored": all(torch.equal(p.to_local(), b) for p, b in zip(params, before)),
        "grads_cleared": all(p.grad is None for p in params),
    }


def test_fsdp_products_equal_one_process():
    run = run_ranks(fsdp_worker, 2, timeout=240, pg_timeout=120)
    assert run.exitcodes == [0, 0], run
    for res in run.results:
        assert res["vs_exact"] < 1e-5, res
        assert res["vs_one_process_fd"] < 1e-8, res
        assert res["restored"] and res["grads_cleared"], res
