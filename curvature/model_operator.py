"""Shared machinery of the dataset-level curvature operators (Hessian, GGN, Fisher, empirical Fisher)."""

from __future__ import annotations

import abc
import contextlib
import logging
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ._kernels import differentiable_kernels
from ._linalg import all_finite
from .blocks import make_blocks
from .compat import exact_weight_norm, unwrap_compiled
from .data import Batch, BatchSource, EmptyDataError, call_model, split_batch
from .graph_cache import DEFAULT_GRAPH_CACHE_BYTES, CacheEntry, GraphCache
from .graph_cache import measure_saved_bytes as _measure_saved_bytes  # noqa: F401 - hessian.py imports it here
from .linear_operator import LinearOperator
from .losses import LossInfo, LossNormalizer, check_outputs, describe_loss, lean_loss
from .outputs import OutputSelector, select_output
from .params import ParamSpec, select_parameters
from .precision import ComputeCopy
from .train_mode import check_mode, preserved_buffers

__all__ = ["ModelOperator", "DEFAULT_GRAPH_CACHE_BYTES"]


def _names_of(model: nn.Module, params: ParamSpec) -> ParamSpec:
    """Parameter tensors of ``model`` -> their names (to select them in a copy of the model)."""
    if params is None or callable(params) or isinstance(params, str):
        return params
    items = list(params)
    if items and all(isinstance(p, Tensor) for p in items):
        names = {id(p): n for n, p in model.named_parameters()}
        return [names.get(id(p), p) for p in items]
    return items

logger = logging.getLogger(__name__)

class FlatParts(list):
    """A batch product's per-parameter ``(k, *shape)`` results as views of ONE ``(k, d)`` tensor
    (``.flat``), so that turning them into the flat product costs no copy."""

    def __init__(self, flat: Tensor, blocks: Any):
        k = flat.shape[0]
        super().__init__(flat[:, b.slice].view(k, *b.shape) for b in blocks)
        self.flat = flat


