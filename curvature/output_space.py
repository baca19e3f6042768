"""Operators of the form ``J^T M J``: a matrix ``M`` on the model outputs sandwiched by the Jacobian."""

from __future__ import annotations

import abc
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointError

from .backends import SelectsBackend
from .finite_difference import NoDoubleBackwardError, check_double_backward, lacks_double_backward
from .forward_jvp import ForwardModeUnavailable, forward_jvp
from .losses import OutputCurvature, check_outputs, lean_loss
from .model_operator import ModelOperator

__all__ = ["OutputSpaceOperator"]

logger = logging.getLogger(__name__)

@dataclass
class _Linearization:
    """One batch's forward graph: the outputs, their loss curvature, and ``J^T w`` as a function
    of a dummy cotangent ``w`` (kept with its graph, so ``J v = d(J^T w . v)/dw``)."""

    outputs: Tensor
    curvature: OutputCurvature
    dummy: Tensor | None
    jtw: list[Tensor]
    live: list[int]


@contextlib.contextmanager
def _cotangent_not_saved(w: Tensor | None) -> Iterator[None]:
    """Inside: the autograd graph saves a stride-0 zero in place of ``w`` (or a view of it).

    ``J^T w`` is linear in ``w``, so its derivative in ``w`` (``J v``, all the kept graph is
    used for) never reads ``w``: the ops that consume ``w`` save it only for derivatives in their
    other inputs (e.g. ``w @ E``'s in ``E``). Without this the graph of a language model would
    keep a ``B x T x V`` tensor per batch; the double-backward path saves its stride-0 dummy."""
    if w is None:
        yield
        return
    ptr = w.untyped_storage().data_ptr()

    def pack(t: Tensor) -> Any:
        try:
            if t.untyped_storage().data_ptr() == ptr:
                return _Zero(t.shape, t.dtype, t.device)
        except (RuntimeError, NotImplementedError, TypeError):
            pass
        return t

    def unpack(saved: Any) -> Tensor:
        return saved.tensor() if isinstance(saved, _Zero) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


@dataclass(frozen=True)
class _Zero:
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    def tensor(self) -> Tensor:
        return torch.zeros((), dtype=self.dtype, device=self.device).expand(self.shape)


