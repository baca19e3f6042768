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
    try:  # in the same launch (starting processes is the expensive part), reported separately
        out["optimizers"] = optimizers(rank, world_size, save)
    except Exception as exc:  # noqa: BLE001 -- the optimizer test shows it
        out["optimizers"] = f"{type(exc).__name__}: {exc}"
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

    def wrong_shape_on_one_rank() -> None:
        H = DataParallelOperator(Hessian(model, ce, data))
        H @ probe_block(H.shape[0] + (rank == 1))

    for name, call in [("nan_batch", nan_batch), ("wrong_shape_on_one_rank", wrong_shape_on_one_rank),
                       ("different_probes", different_probes),
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


def _global_mean_gradients(model: nn.Module, loss_fn: Any, data: Any, total: int) -> None:
    """``p.grad`` = gradient of the mean loss over ALL ranks' samples (uneven shards: weighted sum)."""
    import torch.distributed as dist

    model.zero_grad()
    x, y = data
    (loss_fn(model(x), y) * (len(y) / total)).backward()
    grads = [p.grad for p in model.parameters()]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def optimizers(rank: int, world_size: int, save: Callable[[dict], None]) -> dict[str, Any]:
    """Sophia-H and AdaHessian under DDP (equal shards, gradients averaged by DDP, closure finite
    differences) and with ``curvature=`` a data-parallel operator (uneven shards, exact products)."""
    from curvature import DataParallelOperator, Hessian
    from curvature.optim import AdaHessian, Sophia
    from tests.distributed.problems import equal_shard, full_data

    ce = nn.CrossEntropyLoss()
    out: dict[str, Any] = {}
    for name, make in [("sophia", lambda ps: Sophia(ps, lr=0.05, rho=0.5, update_period=1, weight_decay=0.0,
                                                     generator=torch.Generator().manual_seed(7))),
                       ("adahessian", lambda ps: AdaHessian(ps, lr=0.05, generator=torch.Generator().manual_seed(7)))]:
        # DDP path: equal shards, so DDP's average of the ranks' mean gradients is the global mean.
        model = make_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        x, y = equal_shard(rank, world_size)
        opt = make(ddp.parameters())

        def closure(opt=opt, ddp=ddp, x=x, y=y):
            opt.zero_grad()
            loss = ce(ddp(x), y)
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure)
        out[f"{name}_ddp"] = [p.detach().clone() for p in model.parameters()]
        out[f"{name}_ddp_state"] = [{k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
                                    for p in model.parameters()]

        # Operator path: uneven shards, exact global-mean gradients and Hessian products.
        model = make_model()
        data = shard(rank, world_size)
        if isinstance(data, list):
            data = (torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data]))
        opt = make(model.parameters())
        total = len(full_data()[1])
        for _ in range(3):
            _global_mean_gradients(model, ce, data, total)
            with DataParallelOperator(Hessian(model, ce, data)) as H:
                opt.step(curvature=H)
        out[f"{name}_operator"] = [p.detach().clone() for p in model.parameters()]
    out["mfac"] = _mfac_under_ddp(rank, world_size)
    return out


def _mfac_under_ddp(rank: int, world_size: int) -> dict[str, Any]:
    """M-FAC under DDP: every rank pushes the same averaged gradient, so the windows agree (checked
    with ``assert_same_across_ranks``); a window perturbed on one rank is caught on every rank."""
    from curvature.distributed import assert_same_across_ranks
    from curvature.optim import MFAC
    from tests.distributed.problems import equal_shard

    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = MFAC(ddp.parameters(), lr=0.05, num_grads=4, damping=1e-3)
    x, y = equal_shard(rank, world_size)
    for _ in range(5):
        opt.zero_grad()
        nn.CrossEntropyLoss()(ddp(x), y).backward()
        opt.step()
    state = next(s for s in opt.state.values() if "mfac_window" in s)
    assert_same_across_ranks([state["mfac_window"], state["mfac_gram"]], name="the M-FAC window")
    if rank == world_size - 1:
        state["mfac_window"][0, 0] += 1e-6
    outcome = _outcome(lambda: assert_same_across_ranks([state["mfac_window"]], name="the M-FAC window"))
    return {"window": state["mfac_window"].clone(), "params": [p.detach().clone() for p in model.parameters()],
            "perturbed": outcome}


def padded_shards(rank: int, world_size: int, save: Callable[[dict], None]) -> dict[str, Any]:
    """Issue 21: rank 1's shard is only padding (weight 0), rank 2's is empty; a lambda loss and a
    module loss; then data that weigh 0 on every rank (a named error on every rank)."""
    import torch.nn.functional as F

    from curvature import GGN, DataParallelOperator, Hessian
    from tests import cases

    p = cases.problem("mlp", "ce_ignore_index", "fully_padded")
    shards = [[p.batches[0], p.batches[2]], [p.batches[1]], []]
    lam = lambda o, t: F.cross_entropy(o, t, ignore_index=cases.IGNORE)  # noqa: E731
    V = probe_block(sum(q.numel() for q in p.model.parameters()))
    out: dict[str, Any] = {}
    for name, Op, loss in (("hessian", Hessian, p.loss_fn), ("ggn_lambda", GGN, lam)):
        out[name] = _outcome_value(lambda Op=Op, loss=loss: DataParallelOperator(Op(p.model, loss, shards[rank])) @ V)
    out["all_padded"] = _outcome(
        lambda: DataParallelOperator(Hessian(p.model, p.loss_fn, [p.batches[1]] if rank else [])) @ V
    )
    return out


def _outcome_value(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 -- the test shows what every rank raised
        return f"{type(exc).__name__}: {exc}"
