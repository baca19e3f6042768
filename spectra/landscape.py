"""Loss along eigen-directions: 1-D slices and 2-D surfaces around the current parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from curvature import EmptyDataError, Hessian, ModelOperator

from .results import EigenResult

__all__ = ["LossLandscape", "dataset_loss", "loss_landscape"]


@dataclass(frozen=True, eq=False)
class LossLandscape:
    """Loss values on a line or a plane through the current parameters ``θ``.

    Attributes:
        coords: one ``(n,)`` float64 tensor of step lengths per direction (``α``, and ``β`` in 2-D).
            Directions are unit vectors, so a step is a parameter-space distance.
        losses: ``(n,)`` (1-D) or ``(n, n)`` (2-D, indexed ``[i, j] ↔ (α_i, β_j)``) float64 losses.
        base_loss: the loss at ``θ``.
        eigenvalues: curvature along each direction when the directions came from an
            :class:`EigenResult`, else ``None``.
        slopes: directional derivatives ``gᵀu`` of the loss at ``θ`` (one per direction).

    Examples:
        >>> ls = LossLandscape((torch.linspace(-1, 1, 3),), torch.tensor([1.0, 0.0, 1.0]), 0.0)
        >>> ls.ndim
        1
    """

    coords: tuple[Tensor, ...]
    losses: Tensor
    base_loss: float
    eigenvalues: tuple[float, ...] | None = None
    slopes: tuple[float, ...] = field(default_factory=tuple)

    @property
    def ndim(self) -> int:
        """1 for a line, 2 for a plane."""
        return len(self.coords)

    def quadratic_model(self) -> Tensor | None:
        """The second-order Taylor model ``L(θ) + α gᵀu + ½ λ α²`` along a 1-D eigen-direction."""
        if self.ndim != 1 or self.eigenvalues is None or not self.slopes:
            return None
        a = self.coords[0]
        return self.base_loss + self.slopes[0] * a + 0.5 * self.eigenvalues[0] * a**2

    def plot(self, ax: Any = None, *, title: str | None = None, cmap: str = "viridis") -> Any:
        """Draw the slice (a curve with its quadratic model) or the surface (filled contours).

        Returns:
            The matplotlib axes.
        """
        from .plotting import plot_landscape

        return plot_landscape(self, ax=ax, title=title, cmap=cmap)


def _directions(directions: Any) -> tuple[Tensor, tuple[float, ...] | None]:
    eigenvalues = None
    if isinstance(directions, EigenResult):
        count = min(directions.k, 2)
        eigenvalues = tuple(float(v) for v in directions.eigenvalues[:count])
        directions = directions.eigenvectors[:, :count]
    if not isinstance(directions, Tensor):
        raise TypeError(f"directions must be a tensor or an EigenResult, got {type(directions).__name__}")
    U = directions.reshape(directions.shape[0], -1) if directions.ndim == 1 else directions
    if U.ndim != 2 or U.shape[1] not in (1, 2):
        raise ValueError(f"directions must have shape (d,), (d, 1) or (d, 2), got {tuple(directions.shape)}")
    norms = torch.linalg.vector_norm(U.to(torch.float64), dim=0)
    if (norms == 0).any() or not torch.isfinite(norms).all():
        raise ValueError("directions must be finite and non-zero")
    return U / norms.to(U.dtype), eigenvalues


def dataset_loss(op: ModelOperator) -> Tensor:
    """The loss over all of ``op``'s data, the function whose curvature ``op`` is.

    ``Σ_b w_b L_b / Σ_b w_b`` for a mean loss (``w_b`` the batch's normalizer, as in the
    operators' products), ``Σ_b L_b`` for a sum; differentiable when grad mode is on.

    Examples:
        >>> from curvature import Hessian
        >>> x, y = torch.ones(4, 2), torch.zeros(4, 1)
        >>> model = nn.Linear(2, 1)
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(1.0), model.bias.fill_(0.0)
        >>> data = [(x[:3], y[:3]), (x[3:], y[3:])]
        >>> float(dataset_loss(Hessian(model, nn.MSELoss(), data)))
        4.0
    """
    source = op.batch_source
    total: Tensor | None = None
    weight = 0.0
    mean = source.reduction == "mean"
    for batch in source:
        if mean and batch.weight == 0:
            continue  # every target ignored: no part of the mean (its own loss is 0/0), as in the products
        term = op.loss(batch.inputs, batch.targets, batch.index) * batch.weight
        total = term if total is None else total + term
        weight += batch.weight
    if total is None:  # the batch source raises on no batches at all
        raise EmptyDataError("every batch of the data has weight 0 (e.g. all targets are ignore_index)")
    return total / weight if source.reduction == "mean" else total


def loss_landscape(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    data: Any,
    *,
    directions: Any,
    radius: float = 1.0,
    num_points: int = 21,
    params: Any = None,
) -> LossLandscape:
    """Evaluate the loss on a line or plane through the current parameters along given directions.

    ``L(θ + α u)`` for ``α`` in ``[-radius, radius]`` (1-D), or ``L(θ + α u + β w)`` on a square
    grid (2-D). Typical use: the top Hessian eigenvectors from :func:`spectra.eigsh`, which show
    how sharp the minimum is along its most curved directions. Directions are normalized to unit
    length. The flat direction vector is mapped onto the parameters in the model's order (as in
    ``curvature``'s operators); the parameters are restored afterwards,
    even on error. Costs ``num_points`` (or ``num_points²``) loss evaluations over ``data`` plus
    one gradient.

    Args:
        model: the network (evaluated as it is; call ``model.eval()`` first).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (mean or sum reduction, as for the
            operators).
        data: one ``(inputs, targets)`` batch or a re-iterable of batches, combined exactly as
            the curvature operators combine them (:func:`dataset_loss`).
        directions: ``(d,)``, ``(d, 1)`` or ``(d, 2)`` tensor, or an :class:`EigenResult` (its first
            one or two eigenvectors; their eigenvalues give the quadratic model of the plot).
        radius: largest step length.
        num_points: points per direction.
        params: the parameters the directions live on (names, tensors or predicate, as for the
            operators); default all that require grad.

    Returns:
        A :class:`LossLandscape`.

    Examples:
        >>> model = nn.Linear(2, 1)
        >>> x, y = torch.randn(8, 2, generator=torch.Generator().manual_seed(0)), torch.zeros(8, 1)
        >>> ls = loss_landscape(model, nn.MSELoss(), (x, y), directions=torch.ones(3), num_points=5)
        >>> ls.losses.shape, ls.ndim
        (torch.Size([5]), 1)
    """
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
        raise ValueError(f"num_points must be an int >= 2, got {num_points!r}")
    # The operator core's batch source weights the batches exactly as the curvature operators do
    # (mean or sum reduction, the loss's own normalizer); no product is ever computed with it.
    op = Hessian(model, loss_fn, data, params=params, cache_graph=False)
    tensors = op.params
    d = op.shape[0]
    U, eigenvalues = _directions(directions)
    if U.shape[0] != d:
        raise ValueError(f"directions have length {U.shape[0]}, but the selected parameters have d={d}")
    device, dtype = op.device, op.dtype
    U = U.to(device=device, dtype=dtype)
    per_param = op.unflatten(U)  # each (*shape, n_dirs)

    with torch.enable_grad():
        base = dataset_loss(op)
        grads = torch.autograd.grad(base, tensors, allow_unused=True, materialize_grads=True)
    slopes = tuple(
        float(sum((g * u[..., i]).sum() for g, u in zip(grads, per_param))) for i in range(U.shape[1])
    )
    coords = torch.linspace(-radius, radius, num_points, dtype=torch.float64)
    originals = [p.detach().clone() for p in tensors]
    shape = (num_points,) * U.shape[1]
    losses = torch.empty(shape, dtype=torch.float64)
    try:
        with torch.no_grad():
            for index in torch.cartesian_prod(*[torch.arange(num_points)] * U.shape[1]).reshape(-1, U.shape[1]):
                step = coords[index].to(device=device, dtype=dtype)
                for p, p0, u in zip(tensors, originals, per_param):
                    p.copy_(p0 + u @ step)
                losses[tuple(index.tolist())] = float(dataset_loss(op))
    finally:
        with torch.no_grad():
            for p, p0 in zip(tensors, originals):
                p.copy_(p0)
    return LossLandscape(
        coords=(coords,) * U.shape[1],
        losses=losses,
        base_loss=float(base.detach()),
        eigenvalues=eigenvalues,
        slopes=slopes,
    )
