"""What each spawned rank runs (module-level functions, so ``spawn`` can pickle them)."""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import torch
from torch import nn

from tests.distributed.problems import WEIGHTS, analyses, make_model, probe_block, shard


def _operators(model: nn.Module, data: Any) -> tuple[Any, ...]:
    from curvature import GGN, DataParallelOperator, Hessian

    ce, ce_sum = nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum")
    return tuple(
        DataParallelOperator(op)
        for op in (
            Hessian(model, ce, data),
            GGN(model, ce, data),
            Hessian(model, ce_sum, data),
            Hessian(model, ce, data, params=WEIGHTS),
        )
    )


def exact(rank: int, world_size: int, save: Callable[[dict], None]) -> dict[str, Any]:
    """The analyses on the wrapped operators, plus a DDP-wrapped model's product and the counts."""
    from curvature import DataParallelOperator, Hessian, unwrap_data_parallel

    model = make_model()
    data = shard(rank, world_size)
    out = analyses(*_operators(model, data))
    ddp = nn.parallel.DistributedDataParallel(model)
    V = probe_block(sum(p.numel() for p in model.parameters()))
    H_ddp = DataParallelOperator(Hessian(ddp, nn.CrossEntropyLoss(), data))  # DDP's forward, "module." names
    H_unwrapped = DataParallelOperator(Hessian(unwrap_data_parallel(ddp), nn.CrossEntropyLoss(), data))
    out["ddp"] = H_ddp @ V
    out["ddp_unwrapped"] = H_unwrapped @ V
    out["ddp_names"] = [b.name for b in H_ddp.blocks]
    out["counts"] = (H_unwrapped.num_samples, H_unwrapped.num_batches)
    return out


def _outcome(call: Callable[[], Any]) -> dict[str, Any]:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 -- the test inspects what every rank raised
        return {"type": type(exc).__name__, "message": str(exc), "failed_ranks": getattr(exc, "failed_ranks", None)}
    return {"type": None}


def failures(rank: int, world_size: int, save: Callable[[dict], None]) -> dict[str, Any]:
    """Errors every rank must see; the last scenario kills rank 1 while rank 0 waits in a product."""
    from curvature import DataParallelOperator, Hessian

    ce = nn.CrossEntropyLoss()
    model = make_model()
    data = shard(rank, world_size)
    out: dict[str, Any] = {}

    def nan_batch() -> None:
        bad = data
        if rank == 1:
            x, y = data
            x = x.clone()
            x[3, 0] = float("nan")
            bad = (x, y)
        H = DataParallelOperator(Hessian(model, ce, bad))
        H @ probe_block(H.shape[0])

    def different_probes() -> None:
        H = DataParallelOperator(Hessian(model, ce, data))
        H @ torch.randn(H.shape[0], 2, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)

    def different_values() -> None:
        mine = make_model()
        if rank == 1:
            with torch.no_grad():
                mine[0].bias[0] += 1e-3
        DataParallelOperator(Hessian(mine, ce, data))

    def different_shapes() -> None:
        DataParallelOperator(Hessian(make_model(hidden=5 if rank == 0 else 4), ce, data))

    def different_dtypes() -> None:
        mine = make_model(dtype=torch.float64 if rank == 0 else torch.float32)
        shard_data = data if rank == 0 else (data[0].float(), data[1])
        DataParallelOperator(Hessian(mine, ce, shard_data))

    for name, call in [("nan_batch", nan_batch), ("different_probes", different_probes),
                       ("different_values", different_values), ("different_shapes", different_shapes),
                       ("different_dtypes", different_dtypes)]:
        out[name] = _outcome(call)
    # Still usable after all that: the group is in a consistent state.
    H = DataParallelOperator(Hessian(model, ce, data))
    out["after"] = H @ probe_block(H.shape[0])

    # A rank that dies outside any product: the others must not hang.
    save(out)
    if rank == 1:
        time.sleep(0.5)
        os._exit(3)
    start = time.monotonic()
    out["peer_died"] = _outcome(lambda: H @ probe_block(H.shape[0]))
    out["peer_died_seconds"] = time.monotonic() - start
    save(out)
    os._exit(0)  # the group cannot be destroyed cleanly without its peer
