"""quant's one way to weight batches: the core's :class:`curvature.BatchSource` with the loss's normalizer.

Every place in ``quant`` that aggregates over batches (the evaluated loss, the gradient of the
loss-change predictor, sensitivities through the operators) weights batch ``b`` of a ``mean`` loss
by its normalizer ``w_b`` (valid targets under ``ignore_index``, summed class weights, samples by
default) and divides by ``Σ_b w_b``; a ``sum`` loss adds batch values (``w_b = 1``). A batch of
weight 0 (fully padded) contributes nothing. The weights come from the core's
:func:`curvature.batch_weight`, never from a count of samples.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from curvature import BatchSource, Hessian, call_model


class _Evaluated(nn.Module):
    """The model behind a parameter the operator may select even when the model's are frozen.

    The operator is used only for its batch source and forward (no product is taken), so the
    anchor never enters a loss.
    """

    def __init__(self, model: nn.Module, device: torch.device):
        super().__init__()
        self.model = model
        self.anchor = nn.Parameter(torch.zeros((), device=device))
        self.eval()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def _device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def loss_batches(
    model: nn.Module, loss_fn: Callable[..., Tensor], data: Any, *, hessian_options: dict[str, Any] | None = None
) -> Iterator[tuple[BatchSource, Callable[[Any], Any], str]]:
    """``(batch source, forward, reduction)`` for ``loss_fn(model(inputs), targets)`` over ``data``.

    The source yields :class:`curvature.Batch` es whose ``weight`` is the core's batch weight of
    this loss; ``forward(inputs)`` is the tensor the loss takes (``.logits`` of Hugging Face
    outputs); ``reduction`` is the loss's (``"mean"`` or ``"sum"``). The model must be in eval
    mode (or hold no train-mode-dependent module).
    """
    options = {k: v for k, v in dict(hessian_options or {}).items() if k in ("reduction", "outputs")}
    wrapper = _Evaluated(model, _device(model))
    with Hessian(wrapper, loss_fn, data, params=["anchor"], cache_graph=False, **options) as H:
        yield H.batch_source, H.forward, H.loss_info.reduction


def weighted_sum(values: Iterator[tuple[float, float]], *, reduction: str) -> tuple[float, float]:
    """``(Σ_b w_b v_b, Σ_b w_b)`` skipping batches of weight 0 (their value may be NaN)."""
    total, weight = 0.0, 0.0
    for value, w in values:
        if w == 0:
            continue
        total += w * value
        weight += w
    return total, weight


__all__ = ["loss_batches", "weighted_sum", "call_model"]
