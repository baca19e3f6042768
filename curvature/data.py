"""Batches of ``(inputs, targets)``: recognising them, counting samples, moving them, feeding the model."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["is_single_batch", "as_batch_source", "batch_size", "move_to", "call_model"]


def _is_inputs(x: Any) -> bool:
    if isinstance(x, (Tensor, Mapping)):
        return True
    return isinstance(x, (tuple, list)) and len(x) > 0 and all(isinstance(t, Tensor) for t in x)


def is_single_batch(data: Any) -> bool:
    """Whether ``data`` is one ``(inputs, targets)`` batch rather than an iterable of batches.

    ``inputs`` is a tensor, a tuple of tensors (positional arguments) or a dict (keyword
    arguments); ``targets`` is a tensor.

    Example:
        >>> x, y = torch.zeros(4, 3), torch.zeros(4)
        >>> is_single_batch((x, y)), is_single_batch([(x, y), (x, y)])
        (True, False)
    """
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[1], Tensor)
        and _is_inputs(data[0])
    )


class _SingleBatch:
    def __init__(self, batch: Any):
        self.batch = batch

    def __iter__(self) -> Iterator[Any]:
        yield self.batch


def as_batch_source(data: Any) -> Iterable[Any]:
    """Return a re-iterable source of batches for ``data`` (one batch or an iterable of batches).

    One-shot iterators (generators) are refused: every product iterates the data again.

    Example:
        >>> x, y = torch.zeros(4, 3), torch.zeros(4)
        >>> len(list(as_batch_source((x, y))))
        1
    """
    if is_single_batch(data):
        return _SingleBatch(tuple(data))
    if isinstance(data, Iterator):
        raise TypeError(
            "data is a one-shot iterator; pass a list of batches or a re-iterable such as a DataLoader, "
            "because every product iterates over the data again"
        )
    if not isinstance(data, Iterable):
        raise TypeError(
            f"data must be an (inputs, targets) batch or an iterable of such batches, got {type(data).__name__}"
        )
    return data


def batch_size(inputs: Any, targets: Any) -> int:
    """Number of samples in a batch: the leading dimension of the targets (else of the first input)."""
    if isinstance(targets, Tensor) and targets.ndim > 0:
        return int(targets.shape[0])
    first = inputs
    if isinstance(inputs, Mapping):
        first = next(iter(inputs.values()))
    elif isinstance(inputs, (tuple, list)):
        first = inputs[0]
    if isinstance(first, Tensor) and first.ndim > 0:
        return int(first.shape[0])
    raise ValueError("cannot tell the number of samples of a batch: targets and inputs have no batch dimension")


def move_to(obj: Any, device: torch.device) -> Any:
    """Move tensors (also inside tuples, lists and dicts) to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True) if obj.device != device else obj
    if isinstance(obj, Mapping):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(move_to(v, device) for v in obj)
    return obj


def call_model(model: nn.Module | Any, inputs: Any) -> Any:
    """Call ``model`` with a tensor, a tuple of tensors (positional) or a dict (keywords)."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def split_batch(batch: Any) -> tuple[Any, Any]:
    """Unpack one ``(inputs, targets)`` batch with a clear error for anything else."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(
            f"each batch must be an (inputs, targets) pair, got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        )
    return batch[0], batch[1]