class ModelOperator(LinearOperator):
    """Base class of curvature operators of ``loss_fn(model(inputs), targets)`` over a dataset.

    The matrix is the curvature of the loss over ALL samples of ``data``: with a ``mean``
    reduction each batch's product is weighted by its normalizer (its number of samples; see
    :func:`curvature.data.batch_weight`), so a short last batch gives the same answer as one big
    batch; with ``sum`` the batch products are added. :attr:`num_samples` and :attr:`num_batches`
    count one pass over the data.

    Options shared by all model operators (keyword-only):

    * ``params``: parameter names, tensors or a predicate ``(name, tensor) -> bool``; default all
      parameters that require grad. The flat vector follows the model's parameter order
      (:attr:`blocks`).
    * ``reduction``: ``"mean"`` or ``"sum"``, checked against the loss (a contradiction raises);
      or a callable ``(inputs, targets) -> Z``, the loss's normalizer per batch. Default: read
      off the loss (see :mod:`curvature.losses`: valid targets under ``ignore_index``, summed
      class weights, elements of an element-wise mean, a lambda's recorded reductions).
    * ``outputs``: ``outputs(model_output) -> tensor``, the tensor the loss takes; default the
      output itself or its ``.logits`` (Hugging Face models, dicts).
    * ``compute_dtype``: e.g. ``torch.float32`` for a bfloat16 model: products are computed on a
      copy of the model in that dtype (kept in sync before every product; one model's memory),
      with floating-point inputs cast to it; vectors are then in that dtype. Default: the
      model's dtype (see :mod:`curvature.precision` for the precision of half products).
    * ``probe_batch_size``: at most this many columns per batched pass (bounds memory).
    * ``cache_graph``: keep the autograd graphs of the data between products, so repeated
      products (Lanczos, Hutchinson probes) skip the forward (and, for the Hessian, the
      create-graph backward). ``None`` (default): cache a single batch always, and the batches of
      a data set while the graphs' saved tensors stay under ``graph_cache_bytes`` (1 GiB);
      ``True``: cache all; ``False``: never. A cached graph is used only while everything the
      product depends on is unchanged: every parameter and buffer of the model (selected or not;
      in-place updates, ``p.data = new`` and ``p.data.add_(...)`` alike, see
      :mod:`curvature._state`) and every module's train/eval mode; otherwise all graphs are
      rebuilt. Batches are recognised by content (by identity for a single batch), so a
      shuffling ``DataLoader`` gives the right answer: graphs of batches not drawn again are
      dropped at the end of each pass. Graphs are freed by :meth:`release` or on leaving a
      ``with`` block.
    * ``allow_train_mode``: analyse a model in train mode anyway (warns). Without it, any module
      in train mode whose code reads ``self.training`` (Dropout, BatchNorm, RReLU,
      ``F.dropout(x, p, self.training)``, ...) is refused, naming the module; BatchNorm running
      statistics are restored after each product in train mode.
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
        outputs: OutputSelector = None,
        compute_dtype: torch.dtype | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if outputs is not None and not callable(outputs):
            raise TypeError(f"outputs must be a callable model_output -> tensor, got {type(outputs).__name__}")
        model = unwrap_compiled(model)
        # compute_dtype: analyse a copy in that dtype, kept in sync with the model before each product.
        self._compute_copy = ComputeCopy(model, compute_dtype) if compute_dtype is not None else None
        if self._compute_copy is not None:
            params = _names_of(model, params)
            model = self._compute_copy.model
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if probe_batch_size is not None and (isinstance(probe_batch_size, bool) or int(probe_batch_size) < 1):
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
        self.probe_batch_size = int(probe_batch_size) if probe_batch_size is not None else None
        self.allow_train_mode = allow_train_mode
        self.check_finite = check_finite
        self.progress = progress
        self.outputs_fn = outputs
        self._loss_normalizer = LossNormalizer(self.loss_info, loss_fn, self.forward, device=self.device)
        self._source = BatchSource(
            data, reduction=self.loss_info.reduction, device=self.device, normalizer=self._batch_normalizer()
        )
        self._single_batch = self._source.is_single
        self._data = self._source.data
        # None: cache every graph of a single batch, and a data set's graphs up to the budget.
        self.cache_graph = True if (cache_graph is None and self._single_batch) else cache_graph
        self.graph_cache_bytes = int(graph_cache_bytes)
        self._graphs = GraphCache(
            self.model, mode=self.cache_graph, budget_bytes=self.graph_cache_bytes, by_content=not self._single_batch
        )
        self._check_mode()
        # A lambda does not say whether it sums or averages: read it off the first batch.
        self._loss_normalizer.strict = not self._single_batch
        if self.loss_info.kind == "generic":
            self._resolve_generic_loss()

    def _resolve_generic_loss(self) -> None:
        """Read a loss the toolkit does not recognise (a lambda) off the first batch that shows
        something: a batch of weight 0 (every target ignored) says nothing about the normalizer.
        Empty data resolves nothing here; the products raise :class:`~curvature.data.EmptyDataError`."""
        with self._preserved_buffers(), differentiable_kernels(), exact_weight_norm(self.model):
            for raw in self._source.data:
                self.loss_info = self._loss_normalizer.resolve(tuple(split_batch(raw)))
                if not self._loss_normalizer.awaiting_batch:
                    break
        self._source.reduction = self.loss_info.reduction

    def _batch_normalizer(self) -> Callable[[Any, Any], float] | None:
        """The loss's own per-batch normalizer for :func:`curvature.data.batch_weight`
        (:class:`curvature.losses.LossNormalizer`: valid targets, summed class weights, elements)."""
        return self._loss_normalizer

    # -- data ---------------------------------------------------------------------------------
    @property
    def batch_source(self) -> BatchSource:
        """The :class:`~curvature.data.BatchSource` the products iterate (weights, counts, device moves)."""
        return self._source

    @property
    def num_samples(self) -> int:
        """Number of samples in one pass over the data (counted by the last product, or by a pass
        over the data when asked before any)."""
        return self._source.num_samples

    @property
    def num_batches(self) -> int:
        """Number of batches in one pass over the data (counted like :attr:`num_samples`)."""
        return self._source.num_batches

    def batches(self) -> Iterator[tuple[int, Any, Any, int]]:
        """Yield ``(index, inputs, targets, num_samples)`` with tensors on the operator's device."""
        for batch in self._source:
            yield batch.index, batch.inputs, batch.targets, batch.num_samples

    def _pass_batches(self) -> Iterator[Batch]:
        """The batches of one product pass, registering their cache keys."""
        source: Any = self._source
        if self.progress:
            from tqdm.auto import tqdm

            source = tqdm(source, desc=type(self).__name__, leave=False)
        for batch in source:
            self._graphs.register(batch.index, batch.raw)
            yield batch

    def forward(self, inputs: Any) -> Any:
        """The model's outputs on ``inputs`` (the tensor the loss takes, see ``outputs=``)."""
        if self._compute_copy is not None:
            inputs = self._compute_copy.cast_inputs(inputs)
        return select_output(call_model(self.model, inputs), self.outputs_fn, who=type(self).__name__)

    def loss(self, inputs: Any, targets: Any, index: int = 0) -> Tensor:
        """The batch loss (checked to be a finite scalar)."""
        outputs = self.forward(inputs)
        check_outputs(self.loss_info, outputs, targets)
        return self._check_loss(self.loss_fn(outputs, targets), index)

    def second_order_loss(self, inputs: Any, targets: Any, index: int = 0) -> Tensor:
        """The batch loss for a double backward: :meth:`loss`, computed for a recognised
        cross-entropy by :func:`curvature.losses.lean_loss` (the same value, whose second
        derivative is applied in closed form, chunk by chunk, without the ``B x T x V``
        intermediates of a twice-differentiated ``log_softmax``)."""
        outputs = self.forward(inputs)
        check_outputs(self.loss_info, outputs, targets)
        if self.loss_info.kind == "cross_entropy" and isinstance(outputs, Tensor):
            normalizer = self._loss_normalizer.of_outputs(inputs, outputs.detach(), targets)
            lean = lean_loss(self.loss_info, outputs, targets, normalizer)
            if lean is not None:
                return self._check_loss(lean, index)
        return self._check_loss(self.loss_fn(outputs, targets), index)

    # -- graph cache (curvature.graph_cache) ----------------------------------------------------
    def release(self) -> None:
        """Free the cached autograd graphs (a later product rebuilds them)."""
        self._graphs.release()

    @property
    def cached_graph_bytes(self) -> int:
        """Bytes of tensors saved by the cached autograd graphs (an estimate of the memory they hold)."""
        return self._graphs.nbytes

    @property
    def _cache(self) -> Mapping[int, CacheEntry]:
        """The kept graphs by batch position (read-only; :class:`~curvature.graph_cache.GraphCache`)."""
        return self._graphs.entries

    def __enter__(self) -> ModelOperator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _cached(self, index: int, build: Callable[[], Any]) -> Any:
        """``build()`` for batch ``index`` of the pass in progress, through the graph cache."""
        self._graphs.mode = self.cache_graph  # the attribute may be switched between products
        return self._graphs.get_or_build(index, build)

    @contextlib.contextmanager
    def _product_pass(self) -> Iterator[None]:
        """One pass of products over the data (the graph cache's pass; buffers restored inside it)."""
        self._graphs.mode = self.cache_graph
        with self._graphs.product_pass(), self._preserved_buffers():
            yield

    # -- checks -------------------------------------------------------------------------------
    def _check_mode(self) -> None:
        check_mode(self.model, allow_train_mode=self.allow_train_mode, stacklevel=3)

    def _check_loss(self, loss: Any, index: int) -> Tensor:
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return a scalar, got {shape} on batch {index}; use reduction='mean' or 'sum'"
            )
        if self.check_finite and not torch.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss.item()} on batch {index}")
        return loss

    # -- products -----------------------------------------------------------------------------
    @abc.abstractmethod
    def _batch_product(self, index: int, inputs: Any, targets: Any, V: list[Tensor]) -> list[Tensor]:
        """Product of one batch's curvature with ``V`` given per parameter as ``(k, *shape)`` tensors.

        Implementations bound memory by processing :meth:`_column_chunks` at a time.
        """

    def _split(self, V: Tensor) -> list[Tensor]:
        Vt = V.T.contiguous()  # columns as rows (a no-op for probe blocks): strided grad_outputs are slow
        return [Vt[:, b.slice].reshape(V.shape[1], *b.shape) for b in self.blocks]

    def _column_chunks(self, k: int) -> Iterator[slice]:
        """Slices of at most ``probe_batch_size`` columns (all ``k`` when unset)."""
        step = self.probe_batch_size or k
        for start in range(0, k, step):
            yield slice(start, min(start + step, k))

    def _matmat(self, V: Tensor) -> Tensor:
        if self._compute_copy is not None:
            self._compute_copy.sync()
        self._check_mode()
        self._loss_normalizer.check_declaration()
        k = V.shape[1]
        V_list = self._split(V)
        mean = self.loss_info.reduction == "mean"
        with self._product_pass(), differentiable_kernels(), exact_weight_norm(self.model):
            first: tuple[list[Tensor], float] | None = None
            total: Tensor | None = None
            weights = 0.0
            for batch in self._pass_batches():
                weight = batch.weight
                if mean and weight == 0:
                    continue  # every target ignored: the batch is no part of the mean (its loss is 0/0)
                parts = self._batch_product(batch.index, batch.inputs, batch.targets, V_list)
                weights += weight
                if first is None:  # kept unscaled: one batch needs no weighting at all
                    first = (parts, weight)
                    continue
                if total is None:
                    total = self._flat(first[0], k)
                    total.mul_(first[1])
                for block, part in zip(self.blocks, parts):
                    total[:, block.slice].add_(part.reshape(k, -1), alpha=weight)
            if first is None:  # the batch source raises on no batches at all
                raise EmptyDataError(
                    f"{type(self).__name__}: every batch of the data has weight 0 (the loss's normalizer: e.g. "
                    "all targets are ignore_index), so the mean loss over the data is undefined"
                )
            if total is None:
                total = self._flat(first[0], k)
            elif mean:
                total /= weights
            # One check per product; the batch is located only when it fails.
            if self.check_finite and not all_finite(total):
                self._raise_non_finite(V_list)
        return total.T

    def _flat(self, parts: list[Tensor], k: int) -> Tensor:
        """Per-parameter ``(k, *shape)`` results as one ``(k, d)`` tensor (one copy, none for
        :class:`FlatParts`)."""
        if isinstance(parts, FlatParts):
            return parts.flat
        return torch.cat([p.reshape(k, -1) for p in parts], dim=1)

    def _raise_non_finite(self, V_list: list[Tensor]) -> None:
        for batch in self._pass_batches():
            if self.loss_info.reduction == "mean" and batch.weight == 0:
                continue
            parts = self._batch_product(batch.index, batch.inputs, batch.targets, V_list)
            if not all(torch.isfinite(p).all() for p in parts):
                raise FloatingPointError(f"{type(self).__name__} product is not finite on batch {batch.index}")
        raise FloatingPointError(f"{type(self).__name__} product is not finite (it overflowed when summing batches)")

    def _preserved_buffers(self) -> contextlib.AbstractContextManager[None]:
        """Restore buffers (BatchNorm running statistics in train mode) after the products."""
        return preserved_buffers(self.model, allow_train_mode=self.allow_train_mode)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(d={self.shape[0]}, params={len(self.params)}, loss={self.loss_info.kind}/"
            f"{self.loss_info.reduction}, dtype={self.dtype}, device={self.device})"
        )
