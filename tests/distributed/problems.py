"""The small float64 problem the distributed tests share: a tanh MLP on 60 random samples, cut into
uneven shards (and uneven batches inside a shard), with helpers that run the same analyses on any
operator."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

NUM_SAMPLES = 60
#: Shard boundaries per world size: deliberately uneven.
CUTS = {1: [0, 60], 2: [0, 37, 60], 3: [0, 29, 46, 60]}
WEIGHTS = ["0.weight", "2.weight"]  # the quantizable layers' weights (HAWQ)


def make_model(hidden: int = 5, dtype: torch.dtype = torch.float64) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 3)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model.eval()


def full_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(NUM_SAMPLES, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (NUM_SAMPLES,), generator=g)
    return x, y


def shard(rank: int, world_size: int) -> Any:
    """Rank 0 gets a list of batches of 8 (a short last one); other ranks one batch."""
    x, y = full_data()
    lo, hi = CUTS[world_size][rank], CUTS[world_size][rank + 1]
    xs, ys = x[lo:hi], y[lo:hi]
    if rank == 0:
        return [(xs[i : i + 8], ys[i : i + 8]) for i in range(0, len(ys), 8)]
    return (xs, ys)


def probe_block(d: int, k: int = 3) -> torch.Tensor:
    return torch.randn(d, k, generator=torch.Generator().manual_seed(11), dtype=torch.float64)


def analyses(H: Any, G: Any, H_sum: Any, H_weights: Any) -> dict[str, Any]:
    """Everything compared between one process and several: products, trace, SLQ, eigsh, block traces."""
    import estimators
    import spectra

    V = probe_block(H.shape[0])
    trace = estimators.trace(H, num_matvecs=12, generator=torch.Generator().manual_seed(2))
    density = spectra.slq(H, num_probes=2, num_steps=12, generator=torch.Generator().manual_seed(3))
    eig = spectra.eigsh(H, k=3, tol=1e-10, generator=torch.Generator().manual_seed(4))
    blocks = estimators.block_traces(H_weights, num_matvecs=16, generator=torch.Generator().manual_seed(5))
    return {
        "hessian": H @ V,
        "ggn": G @ V,
        "hessian_sum_loss": H_sum @ V,
        "trace": (trace.value, trace.stderr),
        "slq_nodes": density.nodes,
        "slq_weights": density.weights,
        "eigenvalues": eig.eigenvalues,
        "block_traces": {name: est.value for name, est in blocks.items()},
    }


def equal_shard(rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous equal shards (60 divides by 1, 2 and 3): DDP's average of means is the global mean."""
    x, y = full_data()
    n = NUM_SAMPLES // world_size
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
