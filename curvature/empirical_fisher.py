"""The empirical Fisher: outer products of per-sample gradients at the observed labels."""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from .losses import OutputCurvature
from .output_space import OutputSpaceOperator

__all__ = ["EmpiricalFisher"]


class EmpiricalFisher(OutputSpaceOperator):
    """Empirical Fisher ``kappa * sum_n g_n g_n^T`` with ``g_n`` the gradient of sample ``n``'s loss.

    ``g_n`` is taken at the OBSERVED targets and ``kappa`` is the loss's reduction factor (so the
    empirical Fisher is the Fisher's formula with data labels in place of model samples). It is
    not a curvature matrix in general and can differ a lot from the GGN away from a minimum;
    it is provided because optimizers and pruning methods use it.

    For cross-entropy a "sample" is each position that has its own label (tokens of a sequence;
    ignored tokens none; a class weight ``w_y`` scales a token's loss and so its gradient); for
    MSE/BCE and any other loss it is a row of the outputs and ``g_n`` is the gradient of the
    row's summed unit losses, ``Z * dL/dF_n``, with ``Z`` the loss's own normalizer (for an
    element-wise mean written as a lambda, the number of elements, not of rows).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Linear(3, 2)
        >>> x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
        >>> E = EmpiricalFisher(model, nn.CrossEntropyLoss(), (x, y))
        >>> E.shape
        (8, 8)
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Tensor], data: Any, **options: Any):
        super().__init__(model, loss_fn, data, **options)
        # The residuals are scaled by the loss's normalizer even for one batch: it must be verified.
        self._loss_normalizer.strict = True

    def _output_product(self, index: int, curvature: OutputCurvature, U: Tensor) -> Tensor:
        return curvature.outer_product(curvature.residuals(), U, overwrite=True)
