"""Operators of the form ``J^T M J``: a matrix ``M`` on the model outputs sandwiched by the Jacobian."""

from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .losses import OutputCurvature, check_outputs, lean_loss
from .model_operator import ModelOperator

__all__ = ["OutputSpaceOperator", "JACOBIAN_BACKENDS"]

logger = logging.getLogger(__name__)

#: ``"vmap"``: all columns of a block in one batched backward (``is_grads_batched``); ``"loop"``:
#: one backward per column; ``"auto"``: the faster of the two, timed once per operator.
JACOBIAN_BACKENDS = ("auto", "vmap", "loop")

#: Columns the ``"auto"`` backend times each strategy on (once per operator).
AUTOTUNE_COLUMNS = 8


@dataclass
class _Linearization:
    """One batch's forward graph: the outputs, their loss curvature, and ``J^T w`` as a function
    of a dummy cotangent ``w`` (kept with its graph, so ``J v = d(J^T w . v)/dw``)."""

    outputs: Tensor
    curvature: OutputCurvature
    dummy: Tensor | None
    jtw: list[Tensor]
    live: list[int]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class OutputSpaceOperator(ModelOperator):
    """Base of GGN, Fisher and empirical Fisher: ``sum_b w_b J_b^T M_b J_b``.

    Per data batch: one forward with graph and one create-graph backward ``J^T w`` of a dummy
    cotangent ``w`` (both cached like the Hessian's graph); then for a block of columns ``J V``
    by differentiating ``J^T w . V`` in ``w`` (the "double-vjp" form of a Jacobian-vector
    product), the output-space product ``M (J V)``, and ``J^T`` by a backward through the kept
    graph. Everything is reverse mode, so the products are those of the function the user's own
    ``loss.backward()`` differentiates: parts computed under ``torch.no_grad()`` or ``detach()``
    are constants (forward-mode AD would differentiate through them), BatchNorm in train mode and
    ``F.dropout`` work (one forward, one mask, per product), and no ``torch.func`` transform
    captures the model's buffers.

    ``backend``: ``"vmap"`` (all columns of a block in one batched backward), ``"loop"`` (one
    backward per column) or ``"auto"`` (default): single columns use ``"loop"``; on the first
    block of several columns both are timed on its first 8 columns and the faster is kept for
    the operator (:meth:`resolved_backend` tells which). Both compute the same products up to
    rounding, and every product of an operator (the first included) uses its one choice;
    ``deterministic=True`` skips the timing and always uses ``"loop"``, so runs are bitwise
    reproducible.

    Memory: a cached batch holds its forward graph and the graph of ``J^T w`` (about the
    create-graph backward the Hessian keeps); ``"vmap"`` adds one output-sized tangent and one
    set of parameter-sized cotangents per column of a block (bound it with ``probe_batch_size``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        data: Any,
        *,
        backend: str = "auto",
        deterministic: bool = False,
        **options: Any,
    ):
        if backend not in JACOBIAN_BACKENDS:
            raise ValueError(f"backend must be one of {JACOBIAN_BACKENDS}, got {backend!r}")
        super().__init__(model, loss_fn, data, **options)
        self.backend = backend
        self.deterministic = bool(deterministic)
        self._auto_choice: str | None = "loop" if (self.deterministic and backend == "auto") else None

    def resolved_backend(self, k: int) -> str | None:
        """The backend used for a block of ``k`` columns (``None``: ``"auto"`` has not chosen yet)."""
        if self.backend != "auto":
            return self.backend
        if k == 1:
            return "loop"
        return self._auto_choice

    @abc.abstractmethod
    def _output_product(self, index: int, curvature: OutputCurvature, U: Tensor) -> Tensor:
        """Apply this operator's output-space matrix to ``U`` of shape ``(k, *outputs.shape)``."""

    def _curvature(self, inputs: Any, outputs: Tensor, targets: Any, index: int) -> OutputCurvature:
        check_outputs(self.loss_info, outputs, targets)
        cross_entropy = self.loss_info.kind == "cross_entropy"  # its normalizer needs no loss value
        if not cross_entropy:
            self._check_loss(self.loss_fn(outputs.detach(), targets), index)
        normalizer = self._loss_normaliser.of_outputs(inputs, outputs.detach(), targets)
        if cross_entropy:
            with torch.no_grad():  # the value is only checked: the lean one skips log_softmax's B x T x V
                lean = lean_loss(self.loss_info, outputs.detach(), targets, normalizer)
                self._check_loss(lean if lean is not None else self.loss_fn(outputs.detach(), targets), index)
        return OutputCurvature(self.loss_info, self.loss_fn, outputs, targets, normalizer)

    def _forward_graph(self, index: int, inputs: Any, targets: Any) -> _Linearization:
        def build() -> _Linearization:
            with torch.enable_grad():
                outputs = self.forward(inputs)
                if not isinstance(outputs, Tensor):
                    raise TypeError(
                        f"the model must return one tensor for {type(self).__name__}, got {type(outputs).__name__}"
                    )
                curvature = self._curvature(inputs, outputs, targets, index)
                if not outputs.requires_grad:
                    return _Linearization(outputs, curvature, None, [], [])
                # A stride-0 zero: the graph of J^T w saves w, which need not take the outputs' memory.
                dummy = outputs.new_zeros(()).expand(outputs.shape).requires_grad_(True)
                jtw = torch.autograd.grad(outputs, self.params, dummy, create_graph=True, allow_unused=True)
            live = [i for i, g in enumerate(jtw) if g is not None and g.requires_grad]
            return _Linearization(outputs, curvature, dummy, list(jtw), live)

        return self._cached(index, build)

    # -- Jacobian products ----------------------------------------------------------------------
    def _jvp(self, lin: _Linearization, chunk: list[Tensor], backend: str) -> Tensor:
        """``J V`` for the columns of ``chunk`` (per parameter ``(k, *shape)``) -> ``(k, *outputs.shape)``."""
        k = chunk[0].shape[0]
        if not lin.live:
            return torch.zeros((k, *lin.outputs.shape), dtype=lin.outputs.dtype, device=lin.outputs.device)
        outs = [lin.jtw[i] for i in lin.live]
        with torch.enable_grad():
            if backend == "vmap":
                (JV,) = torch.autograd.grad(
                    outs, lin.dummy, [chunk[i] for i in lin.live], retain_graph=True, is_grads_batched=True,
                    allow_unused=True, materialize_grads=True,
                )
                return JV
            return torch.stack([
                torch.autograd.grad(outs, lin.dummy, [chunk[i][c] for i in lin.live], retain_graph=True,
                                    allow_unused=True, materialize_grads=True)[0]
                for c in range(k)
            ])

    def _vjp(self, lin: _Linearization, W: Tensor, backend: str) -> list[Tensor]:
        """``J^T W`` per parameter, ``(k, *shape)``."""
        if not lin.outputs.requires_grad:
            return [torch.zeros((W.shape[0], *p.shape), dtype=p.dtype, device=p.device) for p in self.params]
        with torch.enable_grad():
            if backend == "vmap":
                return list(torch.autograd.grad(
                    lin.outputs, self.params, W, retain_graph=True, is_grads_batched=True,
                    allow_unused=True, materialize_grads=True,
                ))
            cols = [
                torch.autograd.grad(lin.outputs, self.params, W[i], retain_graph=True, allow_unused=True,
                                    materialize_grads=True)
                for i in range(W.shape[0])
            ]
        return [torch.stack(r) for r in zip(*cols)]

    def _product_with(self, backend: str, index: int, lin: _Linearization, V: list[Tensor]) -> list[Tensor]:
        k = V[0].shape[0]
        out = [torch.empty_like(v) for v in V]
        for cols in self._column_chunks(k):
            chunk = [v[cols] for v in V]
            # J V is not kept beside M (J V): the closed forms write M (J V) into it (lean LM products).
            W = self._output_product(index, lin.curvature, self._jvp(lin, chunk, backend))
            for j, r in enumerate(self._vjp(lin, W, backend)):
                out[j][cols] = r
        return out

    def _autotune(self, index: int, lin: _Linearization, V: list[Tensor]) -> None:
        """Time both strategies on the first columns and keep the faster for this operator.

        The trial results are discarded (the block is then computed by the chosen strategy), so
        every product of the operator, the first included, is computed the same way, bit for bit.
        """
        cols = slice(0, min(V[0].shape[0], self.probe_batch_size or AUTOTUNE_COLUMNS, AUTOTUNE_COLUMNS))
        trial = [v[cols] for v in V]
        timings = {}
        for backend in ("loop", "vmap"):
            _synchronize(self.device)
            start = time.perf_counter()
            try:
                self._product_with(backend, index, lin, trial)
            except (RuntimeError, NotImplementedError) as exc:  # an op without a batching rule
                if backend == "loop":
                    raise
                logger.info("%s backend 'auto': vmap unavailable here (%s)", type(self).__name__, exc)
                continue
            _synchronize(self.device)
            timings[backend] = time.perf_counter() - start
        self._auto_choice = min(timings, key=timings.get)
        logger.info("%s backend 'auto' chose %s (%s)", type(self).__name__, self._auto_choice, timings)

    def _batch_product(self, index: int, inputs: Any, targets: Any, V: list[Tensor]) -> list[Tensor]:
        lin = self._forward_graph(index, inputs, targets)
        k = V[0].shape[0]
        if self.resolved_backend(k) is None:
            self._autotune(index, lin, V)
        return self._product_with(self.resolved_backend(k), index, lin, V)
