"""Shared machinery of the dataset-level curvature operators (Hessian, GGN, Fisher, empirical Fisher)."""

from __future__ import annotations

import abc
import contextlib
import logging
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from .blocks import make_blocks
from .data import as_batch_source, batch_size, call_model, is_single_batch, move_to, split_batch
from .linear_operator import LinearOperator
from .losses import LossInfo, describe_loss
from .params import ParamSpec, select_parameters

__all__ = ["ModelOperator"]

logger = logging.getLogger(__name__)

_STOCHASTIC_LAYERS = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


@contextlib.contextmanager
def _differentiable_kernels() -> Iterator[None]:
    """Use reference attention kernels: the fused ones (SDPA flash/efficient kernels, the
    ``nn.MultiheadAttention``/``TransformerEncoderLayer`` inference fast path) lack forward-AD and
    double-backward formulas."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


#: Default memory budget for cached graphs when the data has several batches.
DEFAULT_GRAPH_CACHE_BYTES = 1 << 30


def _measure_saved_bytes(build: Callable[[], Any], exclude: set[int]) -> tuple[Any, int]:
    """Run ``build()`` and count the bytes of the distinct tensors its autograd graph saves,
    leaving out storages in ``exclude`` (the model's own parameters and buffers)."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (functorch wrappers)
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = build()
    return value, sum(size for ptr, size in seen.items() if ptr not in exclude)


class ModelOperator(LinearOperator):
    """Base class of curvature operators of ``loss_fn(model(inputs), targets)`` over a dataset.

    The matrix is the curvature of the loss over ALL samples of ``data``: with a ``mean``
    reduction each batch's product is weighted by its number of samples (so a short last batch
    gives the same answer as one big batch); with ``sum`` the batch products are added.

    Options shared by all model operators (keyword-only):

    * ``params``: parameter names, tensors or a predicate ``(name, tensor) -> bool``; default all
      parameters that require grad. The flat vector follows the model's parameter order
      (:attr:`blocks`).
    * ``reduction``: ``"mean"`` or ``"sum"``; default ``loss_fn.reduction`` (else ``"mean"``).
    * ``probe_batch_size``: at most this many columns per batched pass (bounds memory).
    * ``cache_graph``: keep the autograd graphs of the data between products, so repeated
      products (Lanczos, Hutchinson probes) skip the forward (and, for the Hessian, the
      create-graph backward). ``None`` (default): cache a single batch always, and the batches of
      a data set while the graphs' saved tensors stay under ``graph_cache_bytes`` (1 GiB);
      ``True``: cache all; ``False``: never. Cached graphs are rebuilt when a parameter changes
      in place and are freed by :meth:`release` or on leaving a ``with`` block. Data must yield
      the same batches in the same order on every pass (no shuffling), as for any operator.
    * ``allow_train_mode``: analyse a model in train mode with Dropout/BatchNorm anyway (warns;
      BatchNorm running statistics are restored after each product).
    * ``check_finite``: raise on a NaN/inf loss or product, naming the batch (default on).
    * ``progress``: a tqdm bar over the batches of each product.

    Subclasses implement :meth:`_batch_product`, the product for one batch's loss.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        data: Any,
        *,
        params: ParamSpec = None,
        reduction: str | None = None,
        probe_batch_size: int | None = None,
        cache_graph: bool | None = None,
        graph_cache_bytes: int = DEFAULT_GRAPH_CACHE_BYTES,
        allow_train_mode: bool = False,
        check_finite: bool = True,
        progress: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if probe_batch_size is not None and probe_batch_size < 1:
            raise ValueError(f"probe_batch_size must be a positive integer, got {probe_batch_size}")
        names, tensors = select_parameters(model, params)
        p0 = tensors[0]
        super().__init__(
            sum(p.numel() for p in tensors), p0.dtype, p0.device, make_blocks(names, [p.shape for p in tensors])
        )
        self.model = model
        self.loss_fn = loss_fn
        self.loss_info: LossInfo = describe_loss(loss_fn, reduction)
        self.param_names = names
        self.params = tensors
        self.probe_batch_size = probe_batch_size
        self.allow_train_mode = allow_train_mode
        self.check_finite = check_finite
        self.progress = progress
        self._single_batch = is_single_batch(data)
        self._data = as_batch_source(data)
        # None: cache every graph of a single batch, and a data set's graphs up to the budget.
        self.cache_graph = True if (cache_graph is None and self._single_batch) else cache_graph
        self.graph_cache_bytes = int(graph_cache_bytes)
        self._cache: dict[int, tuple[tuple[int, ...], Any]] = {}
        self._cache_bytes = 0
        self._check_mode()

    # -- graph cache ----------------------------------------------------------------------------
    def release(self) -> None:
        """Free the cached autograd graphs (a later product rebuilds them)."""
        self._cache.clear()
        self._cache_bytes = 0

    @property
    def cached_graph_bytes(self) -> int:
        """Bytes of tensors saved by the cached autograd graphs (an estimate of the memory they hold)."""
        return self._cache_bytes

    def __enter__(self) -> ModelOperator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _cached(self, index: int, build: Callable[[], Any]) -> Any:
        """``build()`` for batch ``index``, kept while caching is on, the budget allows, and no parameter changed."""
        if self.cache_graph is False:
            return build()
        versions = tuple(p._version for p in self.params)
        hit = self._cache.get(index)
        if hit is not None and hit[0] == versions:
            return hit[1]
        if hit is not None:  # parameters changed in place: every cached graph is stale
            self.release()
        if self.cache_graph is None and self._cache_bytes >= self.graph_cache_bytes:
            return build()
        own = {t.untyped_storage().data_ptr() for t in (*self.model.parameters(), *self.model.buffers())}
        value, size = _measure_saved_bytes(build, own)
        self._cache[index] = (versions, value)
        self._cache_bytes += size
        return value

    # -- checks -------------------------------------------------------------------------------
    def _check_mode(self) -> None:
        offenders = [
            name or type(m).__name__
            for name, m in self.model.named_modules()
            if isinstance(m, _STOCHASTIC_LAYERS) and m.training
        ]
        if not offenders:
            return
        message = (
            f"the model is in train mode with Dropout/BatchNorm layers ({', '.join(offenders[:4])}"
            f"{', ...' if len(offenders) > 4 else ''}), so curvature products would not be deterministic; "
            "call model.eval() first"
        )
        if not self.allow_train_mode:
            raise RuntimeError(message + ", or pass allow_train_mode=True to analyse train mode deliberately")
        warnings.warn(message + " (allow_train_mode=True: going ahead)", stacklevel=3)

    def _check_loss(self, loss: Any, index: int) -> Tensor:
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return a scalar, got {shape} on batch {index}; use reduction='mean' or 'sum'"
            )
        if self.check_finite and not torch.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss.item()} on batch {index}")
        return loss

    # -- data ---------------------------------------------------------------------------------
    def batches(self) -> Iterator[tuple[int, Any, Any, int]]:
        """Yield ``(index, inputs, targets, num_samples)`` with tensors on the operator's device."""
        count = 0
        source = self._data
        if self.progress:
            from tqdm.auto import tqdm

            source = tqdm(source, desc=type(self).__name__, leave=False)
        for index, batch in enumerate(source):
            inputs, targets = split_batch(batch)
            inputs, targets = move_to(inputs, self.device), move_to(targets, self.device)
            count += 1
            yield index, inputs, targets, batch_size(inputs, targets)
        if count == 0:
            raise ValueError("data is empty: it yielded no batches")

    def forward(self, inputs: Any) -> Any:
        """The model's outputs on ``inputs``."""
        return call_model(self.model, inputs)

    def loss(self, inputs: Any, targets: Any, index: int = 0) -> Tensor:
        """The batch loss (checked to be a finite scalar)."""
        return self._check_loss(self.loss_fn(self.forward(inputs), targets), index)

    # -- products -----------------------------------------------------------------------------
    @abc.abstractmethod
    def _batch_product(self, index: int, inputs: Any, targets: Any, V: list[Tensor]) -> list[Tensor]:
        """Product of one batch's curvature with ``V`` given per parameter as ``(k, *shape)`` tensors.

        Implementations bound memory by processing :meth:`_column_chunks` at a time.
        """

    def _split(self, V: Tensor) -> list[Tensor]:
        Vt = V.T.contiguous()  # columns as contiguous rows: strided grad_outputs slow down every kernel
        return [Vt[:, b.slice].reshape(V.shape[1], *b.shape) for b in self.blocks]

    def _column_chunks(self, k: int) -> Iterator[slice]:
        """Slices of at most ``probe_batch_size`` columns (all ``k`` when unset)."""
        step = self.probe_batch_size or k
        for start in range(0, k, step):
            yield slice(start, min(start + step, k))

    def _matmat(self, V: Tensor) -> Tensor:
        self._check_mode()
        k = V.shape[1]
        V_list = self._split(V)
        total = torch.empty(k, self.shape[0], dtype=self.dtype, device=self.device)
        num_samples = 0
        with self._preserved_state(), _differentiable_kernels():
            for index, inputs, targets, n in self.batches():
                weight = n if self.loss_info.reduction == "mean" else 1
                parts = self._batch_product(index, inputs, targets, V_list)
                for block, part in zip(self.blocks, parts):
                    dest = total[:, block.slice]
                    if num_samples == 0:
                        torch.mul(part.reshape(k, -1), weight, out=dest)
                    else:
                        dest.add_(part.reshape(k, -1), alpha=weight)
                num_samples += n
            if self.loss_info.reduction == "mean":
                total /= num_samples
            # One check per product; the batch is located only when it fails.
            if self.check_finite and not torch.isfinite(total).all():
                self._raise_non_finite(V_list)
        return total.T

    def _raise_non_finite(self, V_list: list[Tensor]) -> None:
        for index, inputs, targets, _ in self.batches():
            parts = self._batch_product(index, inputs, targets, V_list)
            if not all(torch.isfinite(p).all() for p in parts):
                raise FloatingPointError(f"{type(self).__name__} product is not finite on batch {index}")
        raise FloatingPointError(f"{type(self).__name__} product is not finite (it overflowed when summing batches)")

    @contextlib.contextmanager
    def _preserved_state(self) -> Iterator[None]:
        """Restore buffers (BatchNorm running statistics in train mode) after the products."""
        saved = None
        if self.allow_train_mode and self.model.training:
            saved = {name: b.detach().clone() for name, b in self.model.named_buffers()}
        try:
            yield
        finally:
            if saved is not None:
                with torch.no_grad():
                    for name, b in self.model.named_buffers():
                        b.copy_(saved[name])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(d={self.shape[0]}, params={len(self.params)}, loss={self.loss_info.kind}/"
            f"{self.loss_info.reduction}, dtype={self.dtype}, device={self.device})"
        )
