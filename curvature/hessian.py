"""The Hessian of the loss over a dataset, applied to blocks of vectors."""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .backends import SelectsBackend
from .finite_difference import (
    NoDoubleBackwardError,
    central_difference_products,
    check_double_backward,
    lacks_double_backward,
)
from .functional import with_parameters
from .model_operator import FlatParts, ModelOperator, _measure_saved_bytes

__all__ = ["Hessian"]

logger = logging.getLogger(__name__)

#: Estimated extra memory per column of the batched backends, in units of the bytes the
#: first-order graph saves (the second backward's intermediates are activation-sized per column;
#: forward-over-reverse also carries tangents and its own graph).
BYTES_PER_COLUMN_FACTOR = {"vmap": 1.0, "forward_over_reverse": 2.0}

_LOOP = "loop"


class Hessian(SelectsBackend, ModelOperator):
    """Hessian of the loss of ``model`` over ``data`` with respect to the selected parameters.

    ``H @ V`` for a ``(d, k)`` block shares one forward and one create-graph backward per data
    batch among all ``k`` columns; only the second backward is paid per column.

    Args:
        model: the network, analysed as it is (call ``model.eval()`` first).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, e.g. ``nn.CrossEntropyLoss()``.
        data: one ``(inputs, targets)`` batch or a re-iterable of batches (a DataLoader);
            ``inputs`` may be a tensor, a tuple of tensors (positional) or a dict (keywords).
        backend: ``"loop"`` (one second backward per column through the shared graph: the least
            memory, and each column bitwise equal to its single product), ``"vmap"`` (the second
            backward vmapped over columns), ``"forward_over_reverse"`` (``vmap(jvp(grad))``),
            ``"finite_difference"`` (central differences of gradients, for models without a
            double backward; approximate, see :mod:`curvature.finite_difference`), or ``"auto"``
            (default): the one policy of all operators, :mod:`curvature.backends` (single columns
            use the loop; for ``k`` columns the choice recorded for (operator, model structure,
            device, ``k``) is used, and when there is none the exact backends that fit
            ``memory_budget`` are timed on the first (at most 8) columns, in 3 interleaved
            rounds; a batched one is kept only if its median time per column beats the loop's by
            more than 10%, and the choice is re-timed on the next 2 products; never
            ``"finite_difference"``). Read it with :meth:`backend_choice`, pin it with
            :func:`curvature.backends.pin`. An exact backend that meets an operation without a
            double backward raises :class:`~curvature.finite_difference.NoDoubleBackwardError`.
        deterministic: with ``backend="auto"``, use the fixed rule (the loop for every ``k``)
            instead of timings, so which code runs, and the result, is the same on every run
            (bitwise, on the CPU; on CUDA also set ``torch.use_deterministic_algorithms``).
        memory_budget: bytes the columns of a vmapped pass may take; ``None``: measured when
            needed, :func:`curvature._memory.default_memory_budget` (a quarter of the free memory
            on CUDA; on the CPU 10% of the process's resident memory, at least 64 MiB). The
            memory per column is estimated from the bytes the batch's first-order graph saves
            (measured on CUDA during the trials); with ``probe_batch_size=None`` a vmapped pass
            takes ``memory_budget // bytes_per_column`` columns at a time, and an out-of-memory
            error falls back to the loop.
        **options: ``params``, ``reduction``, ``probe_batch_size``, ``cache_graph``,
            ``graph_cache_bytes``, ``allow_train_mode``, ``check_finite``, ``progress``; see
            :class:`~curvature.model_operator.ModelOperator`. With the default graph cache, a
            single batch's create-graph backward is kept (about one to two times the activation
            memory), as PyHessian does, so repeated products pay only the second backward; the
            peak of a product is then that graph plus one column's second backward (loop) or
            plus ``memory_budget`` at most (batched backends).

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> H = Hessian(model, nn.CrossEntropyLoss(), (x, y))
        >>> H.shape, (H @ torch.ones(H.shape[0])).shape
        ((26, 26), torch.Size([26]))
        >>> Hd = Hessian(model, nn.CrossEntropyLoss(), (x, y), deterministic=True)
        >>> V = torch.ones(26, 4)
        >>> bool(torch.equal(Hd @ V, Hd @ V)), Hd.backend_choice(4).backend
        (True, 'loop')
    """

    #: The backends this operator implements (see :mod:`curvature.backends`).
    backends = ("loop", "vmap", "forward_over_reverse", "finite_difference")

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        data: Any,
        *,
        backend: str = "auto",
        deterministic: bool = False,
        memory_budget: int | None = None,
        **options: Any,
    ):
        self._init_selector(
            super().__init__, model, loss_fn, data, backend=backend, deterministic=deterministic,
            memory_budget=memory_budget, options=options,
        )
        self._graph_bytes = 0  # the most bytes a batch's first-order graph saved (memory estimates)
        # Forward-over-reverse: None until checked against the double backward on a first product.
        self._forward_ok: bool | None = None

    def _bytes_per_column(self, backend: str) -> int:
        return int(BYTES_PER_COLUMN_FACTOR.get(backend, 0.0) * self._graph_bytes)

    def gradient_graph(self, index: int, inputs: Any, targets: Any) -> list[Tensor]:
        """The batch loss's gradient per parameter, with its graph (zeros for unused parameters)."""

        def build() -> list[Tensor]:
            with torch.enable_grad():
                loss = self.second_order_loss(inputs, targets, index)
                check_double_backward(loss, "Hessian")
                return list(
                    torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True, materialize_grads=True)
                )

        return self._cached(index, build)

    def _measured_gradient_graph(self, index: int, inputs: Any, targets: Any) -> list[Tensor]:
        """:meth:`gradient_graph`, recording the bytes the graph saves the first time (memory estimates)."""
        if self._graph_bytes:
            return self.gradient_graph(index, inputs, targets)
        own = {t.untyped_storage().data_ptr() for t in (*self.model.parameters(), *self.model.buffers())}
        grads, size = _measure_saved_bytes(lambda: self.gradient_graph(index, inputs, targets), own)
        entry = self._cache.get(index)
        self._graph_bytes = max(size, entry.nbytes if entry is not None else 0)
        return grads

    def _estimate_graph_bytes(self, index: int, inputs: Any, targets: Any) -> None:
        """Measure the bytes a first-order graph saves without keeping it (forward-over-reverse
        needs no such graph, only the memory estimate)."""
        own = {t.untyped_storage().data_ptr() for t in (*self.model.parameters(), *self.model.buffers())}

        def build() -> None:
            with torch.enable_grad():
                loss = self.loss(inputs, targets, index)
                torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)

        self._graph_bytes = _measure_saved_bytes(build, own)[1]

    # -- products -------------------------------------------------------------------------------
    def _batch_product(self, index: int, inputs: Any, targets: Any, V: list[Tensor]) -> list[Tensor]:
        key = self.backend_key(V[0].shape[0])
        choice = self._selector.choice(key)
        # The first-order graph is built (and its bytes measured) outside any timing.
        grads: list[Tensor] | None = None
        backend = choice.backend if choice is not None else None
        if backend in (None, "vmap"):
            grads = self._measured_gradient_graph(index, inputs, targets)
        elif backend == "forward_over_reverse" and choice is not None:
            if not self._graph_bytes and choice.columns is None and self.probe_batch_size is None:
                self._estimate_graph_bytes(index, inputs, targets)

        def run(backend: str, W: list[Tensor], columns: int | None) -> list[Tensor]:
            return self._product_with(backend, index, inputs, targets, W, grads, columns)

        try:
            return self._selector.product(key, self.device, V, run, self._bytes_per_column, first_batch=index == 0)
        except (RuntimeError, NotImplementedError) as exc:
            if lacks_double_backward(exc) and not isinstance(exc, NoDoubleBackwardError):
                raise NoDoubleBackwardError(
                    f"the Hessian's exact backends differentiate the model's backward, and the model has an "
                    f"operation without a double backward ({exc}); backend='finite_difference' computes the "
                    "products from gradients alone (central differences, see docs/finite_difference.md)"
                ) from exc
            raise

    def _product_with(
        self, backend: str, index: int, inputs: Any, targets: Any, V: list[Tensor],
        grads: list[Tensor] | None = None, columns: int | None = None,
    ) -> list[Tensor]:
        if backend == "finite_difference":
            return central_difference_products(self._gradient_at(index, inputs, targets), self.params, V)
        if backend == "forward_over_reverse":
            if self._forward_ok is not False:
                res = self._checked_forward_over_reverse(index, inputs, targets, V, columns)
                if res is not None:
                    return res
            backend, grads = _LOOP, None
        if grads is None:
            grads = self.gradient_graph(index, inputs, targets)
        # Gradients that do not depend on the parameters (unused or linear ones) contribute nothing.
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        if not live:
            return [torch.zeros_like(v) for v in V]
        outputs = [grads[i] for i in live]
        if backend == "vmap":
            return self._vmapped_second_backward(outputs, live, V, columns)
        return self._looped_second_backward(outputs, live, V)

    def _looped_second_backward(self, outputs: list[Tensor], live: list[int], V: list[Tensor]) -> list[Tensor]:
        """``d(grad . v)/d params`` per column: one backward per column through the shared graph."""
        k = V[0].shape[0]
        # Each column is written once into the (k, d) result; the per-parameter views need no
        # stacking and the product needs no concatenation (two full copies fewer per block).
        flat = torch.empty(k, self.shape[0], dtype=self.dtype, device=self.device)
        with torch.enable_grad():
            for c in range(k):
                # No materialize_grads: it costs a pass over every gradient; unused ones get zeros.
                rs = torch.autograd.grad(outputs, self.params, [V[i][c] for i in live], retain_graph=True,
                                         allow_unused=True)
                for r, block in zip(rs, self.blocks):
                    if r is None:
                        flat[c, block.slice].zero_()
                    else:
                        flat[c, block.slice].copy_(r.reshape(-1))
        return FlatParts(flat, self.blocks)

    def _vmapped_second_backward(
        self, outputs: list[Tensor], live: list[int], V: list[Tensor], columns: int | None
    ) -> list[Tensor]:
        k = V[0].shape[0]
        step = columns or self.probe_batch_size or k
        if step == 1:  # one column per pass is the loop, without vmap's overhead
            return self._looped_second_backward(outputs, live, V)
        chunks = []
        with torch.enable_grad():
            for start in range(0, k, step):
                cols = slice(start, min(start + step, k))
                res = torch.autograd.grad(
                    outputs, self.params, [V[i][cols] for i in live],
                    retain_graph=True, is_grads_batched=True, allow_unused=True, materialize_grads=True,
                )
                chunks.append((cols, res))
        # materialize_grads gives unbatched zeros for parameters the loss does not use.
        chunks = [
            [r if r.shape == v[cols].shape else r.expand_as(v[cols]) for r, v in zip(rs, V)]
            for cols, rs in chunks
        ]
        if len(chunks) == 1:
            return chunks[0]
        return [torch.cat(rs) for rs in zip(*chunks)]

    def _checked_forward_over_reverse(
        self, index: int, inputs: Any, targets: Any, V: list[Tensor], columns: int | None
    ) -> list[Tensor] | None:
        """Forward-over-reverse where it is the Hessian the user's ``loss.backward()`` sees; ``None``
        (explicit ``backend="forward_over_reverse"``: use the double backward) where it is not.

        Two PyTorch gaps: ops without forward-AD formulas (``huber_loss``'s backward, ``mse_loss``'s
        zero tangents) raise, and forward-mode AD differentiates through ``torch.no_grad()``
        regions that reverse mode treats as constants. The first is caught (info log), the second
        detected on the first product by comparing one column with the double backward (warning).
        Under ``"auto"`` both raise, so the measurement leaves the strategy out.
        """
        explicit = self.backend == "forward_over_reverse"
        try:
            res = self._forward_over_reverse(index, inputs, targets, V, columns)
        except (RuntimeError, NotImplementedError) as exc:
            if not explicit:
                raise
            logger.info("Hessian: forward-over-reverse unavailable for this model/loss (%s); using "
                        "reverse-over-reverse (the double backward)", exc)
            self._forward_ok = False
            return None
        if self._forward_ok is None:
            ref = self._product_with(_LOOP, index, inputs, targets, [v[:1] for v in V])
            num = sum(float((r[0] - q[0]).double().norm()) ** 2 for r, q in zip(res, ref)) ** 0.5
            den = sum(float(q[0].double().norm()) ** 2 for q in ref) ** 0.5
            self._forward_ok = num <= 100 * torch.finfo(self.dtype).eps ** 0.5 * den
            if not self._forward_ok:
                message = (
                    f"Hessian: forward-over-reverse disagrees with the double backward (relative difference "
                    f"{num / max(den, 1e-300):.2g}), typically because the model computes part of itself under "
                    "torch.no_grad(), which forward-mode AD differentiates through"
                )
                if not explicit:
                    raise RuntimeError(message)
                warnings.warn(message + "; using the double backward, the Hessian of loss.backward()", stacklevel=5)
                return None
        return res

    def _loss_at(self, index: int, inputs: Any, targets: Any) -> Callable[..., Tensor]:
        """``f(*params) -> the batch loss`` at the given values of the selected parameters, through
        the operator's one forward path (:meth:`~curvature.model_operator.ModelOperator.loss`)."""
        return with_parameters(self.model, self.param_names, lambda: self.loss(inputs, targets, index))

    def _gradient_at(self, index: int, inputs: Any, targets: Any) -> Callable[[list[Tensor]], list[Tensor]]:
        """``gradient(params) -> the batch loss's gradient`` at other values of the selected parameters."""
        loss_of = self._loss_at(index, inputs, targets)

        def gradient(params: list[Tensor]) -> list[Tensor]:
            leaves = [p.detach().requires_grad_() for p in params]
            with torch.enable_grad():
                return list(torch.autograd.grad(loss_of(*leaves), leaves, allow_unused=True, materialize_grads=True))

        return gradient

    def _forward_over_reverse(
        self, index: int, inputs: Any, targets: Any, V: list[Tensor], columns: int | None = None
    ) -> list[Tensor]:
        primals = tuple(p.detach() for p in self.params)
        grad_fn = torch.func.grad(self._loss_at(index, inputs, targets), argnums=tuple(range(len(primals))))

        def hvp(*tangents: Tensor) -> tuple[Tensor, ...]:
            return torch.func.jvp(grad_fn, primals, tangents)[1]

        k = V[0].shape[0]
        step = columns or self.probe_batch_size or k
        chunks = [torch.func.vmap(hvp)(*[v[start:start + step] for v in V]) for start in range(0, k, step)]
        if len(chunks) == 1:
            return list(chunks[0])
        return [torch.cat(rs) for rs in zip(*chunks)]
