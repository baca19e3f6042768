"""The generalized Gauss-Newton matrix ``J^T H_L J`` over a dataset."""

from __future__ import annotations

from torch import Tensor

from .losses import OutputCurvature
from .output_space import OutputSpaceOperator

__all__ = ["GGN"]


class GGN(OutputSpaceOperator):
    """Generalized Gauss-Newton matrix ``sum_b w_b J_b^T (d^2 L_b / dF^2) J_b`` of the loss over ``data``.

    Works for any loss that is twice differentiable in the model outputs; cross-entropy (class
    weights, ``ignore_index``, label smoothing), :class:`~curvature.losses.TokenCrossEntropyLoss`,
    MSE and BCE-with-logits use their closed-form output Hessians, other losses (``HuberLoss``,
    ``KLDivLoss``, lambdas, subclasses with their own ``forward``) reverse-over-reverse autodiff
    on the output space. Positive semi-definite for convex losses. Same constructor as
    :class:`curvature.Hessian` (``outputs=``, ``compute_dtype=``, ...; ``backend="auto" | "vmap" |
    "loop"`` for the reverse-mode Jacobian products, see
    :class:`~curvature.output_space.OutputSpaceOperator`).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x, y = torch.randn(8, 3), torch.randn(8, 2)
        >>> G = GGN(model, nn.MSELoss(), (x, y))
        >>> v = torch.randn(G.shape[0])
        >>> bool(v @ (G @ v) >= 0)
        True
    """

    def _output_product(self, index: int, curvature: OutputCurvature, U: Tensor) -> Tensor:
        return curvature.hessian_product(U, overwrite=True)
