"""Keep the model's buffers (BatchNorm running statistics, ``num_batches_tracked``) as they were
around the optimizers' extra closure calls (finite differences, rejected Newton trials).

The optimizers get parameters, not modules, so the modules whose buffers a closure call changes
are found while it runs: a global forward pre-hook snapshots the buffers of every module the
closure calls (the first time it is called inside the guarded block), and the block's exit puts
them back, bit-exactly and into the same tensor objects. ``model=`` adds every buffer of that
module up front (buffers a parent reads from a child it does not call).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn

__all__ = ["buffers_restored"]


class _Snapshot:
    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.saved: list[tuple[nn.Module, str, Tensor, Tensor]] = []

    def add(self, module: nn.Module) -> None:
        if id(module) in self.seen:
            return
        self.seen.add(id(module))
        for name, buf in module._buffers.items():
            if buf is not None:
                self.saved.append((module, name, buf, buf.detach().clone()))

    @torch.no_grad()
    def restore(self) -> None:
        for module, name, original, copy in self.saved:
            if original.shape == copy.shape:
                original.copy_(copy)
            module._buffers[name] = original


@contextmanager
def buffers_restored(model: nn.Module | None = None) -> Iterator[None]:
    """Run a block (an extra closure call) and restore every buffer its modules changed.

    Examples:
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> with buffers_restored():
        ...     _ = bn(torch.randn(4, 2))
        >>> int(bn.num_batches_tracked), bn.running_mean.tolist()
        (0, [0.0, 0.0])
    """
    snapshot = _Snapshot()
    if model is not None:
        for module in model.modules():
            snapshot.add(module)

    def hook(module: nn.Module, args: Any) -> None:
        snapshot.add(module)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        snapshot.restore()