class OutputSpaceOperator(SelectsBackend, ModelOperator):
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

    ``backend``: ``"loop"`` (one backward per column), ``"vmap"`` (the columns of a block in one
    batched backward) or ``"auto"`` (default), chosen by the one policy of all operators
    (:mod:`curvature.backends`): single columns and ``deterministic=True`` use ``"loop"`` (bitwise
    reproducible); otherwise both are timed in interleaved rounds on the first block's first 8
    columns and ``"vmap"`` is kept only when its median beats the loop's by more than 10%. The
    choice is recorded per (operator, model structure, device, ``k``): read it with
    :meth:`backend_choice`, pin it with :func:`curvature.backends.pin`. Both compute the same
    products up to rounding.

    The first column of a batch whose graph is not yet built takes ``J v`` by forward-mode AD
    during the forward instead (:func:`curvature.forward_jvp.forward_jvp`), and the backward
    ``J^T (M J v)`` keeps its graph, which is the graph of ``J^T w`` the later columns use: the
    first product costs a forward with tangents and one backward instead of a forward and three
    backward passes (0.68x hessian-eigenthings' first GGN product on a GPT-2 LM, where the
    double backward was 0.93x). Where forward mode would differentiate another function than
    ``loss.backward()`` does (``torch.no_grad()`` parts, tensor or module backward hooks,
    custom ``autograd.Function`` s without ``jvp``, activation checkpointing, complex
    parameters), the double backward is used. The two forms agree to rounding, not bitwise;
    ``deterministic=True`` uses the double backward for every column.

    Memory: a cached batch holds its forward graph and the graph of ``J^T w`` (about the
    create-graph backward the Hessian keeps; both forms save ``w`` as a stride-0 zero); the
    first product's peak with forward mode holds one more outputs-sized temporary (the output
    layer's tangent has two terms); ``"vmap"`` adds one output-sized tangent and one
    set of parameter-sized cotangents per column of a block: at most ``memory_budget`` bytes of
    them per pass (``None``: :func:`curvature._memory.default_memory_budget`), or
    ``probe_batch_size`` columns when set.
    """

    #: The backends this operator implements (see :mod:`curvature.backends`).
    backends = ("loop", "vmap")

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
        # J v of a batch's first column by forward mode (None: not tried yet; False: unavailable
        # or deterministic=True, whose columns all take the one double-backward form).
        self._forward_first: bool | None = False if deterministic else None

    @abc.abstractmethod
    def _output_product(self, index: int, curvature: OutputCurvature, U: Tensor) -> Tensor:
        """Apply this operator's output-space matrix to ``U`` of shape ``(k, *outputs.shape)``."""

    def _curvature(self, inputs: Any, outputs: Tensor, targets: Any, index: int) -> OutputCurvature:
        check_outputs(self.loss_info, outputs, targets)
        cross_entropy = self.loss_info.kind == "cross_entropy"  # its normalizer needs no loss value
        if not cross_entropy:
            self._check_loss(self.loss_fn(outputs.detach(), targets), index)
        normalizer = self._loss_normalizer.of_outputs(inputs, outputs.detach(), targets)
        if cross_entropy:
            with torch.no_grad():  # the value is only checked: the lean one skips log_softmax's B x T x V
                lean = lean_loss(self.loss_info, outputs.detach(), targets, normalizer)
                self._check_loss(lean if lean is not None else self.loss_fn(outputs.detach(), targets), index)
        return OutputCurvature(self.loss_info, self.loss_fn, outputs, targets, normalizer)

    def _checked_outputs(self, outputs: Any) -> Tensor:
        if not isinstance(outputs, Tensor):
            raise TypeError(f"the model must return one tensor for {type(self).__name__}, got {type(outputs).__name__}")
        if outputs.requires_grad:
            check_double_backward(outputs, type(self).__name__)
        return outputs

    def _linearize(self, index: int, inputs: Any, targets: Any) -> _Linearization:
        """The batch's forward graph and the graph of ``J^T w`` of a dummy cotangent ``w``."""
        with torch.enable_grad():
            outputs = self._checked_outputs(self.forward(inputs))
            curvature = self._curvature(inputs, outputs, targets, index)
            if not outputs.requires_grad:
                return _Linearization(outputs, curvature, None, [], [])
            # A stride-0 zero: the graph of J^T w saves w, which need not take the outputs' memory.
            dummy = outputs.new_zeros(()).expand(outputs.shape).requires_grad_(True)
            jtw = torch.autograd.grad(outputs, self.params, dummy, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(jtw) if g is not None and g.requires_grad]
        return _Linearization(outputs, curvature, dummy, list(jtw), live)

    def _first_column(
        self, index: int, inputs: Any, targets: Any, column: list[Tensor], keep: bool
    ) -> tuple[_Linearization | None, list[Tensor]] | None:
        """The product with the batch's first column, ``J v`` by forward mode during the forward
        (:func:`curvature.forward_jvp.forward_jvp`); ``None`` where forward mode is not the
        ``J`` of ``loss.backward()``. With ``keep``, the backward ``J^T (M J v)`` is taken with
        its graph, which is the graph of ``J^T w`` the later columns differentiate (linear in
        ``w``: its derivative is ``J`` wherever it is taken), and returned with the product."""
        try:
            outputs, jv = forward_jvp(self.model, self.param_names, self.params, column, lambda: self.forward(inputs))
        except ForwardModeUnavailable as exc:
            logger.info("%s: J v by a double backward (forward mode: %s)", type(self).__name__, exc)
            self._forward_first = False
            return None
        self._forward_first = True
        outputs = self._checked_outputs(outputs)
        curvature = self._curvature(inputs, outputs, targets, index)
        if not outputs.requires_grad:
            return _Linearization(outputs, curvature, None, [], []), [torch.zeros_like(p) for p in self.params]
        if jv is None:
            jv = torch.zeros_like(outputs)
        w = self._output_product(index, curvature, jv[None])[0]
        try:
            with torch.enable_grad(), _cotangent_not_saved(w if keep else None):
                if keep:
                    w = w.detach().requires_grad_(True)
                jtw = torch.autograd.grad(outputs, self.params, w, create_graph=keep, allow_unused=True)
        except CheckpointError as exc:  # checkpointed segments recompute without the tangents' saves
            logger.info("%s: J v by a double backward (forward mode under activation checkpointing: %s)",
                        type(self).__name__, exc)
            self._forward_first = False
            return None
        first = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(jtw, self.params)]
        if not keep:
            return None, first
        live = [i for i, g in enumerate(jtw) if g is not None and g.requires_grad]
        return _Linearization(outputs, curvature, w, list(jtw), live), first

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

    def _product_with(
        self, backend: str, index: int, lin: _Linearization, V: list[Tensor], columns: int | None = None
    ) -> list[Tensor]:
        k = V[0].shape[0]
        step = columns or self.probe_batch_size or k
        out = [torch.empty_like(v) for v in V]
        for start in range(0, k, step):
            cols = slice(start, min(start + step, k))
            chunk = [v[cols] for v in V]
            # J V is not kept beside M (J V): the closed forms write M (J V) into it (lean LM products).
            W = self._output_product(index, lin.curvature, self._jvp(lin, chunk, backend))
            for j, r in enumerate(self._vjp(lin, W, backend)):
                out[j][cols] = r
        return out

    def _batch_product(self, index: int, inputs: Any, targets: Any, V: list[Tensor]) -> list[Tensor]:
        try:
            first: list[Tensor] | None = None
            k = V[0].shape[0]

            def build() -> _Linearization | None:
                nonlocal first
                if self._forward_first is not False and first is None:
                    # Kept for the cache or the block's other columns; a lone uncached column needs no graph.
                    keep = k > 1 or self._graphs.will_keep(index)
                    done = self._first_column(index, inputs, targets, [v[0] for v in V], keep)
                    if done is not None:
                        lin, first = done
                        return lin
                return self._linearize(index, inputs, targets)

            lin = self._cached(index, build)
            if first is not None:
                first = [f.to(v.dtype).unsqueeze(0) for f, v in zip(first, V)]
                if k == 1:
                    return first
                V = [v[1:] for v in V]
            assert lin is not None
            key = self.backend_key(k)

            def run(backend: str, W: list[Tensor], columns: int | None) -> list[Tensor]:
                return self._product_with(backend, index, lin, W, columns)

            def bytes_per_column(backend: str) -> int:
                # One output-sized tangent and one set of parameter-sized cotangents per column.
                return lin.outputs.numel() * lin.outputs.element_size() + self.shape[0] * self.dtype.itemsize

            rest = self._selector.product(key, self.device, V, run, bytes_per_column, first_batch=index == 0)
            return rest if first is None else [torch.cat([f, r]) for f, r in zip(first, rest)]
        except (RuntimeError, NotImplementedError) as exc:
            if lacks_double_backward(exc) and not isinstance(exc, NoDoubleBackwardError):
                raise NoDoubleBackwardError(
                    f"{type(self).__name__} needs a backward of the model's backward (J V by a double vjp), and the "
                    f"model has an operation without one ({exc}); Hessian(..., backend='finite_difference') "
                    "computes curvature products from gradients alone"
                ) from exc
            raise
