"""The one batch source of the toolkit: recognising ``(inputs, targets)`` batches, weighting them by
the loss's reduction, counting samples and batches, moving them to a device, slicing mini-batches,
and feeding them to the model.

Every consumer of model data (the curvature operators, M-FAC's gradient collection, loss
landscapes, the report) iterates a :class:`BatchSource`, so a batch is weighted the same way
everywhere: the dataset curvature of a ``mean`` loss is ``sum_b w_b C_b / sum_b w_b`` with ``w_b``
the batch's normalizer (its number of samples by default), and of a ``sum`` loss ``sum_b C_b``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

__all__ = [
    "Batch",
    "BatchSource",
    "batch_weight",
    "is_single_batch",
    "as_batch_source",
    "batch_size",
    "move_to",
    "call_model",
    "split_batch",
    "slice_batch",
    "batch_tensors",
    "map_tensors",
    "EmptyDataError",
]

class EmptyDataError(ValueError):
    """The data hold nothing to average over: no batches, or (for a ``mean`` loss) only batches of
    weight 0, such as batches whose targets are all ``ignore_index``.

    Examples:
        >>> issubclass(EmptyDataError, ValueError)
        True
    """


#: ``normalizer(inputs, targets) -> float``: the denominator of a ``mean`` loss on one batch.
NormalizerFn = Callable[[Any, Any], float]  # (inputs, targets) -> a mean loss's denominator


def _is_inputs(x: Any) -> bool:
    if isinstance(x, (Tensor, Mapping)):
        return True
    return isinstance(x, (tuple, list)) and len(x) > 0 and all(isinstance(t, Tensor) for t in x)


def is_single_batch(data: Any) -> bool:
    """Whether ``data`` is one ``(inputs, targets)`` batch rather than an iterable of batches.

    ``inputs`` is a tensor, a tuple of tensors (positional arguments) or a dict (keyword
    arguments); ``targets`` is a tensor.

    Examples:
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

    def __len__(self) -> int:
        return 1


def as_batch_source(data: Any) -> Iterable[Any]:
    """Return a re-iterable source of raw batches for ``data`` (one batch or an iterable of batches).

    One-shot iterators (generators) are refused: every product iterates the data again.

    Examples:
        >>> x, y = torch.zeros(4, 3), torch.zeros(4)
        >>> len(list(as_batch_source((x, y))))
        1
    """
    if isinstance(data, BatchSource):
        return data.data
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
    """Number of samples in a batch: the leading dimension of the targets (else of the first input).

    Examples:
        >>> batch_size(torch.zeros(4, 3), torch.zeros(4))
        4
    """
    if isinstance(targets, Tensor) and targets.ndim > 0:
        return int(targets.shape[0])
    leaves = batch_tensors(inputs)
    if leaves and leaves[0].ndim > 0:
        return int(leaves[0].shape[0])
    raise ValueError("cannot tell the number of samples of a batch: targets and inputs have no batch dimension")


def batch_weight(inputs: Any, targets: Any, *, reduction: str, normalizer: NormalizerFn | None = None) -> float:
    """THE weight of one batch's curvature in the dataset's curvature (every consumer calls this).

    The dataset loss of a ``mean`` loss is ``sum_b w_b L_b / sum_b w_b``, where ``w_b`` is the
    denominator the loss divides by on batch ``b``: by default its number of samples
    (:func:`batch_size`); a loss with its own normalizer (valid targets under ``ignore_index``,
    the summed class weights of a weighted cross-entropy) passes it as
    ``normalizer(inputs, targets)``. For a ``sum`` loss the batch losses add, so ``w_b = 1``.

    Examples:
        >>> x, y = torch.zeros(5, 3), torch.zeros(5)
        >>> batch_weight(x, y, reduction="mean"), batch_weight(x, y, reduction="sum")
        (5.0, 1.0)
        >>> batch_weight(x, y, reduction="mean", normalizer=lambda x, y: 2.5)
        2.5
    """
    if reduction == "sum":
        return 1.0
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if normalizer is not None:
        return float(normalizer(inputs, targets))
    return float(batch_size(inputs, targets))


