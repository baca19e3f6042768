"""The autograd-graph cache of the model operators: keep each batch's first-order graph between
products, so repeated products (Lanczos, Hutchinson probes) pay only the second backward, as
PyHessian does for one batch.

A kept graph is reused only while everything the product depends on is unchanged:

* the batch: a key per batch position, by identity for a single batch and by content for a data
  set (so a shuffling ``DataLoader`` that puts another batch at a position rebuilds it), see
  :func:`curvature._state.batch_key`;
* the model: every parameter and buffer (selected or not; in-place updates, ``p.data = new``
  alike) and every module's train/eval mode, see :func:`curvature._state.capture_state`; any
  change releases every graph;
* the pass: graphs of batches not met again in a pass are dropped at its end.

Memory: ``mode=None`` keeps graphs while the bytes of the tensors they save stay under
``budget_bytes`` (measured with saved-tensor hooks, the model's own parameters and buffers left
out); ``True`` keeps all; ``False`` none.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ._state import BatchKey, ModelState, batch_key, capture_state, state_structure
from .data import batch_tensors

__all__ = ["DEFAULT_GRAPH_CACHE_BYTES", "GraphCache", "CacheEntry", "measure_saved_bytes"]

logger = logging.getLogger(__name__)

#: Default memory budget for cached graphs when the data has several batches.
DEFAULT_GRAPH_CACHE_BYTES = 1 << 30


def measure_saved_bytes(build: Callable[[], Any], exclude: set[int]) -> tuple[Any, int]:
    """Run ``build()`` and count the bytes of the distinct tensors its autograd graph saves,
    leaving out storages whose data pointers are in ``exclude`` (the model's own parameters and buffers).

    Examples:
        >>> w = torch.ones(3, requires_grad=True)
        >>> _, size = measure_saved_bytes(lambda: torch.tanh(w).sum(), set())
        >>> size  # tanh saves its output: 3 float32
        12
    """
    seen: dict[int, tuple[int, list[weakref.ref[Tensor]]]] = {}

    def pack(t: Tensor) -> Tensor:
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            seen.setdefault(ptr, (storage.nbytes(), []))[1].append(weakref.ref(t))
        except (RuntimeError, NotImplementedError, TypeError):  # tensors without storage (functorch wrappers)
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = build()
    # Only what is still alive: graphs built and freed inside build() (a forward-mode tangent's) hold nothing.
    return value, sum(
        size for ptr, (size, refs) in seen.items() if ptr not in exclude and any(r() is not None for r in refs)
    )


def _own_storages(model: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}


@dataclass
class CacheEntry:
    """One kept graph: the batch's key, what ``build()`` returned, the bytes its graph saves."""

    key: BatchKey
    value: Any
    nbytes: int


class GraphCache:
    """Graphs of the batches of a data set, kept across product passes (see the module docs).

    Args:
        model: the model the graphs are built on (its state decides when they are stale).
        mode: ``None`` (budgeted), ``True`` (keep all) or ``False`` (keep none).
        budget_bytes: the budget of ``mode=None``.
        by_content: key batches by content (several batches) or identity (one batch).

    Use: wrap each product pass in :meth:`product_pass`, call :meth:`register` for each batch
    the pass meets, and :meth:`get_or_build` to obtain a batch's graph.

    Examples:
        >>> model = nn.Linear(2, 1)
        >>> cache = GraphCache(model, mode=True, by_content=True)
        >>> x = torch.ones(4, 2)
        >>> with cache.product_pass():
        ...     cache.register(0, (x,))
        ...     a = cache.get_or_build(0, lambda: model(x).sum())
        >>> with cache.product_pass():
        ...     cache.register(0, (x,))
        ...     b = cache.get_or_build(0, lambda: model(x).sum())
        >>> a is b, len(cache)
        (True, 1)
    """

    def __init__(
        self, model: nn.Module, *, mode: bool | None, budget_bytes: int = DEFAULT_GRAPH_CACHE_BYTES, by_content: bool
    ):
        self.model = model
        self.mode = mode
        self.budget_bytes = int(budget_bytes)
        self.by_content = by_content
        self._entries: dict[int, CacheEntry] = {}
        self._bytes = 0
        self._state: ModelState | None = None  # the model state the kept graphs belong to
        self._pass_keys: dict[int, BatchKey] = {}  # keys of the batches of the pass in progress
        self._pass_seen: set[int] = set()

    # -- inspection ------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        """Whether graphs may be kept at all (``mode`` is not ``False``)."""
        return self.mode is not False

    @property
    def nbytes(self) -> int:
        """Bytes of tensors saved by the kept graphs (an estimate of the memory they hold)."""
        return self._bytes

    @property
    def entries(self) -> Mapping[int, CacheEntry]:
        """The kept entries by batch position (read-only view)."""
        return MappingProxyType(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    # -- use -------------------------------------------------------------------------------------
    def release(self) -> None:
        """Free every kept graph (a later product rebuilds them)."""
        self._entries.clear()
        self._bytes = 0
        self._state = None

    def register(self, index: int, raw: Any) -> None:
        """Record the key of the batch the pass in progress meets at position ``index``."""
        if self.enabled:
            self._pass_keys[index] = batch_key(batch_tensors(raw), by_content=self.by_content)

    def _drop(self, index: int) -> None:
        entry = self._entries.pop(index, None)
        if entry is not None:
            self._bytes -= entry.nbytes

    def will_keep(self, index: int) -> bool:
        """Whether a graph built now for batch ``index`` would be kept (:meth:`get_or_build`)."""
        if not self.enabled or index not in self._pass_keys:
            return False
        entry = self._entries.get(index)  # a stale one is dropped before the budget is checked
        return self.mode is not None or self._bytes - (entry.nbytes if entry else 0) < self.budget_bytes

    def get_or_build(self, index: int, build: Callable[[], Any]) -> Any:
        """``build()`` for batch ``index`` of the pass in progress, kept while the mode and budget
        allow; a kept graph is reused only for the very same batch. Outside a pass (no key
        registered for ``index``) nothing is kept."""
        if not self.enabled:
            return build()
        key = self._pass_keys.get(index)
        if key is None:
            return build()
        entry = self._entries.get(index)
        if entry is not None:
            if entry.key.matches(key):
                self._pass_seen.add(index)
                return entry.value
            self._drop(index)  # another batch at this position (a shuffling loader)
        if not self.will_keep(index):  # the one rule, also asked by builders that choose what to keep
            return build()
        value, size = measure_saved_bytes(build, _own_storages(self.model))
        self._entries[index] = CacheEntry(key, value, size)
        self._bytes += size
        self._pass_seen.add(index)
        return value

    @contextlib.contextmanager
    def product_pass(self) -> Iterator[None]:
        """One pass of products over the data: release stale graphs first; afterwards drop the
        graphs of batches not met again and record the state the remaining graphs belong to."""
        if not self.enabled:
            yield
            return
        state = capture_state(self.model)
        if self._entries and not state.matches(self._state):
            logger.debug("the model changed; rebuilding its cached graphs")
            self.release()
        self._pass_keys, self._pass_seen = {}, set()
        completed = False
        try:
            yield
            completed = True
        finally:
            if completed:
                for index in [i for i in self._entries if i not in self._pass_seen]:
                    self._drop(index)
            self._pass_keys = {}
            if self._entries:
                # Train-mode forwards bump buffer versions (values restored by the caller): re-capture.
                same = state_structure(self.model) == state.structure
                self._state = state if same else capture_state(self.model)
