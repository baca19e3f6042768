"""The (true) Fisher information matrix over a dataset, exact or Monte-Carlo."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from .losses import OutputCurvature, describe_loss
from .output_space import OutputSpaceOperator
from .probes import draw_seed, make_generator

__all__ = ["Fisher"]


class Fisher(OutputSpaceOperator):
    """Fisher information of the model's predictive distribution, ``sum_b w_b J_b^T E_y~p[r r^T] J_b``.

    The likelihood is the one the loss is the negative log of: categorical for
    ``CrossEntropyLoss``, Gaussian for ``MSELoss``, Bernoulli for ``BCEWithLogitsLoss``; the
    reduction factor of the loss scales it exactly as it scales the Hessian.

    * ``mc_samples=None`` (default): exact, via the closed form ``E[r r^T] = d^2 nll / dF^2``
      (so the Fisher equals the GGN for these losses).
    * ``mc_samples=S``: Monte-Carlo estimate with ``S`` labels drawn per unit (sample, or token
      of a sequence; ignored tokens draw none) from the model.
      The labels are drawn once per batch from a seed taken from ``generator`` (default: a fresh
      OS-seeded generator, so two operators differ; pass a seeded one to reproduce), so every
      product sees the SAME estimate (a fixed symmetric matrix, as Lanczos and CG need).

    Examples:
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
        >>> x, y = torch.randn(16, 3), torch.randint(0, 3, (16,))
        >>> F = Fisher(model, nn.CrossEntropyLoss(), (x, y))
        >>> Fmc = Fisher(model, nn.CrossEntropyLoss(), (x, y), mc_samples=100,
        ...              generator=torch.Generator().manual_seed(0))
        >>> v = torch.randn(F.shape[0])
        >>> bool(torch.allclose(Fmc @ v, Fmc @ v))  # deterministic given the generator
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        data: Any,
        *,
        mc_samples: int | None = None,
        generator: torch.Generator | None = None,
        **options: Any,
    ):
        info = describe_loss(loss_fn, options.get("reduction"))
        if not info.is_likelihood:
            raise ValueError(
                f"Fisher needs a likelihood loss (CrossEntropyLoss, MSELoss or BCEWithLogitsLoss without class "
                f"weights, or their torch.nn.functional forms), got {type(loss_fn).__name__}; use GGN for other losses"
            )
        super().__init__(model, loss_fn, data, **options)
        if mc_samples is not None and (not isinstance(mc_samples, int) or mc_samples < 1):
            raise ValueError(f"mc_samples must be a positive integer or None, got {mc_samples!r}")
        self.mc_samples = mc_samples
        # One draw from the caller's generator fixes all label samples of this operator (the
        # toolkit's policy: no generator means a fresh OS-seeded one, never a hidden fixed seed).
        self._seed = draw_seed(make_generator(generator, self.device))

    def _sampled(self, index: int, curvature: OutputCurvature) -> Tensor:
        gen = torch.Generator(device=self.device).manual_seed(self._seed + index)
        return curvature.sampled_residuals(self.mc_samples, gen)

    def _output_product(self, index: int, curvature: OutputCurvature, U: Tensor) -> Tensor:
        if self.mc_samples is None:
            return curvature.hessian_product(U, overwrite=True)
        return curvature.outer_product(self._sampled(index, curvature), U, overwrite=True)