def _as_tree(obj: Any) -> Any:
    """``obj`` with a mapping that pytree does not know (Hugging Face's ``BatchEncoding``) as a dict."""
    if isinstance(obj, Mapping) and not isinstance(obj, dict):
        return dict(obj)
    return obj


def map_tensors(fn: Callable[..., Any], obj: Any, *others: Any) -> Any:
    """Apply ``fn`` to every tensor of a batch structure (tensors in tuples, lists, dicts, nested),
    leaving everything else as it is: THE walk over nested batches (``torch.utils._pytree``).

    With ``others`` (structures of the same shape), ``fn`` takes the matching tensors of all.

    Examples:
        >>> map_tensors(lambda t: t * 2, {"a": torch.ones(1), "n": 3})
        {'a': tensor([2.]), 'n': 3}
        >>> map_tensors(lambda a, b: a + b, (torch.ones(1),), (torch.ones(1),))
        (tensor([2.]),)
    """
    def apply(t: Any, *rest: Any) -> Any:
        return fn(t, *rest) if isinstance(t, Tensor) else t

    return pytree.tree_map(apply, _as_tree(obj), *(_as_tree(o) for o in others))


def move_to(obj: Any, device: torch.device) -> Any:
    """Move tensors (also inside tuples, lists and dicts) to ``device``.

    Examples:
        >>> move_to({"a": torch.ones(1)}, torch.device("cpu"))["a"].device.type
        'cpu'
    """
    return map_tensors(lambda t: t.to(device, non_blocking=True) if t.device != device else t, obj)


