"""Hessian products of a model sharded with FSDP (``torch.distributed.fsdp.fully_shard``), by central
differences of gradients, with sharded vectors in and out.

FSDP's forward uses all-gathered parameters, so ``torch.autograd.grad`` with respect to the
sharded parameters sees them unused and no exact (double-backward) product can run through it;
``loss.backward()`` does work and leaves each rank its reduce-scattered gradient shard. So each
column is ``(g(θ + h v) − g(θ − h v)) / (2h)`` with every rank perturbing its own shard in place
(see :mod:`curvature.finite_difference` for the step and the error). ``docs/finite_difference.md``
says what runs where.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .data import BatchSource, call_model
from .losses import describe_loss, evaluate_loss

__all__ = ["fsdp_hessian_products"]


def _local(p: Tensor) -> Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def _global_sum(value: float, group: Any) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return float(t)


def fsdp_hessian_products(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    data: Any,
    V: Sequence[Tensor],
    *,
    process_group: Any = None,
) -> list[Tensor]:
    """``H V`` of the loss over ALL ranks' data, for a model sharded with ``fully_shard``.

    Collective: every rank calls it with its own ``data`` (one ``(inputs, targets)`` batch or a
    re-iterable of batches, as for the operators) and its local shards of the columns: ``V[i]`` of
    shape ``(k, *p_i.to_local().shape)`` for the ``i``-th parameter that requires grad. Returns the
    local shards of ``H V`` in the same layout. Batches are weighted as the operators weight them
    (a mean loss by its own normalizer: valid targets, summed class weights), summed over ranks.
    Leaves ``p.grad`` cleared and the parameters bitwise as they were.

    Example (one process, a plain model: the same as ``Hessian(backend="finite_difference")``):
        >>> import torch, torch.distributed as dist, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "store")
        >>> dist.init_process_group("gloo", init_method="file://" + path, rank=0, world_size=1)
        >>> model = torch.nn.Linear(3, 2).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
        >>> V = [torch.ones(1, 2, 3, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)]
        >>> [r.shape for r in fsdp_hessian_products(model, torch.nn.CrossEntropyLoss(), (x, y), V)]
        [torch.Size([1, 2, 3]), torch.Size([1, 2])]
        >>> dist.destroy_process_group()
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if len(V) != len(params):
        raise ValueError(f"V must hold one block per parameter that requires grad ({len(params)}), got {len(V)}")
    shards = [_local(p) for p in params]
    for v, s in zip(V, shards):
        if v.shape[1:] != s.shape:
            raise ValueError(f"a block of V has shape {tuple(v.shape)}; expected (k, *{tuple(s.shape)}), the shard")
    info = describe_loss(loss_fn)
    if info.kind == "generic":
        raise ValueError("fsdp_hessian_products needs a recognised loss (nn.CrossEntropyLoss, nn.MSELoss, ...)")
    source = BatchSource(data, reduction=info.reduction)
    world = dist.get_world_size(process_group)
    saved = [s.detach().clone() for s in shards]
    # The step of curvature.finite_difference.central_difference_step, from the global norms.
    squares = torch.tensor([float(s.double().pow(2).sum()) for s in saved], dtype=torch.float64)
    dist.all_reduce(squares, group=process_group)
    scales = [torch.finfo(s.dtype).eps ** (1.0 / 3.0) * (1.0 + math.sqrt(float(q))) for s, q in zip(shards, squares)]

    batches = list(source)
    # FSDP runs collectives in every forward and backward: every rank must run as many; a rank with
    # fewer batches repeats its last one with weight 0.
    count = torch.tensor([len(batches)], dtype=torch.int64)
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=process_group)
    if not batches:
        raise ValueError("fsdp_hessian_products needs at least one batch on every rank")
    passes = [(b, 1.0) for b in batches] + [(batches[-1], 0.0)] * (int(count) - len(batches))

    def gradient() -> list[Tensor]:
        model.zero_grad(set_to_none=True)
        total = 0.0
        for batch, use in passes:
            out = call_model(model, batch.inputs)
            with torch.no_grad():
                _, norm = evaluate_loss(info, loss_fn, out.detach(), batch.targets, batch.inputs)
            weight = use * (norm.value if info.reduction == "mean" else 1.0)
            total += weight
            # FSDP averages the gradient over ranks: ``world`` turns the average into the sum.
            (loss_fn(out, batch.targets) * (weight * world)).backward()
        total = _global_sum(total, process_group) if info.reduction == "mean" else 1.0
        return [(_local(p.grad) / total if p.grad is not None else torch.zeros_like(s)).detach()
                for p, s in zip(params, shards)]

    k = V[0].shape[0]
    out = [torch.zeros_like(v) for v in V]
    try:
        for c in range(k):
            vnorm = math.sqrt(_global_sum(sum(float(v[c].double().pow(2).sum()) for v in V), process_group))
            if vnorm == 0.0:
                continue
            h = max(scales) / vnorm
            results = []
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for s, base, v in zip(shards, saved, V):
                        s.copy_(base + sign * h * v[c].to(s.dtype))
                results.append(gradient())
            for o, gp, gm in zip(out, *results):
                o[c] = ((gp - gm) / (2.0 * h)).to(o.dtype)
    finally:
        with torch.no_grad():
            for s, base in zip(shards, saved):
                s.copy_(base)
        model.zero_grad(set_to_none=True)
    return out
