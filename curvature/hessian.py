"""The Hessian of the loss over a dataset, applied to blocks of vectors."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from .functional import model_as_function
from .model_operator import ModelOperator

__all__ = ["Hessian", "HESSIAN_BACKENDS"]

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
            ``"forward_over_reverse"`` (``vmap(jvp(grad))``), or ``"auto"``
            (see :meth:`resolved_backend`).
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

    def resolved_backend(self, k: int) -> str:
        """The backend ``"auto"`` uses for a block of ``k`` columns on this operator's device."""
        if self.backend != "auto":
            return self.backend
        # Measured (bench/operators.py): on CPU a loop of second backwards over the shared graph
        # beats vmapping it (conv double-backward batches badly); on GPU batching fills the device.
        return "double_backward_vmap" if (self.device.type == "cuda" and k > 1) else "double_backward"

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
        if backend == "forward_over_reverse":
            return self._forward_over_reverse(index, inputs, targets, V)
        grads = self.gradient_graph(index, inputs, targets)
        # Gradients that do not depend on the parameters (unused or linear ones) contribute nothing.
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        out = [torch.zeros_like(v) for v in V]
        if not live:
            return out
        outputs = [grads[i] for i in live]
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
        return out

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
