"""The Hessian of the loss over a dataset, applied to blocks of vectors."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .functional import model_as_function
from .model_operator import ModelOperator

__all__ = ["Hessian", "HESSIAN_BACKENDS"]

logger = logging.getLogger(__name__)

#: Columns the ``"auto"`` backend times each strategy on (once per operator).
AUTOTUNE_COLUMNS = 8


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

HESSIAN_BACKENDS = ("auto", "double_backward", "double_backward_vmap", "forward_over_reverse")


class Hessian(ModelOperator):
    """Hessian of the loss of ``model`` over ``data`` with respect to the selected parameters.

    ``H @ V`` for a ``(d, k)`` block shares one forward and one create-graph backward per data
    batch among all ``k`` columns; only the second backward is paid per column.

    Args:
        model: the network, analysed as it is (call ``model.eval()`` first).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, e.g. ``nn.CrossEntropyLoss()``.
        data: one ``(inputs, targets)`` batch or a re-iterable of batches (a DataLoader);
            ``inputs`` may be a tensor, a tuple of tensors (positional) or a dict (keywords).
        backend: ``"double_backward"`` (one second backward per column through the shared
            graph), ``"double_backward_vmap"`` (the second backward vmapped over columns),
            ``"forward_over_reverse"`` (``vmap(jvp(grad))``), or ``"auto"``: single columns use
            the double backward; on the first block of several columns all three strategies
            are timed on its first 8 columns and the fastest is kept for the operator (which
            one wins depends on the layers and the device; :meth:`resolved_backend` tells).
        **options: ``params``, ``reduction``, ``probe_batch_size``, ``cache_graph``,
            ``graph_cache_bytes``, ``allow_train_mode``, ``check_finite``, ``progress``; see
            :class:`~curvature.model_operator.ModelOperator`. With the default graph cache, a
            single batch's create-graph backward is kept (about one to two times the activation
            memory), as PyHessian does, so repeated products pay only the second backward.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> H = Hessian(model, nn.CrossEntropyLoss(), (x, y))
        >>> H.shape, (H @ torch.ones(H.shape[0])).shape
        ((26, 26), torch.Size([26]))
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        data: Any,
        *,
        backend: str = "auto",
        **options: Any,
    ):
        if backend not in HESSIAN_BACKENDS:
            raise ValueError(f"backend must be one of {HESSIAN_BACKENDS}, got {backend!r}")
        super().__init__(model, loss_fn, data, **options)
        self.backend = backend
        self._auto_choice: str | None = None

    def resolved_backend(self, k: int) -> str | None:
        """The backend used for a block of ``k`` columns (``None``: ``"auto"`` has not chosen yet)."""
        if self.backend != "auto":
            return self.backend
        if k == 1:
            return "double_backward"
        return self._auto_choice

    def _autotune(self, index: int, inputs: Any, targets: Any, V: list[Tensor], out: list[Tensor]) -> int:
        """Time the three strategies on the first columns, keep the fastest for this operator, and
        keep its results for those columns; return how many columns were done.

        Measured (bench/operators.py, bench/estimators.py) the winner depends on the layers and
        the device: vmapped forward-over-reverse wins on a CPU tanh MLP, a loop of double
        backwards through the shared graph on a CPU ReLU CNN.
        """
        cols = slice(0, min(V[0].shape[0], self.probe_batch_size or AUTOTUNE_COLUMNS, AUTOTUNE_COLUMNS))
        trial_V = [v[cols] for v in V]
        timings, results = {}, {}
        for backend in ("double_backward", "double_backward_vmap", "forward_over_reverse"):
            _synchronize(self.device)
            start = time.perf_counter()
            try:
                results[backend] = self._product_with(backend, index, inputs, targets, trial_V)
            except (RuntimeError, NotImplementedError) as exc:
                # Some ops lack forward-AD or batching rules (e.g. mse_loss's zero tangents under vmap).
                if backend == "double_backward":
                    raise
                logger.info("Hessian backend 'auto': %s unavailable here (%s)", backend, exc)
                continue
            _synchronize(self.device)
            timings[backend] = time.perf_counter() - start
        # The first double backward also built (or cached) the graph; do not charge it to that strategy.
        self._auto_choice = min(timings, key=timings.get)
        logger.info("Hessian backend 'auto' chose %s (%s)", self._auto_choice, timings)
        if self._auto_choice == "forward_over_reverse":
            self.release()  # forward-over-reverse never uses the cached first-order graph
        for o, r in zip(out, results[self._auto_choice]):
            o[cols] = r
        return cols.stop

    def gradient_graph(self, index: int, inputs: Any, targets: Any) -> list[Tensor]:
        """The batch loss's gradient per parameter, with its graph (zeros for unused parameters)."""

        def build() -> list[Tensor]:
            with torch.enable_grad():
                loss = self.loss(inputs, targets, index)
                return list(
                    torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True, materialize_grads=True)
                )

        return self._cached(index, build)

    # -- products -------------------------------------------------------------------------------
    def _batch_product(self, index: int, inputs: Any, targets: Any, V: list[Tensor]) -> list[Tensor]:
        k = V[0].shape[0]
        backend = self.resolved_backend(k)
        if backend is not None:
            return self._product_with(backend, index, inputs, targets, V)
        if self.cache_graph is not False:
            self.gradient_graph(index, inputs, targets)  # build it outside the timed trials
        out = [torch.zeros_like(v) for v in V]
        done = self._autotune(index, inputs, targets, V, out)
        if done < k:
            rest = slice(done, k)
            tail = self._product_with(self._auto_choice, index, inputs, targets, [v[rest] for v in V])
            for o, t in zip(out, tail):
                o[rest] = t
        return out

    def _product_with(self, backend: str, index: int, inputs: Any, targets: Any, V: list[Tensor]) -> list[Tensor]:
        if backend == "forward_over_reverse":
            return self._forward_over_reverse(index, inputs, targets, V)
        grads = self.gradient_graph(index, inputs, targets)
        # Gradients that do not depend on the parameters (unused or linear ones) contribute nothing.
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        out = [torch.zeros_like(v) for v in V]
        if live:
            self._second_backward(backend, [grads[i] for i in live], live, V, out)
        return out

    def _second_backward(
        self, backend: str, outputs: list[Tensor], live: list[int], V: list[Tensor], out: list[Tensor]
    ) -> None:
        """Write ``d(grad . v)/d params`` for each column of ``V`` into ``out`` (per parameter, ``(k, *shape)``)."""
        k = V[0].shape[0]
        with torch.enable_grad():
            if backend == "double_backward_vmap":
                for cols in self._column_chunks(k):
                    res = torch.autograd.grad(
                        outputs, self.params, [V[i][cols] for i in live],
                        retain_graph=True, is_grads_batched=True, allow_unused=True, materialize_grads=True,
                    )
                    for j, r in enumerate(res):
                        out[j][cols] = r
            else:
                for c in range(k):
                    res = torch.autograd.grad(
                        outputs, self.params, [V[i][c] for i in live],
                        retain_graph=True, allow_unused=True, materialize_grads=True,
                    )
                    for j, r in enumerate(res):
                        out[j][c] = r

    def _forward_over_reverse(self, index: int, inputs: Any, targets: Any, V: list[Tensor]) -> list[Tensor]:
        f = model_as_function(self.model, self.param_names, inputs)
        primals = tuple(p.detach() for p in self.params)

        def loss_of(*params: Tensor) -> Tensor:
            return self._check_loss(self.loss_fn(f(*params), targets), index)

        grad_fn = torch.func.grad(loss_of, argnums=tuple(range(len(primals))))

        def hvp(*tangents: Tensor) -> tuple[Tensor, ...]:
            return torch.func.jvp(grad_fn, primals, tangents)[1]

        k = V[0].shape[0]
        out = [torch.empty_like(v) for v in V]
        for cols in self._column_chunks(k):
            res = torch.func.vmap(hvp)(*[v[cols] for v in V])
            for j, r in enumerate(res):
                out[j][cols] = r
        return out