def call_model(model: nn.Module | Any, inputs: Any) -> Any:
    """Call ``model`` with a tensor, a tuple of tensors (positional) or a dict (keywords).

    Examples:
        >>> call_model(lambda a, b: a + b, (torch.ones(1), torch.ones(1))).item()
        2.0
    """
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def split_batch(batch: Any) -> tuple[Any, Any]:
    """Unpack one ``(inputs, targets)`` batch with a clear error for anything else.

    Examples:
        >>> split_batch((1, 2))
        (1, 2)
    """
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(
            f"each batch must be an (inputs, targets) pair, got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        )
    return batch[0], batch[1]


def slice_batch(obj: Any, index: slice) -> Any:
    """Take rows ``index`` (a slice of samples) of every tensor in ``obj`` (tensor, tuple, list, dict).

    Examples:
        >>> slice_batch((torch.arange(4), {"m": torch.arange(8).view(4, 2)}), slice(1, 3))[1]["m"].tolist()
        [[2, 3], [4, 5]]
    """
    return map_tensors(lambda t: t[index] if t.ndim > 0 else t, obj)


def batch_tensors(obj: Any) -> list[Tensor]:
    """All tensors of a batch structure, in a fixed order (for keys and fingerprints).

    Examples:
        >>> len(batch_tensors(({"a": torch.ones(1), "b": torch.ones(2)}, torch.ones(3))))
        3
    """
    return [t for t in pytree.tree_leaves(_as_tree(obj)) if isinstance(t, Tensor)]


@dataclass(frozen=True)
class Batch:
    """One batch as the operators see it.

    Attributes:
        index: position in the pass (0, 1, ...).
        inputs: the model inputs, on the source's device.
        targets: the targets, on the source's device.
        num_samples: :func:`batch_size` of the batch.
        weight: :func:`batch_weight` of the batch (its share of a ``mean`` loss before dividing by
            the pass total; ``1`` for ``sum``).
        raw: the batch as the data yielded it (before the device move), e.g. for cache keys.
    """

    index: int
    inputs: Any
    targets: Any
    num_samples: int
    weight: float
    raw: Any = None


class BatchSource:
    """Re-iterable batches of ``data`` with their weights, counts and device moves.

    Args:
        data: one ``(inputs, targets)`` batch or a re-iterable of batches (list, DataLoader);
            ``inputs`` may be a tensor, a tuple of tensors (positional) or a dict (keywords).
        reduction: ``"mean"`` or ``"sum"``, the loss's reduction (fixes :meth:`batch_weight`).
        device: where the yielded tensors go (``None``: left where they are).
        normalizer: ``normalizer(inputs, targets)``, a ``mean`` loss's own denominator per batch
            (default: the number of samples).

    :attr:`num_samples`, :attr:`num_batches` and :attr:`total_weight` are those of the last full
    pass (counted by a pass without device moves when asked before any).

    Examples:
        >>> x, y = torch.zeros(10, 3), torch.zeros(10)
        >>> src = BatchSource([(x[:6], y[:6]), (x[6:], y[6:])], reduction="mean")
        >>> [(b.index, b.num_samples, b.weight) for b in src]
        [(0, 6, 6.0), (1, 4, 4.0)]
        >>> src.num_samples, src.num_batches
        (10, 2)
        >>> [b.num_samples for b in src.minibatches(4)]
        [4, 2, 4]
    """

    def __init__(
        self,
        data: Any,
        *,
        reduction: str = "mean",
        device: torch.device | str | None = None,
        normalizer: NormalizerFn | None = None,
    ):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.is_single = isinstance(data, BatchSource) and data.is_single or is_single_batch(data)
        self.data = as_batch_source(data)
        self.reduction = reduction
        self.device = torch.device(device) if device is not None else None
        self.normalizer = normalizer
        self._counts: tuple[int, int, float] | None = None
        self._moved: Any = None  # a single batch, moved once

    def batch_weight(self, inputs: Any, targets: Any) -> float:
        """This source's :func:`batch_weight` of one batch (the one place a batch is weighted)."""
        return batch_weight(inputs, targets, reduction=self.reduction, normalizer=self.normalizer)

    def _move(self, inputs: Any, targets: Any) -> tuple[Any, Any]:
        if self.device is None:
            return inputs, targets
        if self.is_single:
            if self._moved is None:
                self._moved = (move_to(inputs, self.device), move_to(targets, self.device))
            return self._moved
        return move_to(inputs, self.device), move_to(targets, self.device)

    def __iter__(self) -> Iterator[Batch]:
        count = samples = 0
        total = 0.0
        for index, raw in enumerate(self.data):
            inputs, targets = split_batch(raw)
            n = batch_size(inputs, targets)
            w = self.batch_weight(inputs, targets)
            moved_inputs, moved_targets = self._move(inputs, targets)
            count, samples, total = count + 1, samples + n, total + w
            yield Batch(index, moved_inputs, moved_targets, n, w, raw)
        if count == 0:
            raise EmptyDataError("data is empty: it yielded no batches")
        self._counts = (count, samples, total)

    def _count(self) -> tuple[int, int, float]:
        if self._counts is None:
            count = samples = 0
            total = 0.0
            for raw in self.data:
                inputs, targets = split_batch(raw)
                count, samples = count + 1, samples + batch_size(inputs, targets)
                total += self.batch_weight(inputs, targets)
            if count == 0:
                raise EmptyDataError("data is empty: it yielded no batches")
            self._counts = (count, samples, total)
        return self._counts

    @property
    def num_batches(self) -> int:
        """Number of batches in one pass over the data."""
        return self._count()[0]

    @property
    def num_samples(self) -> int:
        """Number of samples in one pass over the data (sum of :func:`batch_size`)."""
        return self._count()[1]

    @property
    def total_weight(self) -> float:
        """Sum of the batch weights of one pass (the dataset normalizer of a ``mean`` loss)."""
        return self._count()[2]

    def minibatches(self, size: int) -> Iterator[Batch]:
        """The batches cut into consecutive pieces of at most ``size`` samples (weights recomputed).

        The pieces' indices count pieces, not source batches.
        """
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        index = 0
        for batch in self:
            for start in range(0, batch.num_samples, size):
                rows = slice(start, min(start + size, batch.num_samples))
                inputs, targets = slice_batch(batch.inputs, rows), slice_batch(batch.targets, rows)
                yield Batch(index, inputs, targets, rows.stop - rows.start, self.batch_weight(inputs, targets))
                index += 1
