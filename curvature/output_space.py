"""Operators of the form ``J^T M J``: a matrix ``M`` on the model outputs sandwiched by the Jacobian."""

from __future__ import annotations

import abc
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .functional import model_as_function
from .losses import OutputCurvature
from .model_operator import ModelOperator

__all__ = ["OutputSpaceOperator", "JACOBIAN_BACKENDS"]

JACOBIAN_BACKENDS = ("auto", "vmap", "loop")


class OutputSpaceOperator(ModelOperator):
    """Base of GGN, Fisher and empirical Fisher: ``sum_b w_b J_b^T M_b J_b``.

    Per data batch: one forward with graph, ``J V`` for all columns by forward-mode AD
    (``vmap(jvp)``, or a loop with ``backend="loop"``), the output-space product ``M (J V)``,
    then ``J^T`` by a batched backward through the kept graph.
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
        if backend not in JACOBIAN_BACKENDS:
            raise ValueError(f"backend must be one of {JACOBIAN_BACKENDS}, got {backend!r}")
        super().__init__(model, loss_fn, data, **options)
        self.backend = "vmap" if backend == "auto" else backend

    @abc.abstractmethod
    def _output_product(self, index: int, curvature: OutputCurvature, U: Tensor) -> Tensor:
        """Apply this operator's output-space matrix to ``U`` of shape ``(k, *outputs.shape)``."""

    def _forward_graph(self, index: int, inputs: Any, targets: Any) -> tuple[Tensor, OutputCurvature]:
        def build() -> tuple[Tensor, OutputCurvature]:
            with torch.enable_grad():
                outputs = self.forward(inputs)
                if not isinstance(outputs, Tensor):
                    raise TypeError(
                        f"the model must return one tensor for {type(self).__name__}, got {type(outputs).__name__}"
                    )
                self._check_loss(self.loss_fn(outputs.detach(), targets), index)
            return outputs, OutputCurvature(self.loss_info, self.loss_fn, outputs, targets)

        return self._cached(index, build)

    def _batch_product(self, index: int, inputs: Any, targets: Any, V: list[Tensor]) -> list[Tensor]:
        outputs, curvature = self._forward_graph(index, inputs, targets)
        f = model_as_function(self.model, self.param_names, inputs)
        primals = tuple(p.detach() for p in self.params)

        def jvp(*tangents: Tensor) -> Tensor:
            return torch.func.jvp(f, primals, tangents)[1]

        k = V[0].shape[0]
        out = [torch.empty_like(v) for v in V]
        for cols in self._column_chunks(k):
            chunk = [v[cols] for v in V]
            if self.backend == "vmap":
                JV = torch.func.vmap(jvp)(*chunk)
            else:
                JV = torch.stack([jvp(*[c[i] for c in chunk]) for i in range(chunk[0].shape[0])])
            W = self._output_product(index, curvature, JV)
            with torch.enable_grad():
                if self.backend == "vmap":
                    res = torch.autograd.grad(
                        outputs, self.params, W, retain_graph=True, is_grads_batched=True,
                        allow_unused=True, materialize_grads=True,
                    )
                else:
                    cols_res = [
                        torch.autograd.grad(outputs, self.params, W[i], retain_graph=True, allow_unused=True,
                                            materialize_grads=True)
                        for i in range(W.shape[0])
                    ]
                    res = [torch.stack(r) for r in zip(*cols_res)]
            for j, r in enumerate(res):
                out[j][cols] = r
        return out
