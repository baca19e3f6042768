"""AdaHessian (Yao et al., AAAI 2021): Adam with the RMS of a spatially averaged Hutchinson
Hessian diagonal in place of the RMS of the gradient."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from .. import working_dtype
from ..checks import check_betas, check_choice, check_count, check_real
from ._common import CurvatureOptimizer
from ._hessian_diagonal import FD_SCHEMES, hutchinson_refresh

__all__ = ["AdaHessian", "adahessian_update", "spatial_average"]


def spatial_average(estimate: Tensor, *, signed: bool = False) -> Tensor:
    """The AdaHessian curvature of one parameter: ``|u ⊙ Hu|`` averaged over a convolution
    kernel's spatial positions.

    Rule by shape: tensors with at most 2 dimensions (biases, linear and embedding weights) are
    not averaged; tensors with ``n >= 3`` dimensions are convolution weights ``(out, in, k1, …)``
    and are averaged over dimensions ``2 … n−1`` (``Conv1d``, ``Conv2d``, ``Conv3d`` alike).
    Magnitudes are averaged (as the official code does); ``signed=True`` averages the signed
    estimate first and then takes the magnitude (the paper's form, where signs may cancel).

    Examples:
        >>> spatial_average(torch.tensor([[[1.0, -3.0]]])).tolist()
        [[[2.0, 2.0]]]
        >>> spatial_average(torch.tensor([[[1.0, -3.0]]]), signed=True).tolist()
        [[[1.0, 1.0]]]
    """
    if estimate.ndim < 3:
        return estimate.abs()
    dims = tuple(range(2, estimate.ndim))
    mean = (estimate if signed else estimate.abs()).mean(dim=dims, keepdim=True)
    return mean.abs().expand_as(estimate)


@torch.no_grad()
def adahessian_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_hessian_sq: Tensor,
    *,
    step: int,
    num_refreshes: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    hessian_power: float,
) -> None:
    """One AdaHessian update of ``param`` in place (``exp_hessian_sq`` already refreshed).

    ``m ← β1 m + (1 − β1) g``; ``denom = (sqrt(v / (1 − β2^r)))^k + eps`` with ``t`` the number
    of steps and ``r`` the number of curvature refreshes of this parameter so far (per-parameter
    counts, as ``torch.optim.Adam``'s ``state["step"]``); ``θ ← θ − lr (m / (1 − β1^t) / denom +
    wd θ)``.

    Examples:
        >>> p, m, v = torch.tensor([1.0]), torch.zeros(1), torch.tensor([2.0])
        >>> adahessian_update(p, torch.tensor([2.0]), m, v, step=1, num_refreshes=1, lr=0.1,
        ...                   beta1=0.5, beta2=0.5, eps=1e-4, weight_decay=0.0, hessian_power=1.0)
        >>> round(p.item(), 6)
        0.900005
    """
    dtype = exp_avg.dtype
    theta = param if param.dtype == dtype else param.to(dtype)  # in place for full precision
    exp_avg.mul_(beta1).add_(grad.to(dtype), alpha=1 - beta1)
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2 ** max(num_refreshes, 1)
    denom = torch.div(exp_hessian_sq, bc2).sqrt_()
    if hessian_power != 1.0:
        denom.pow_(hessian_power)
    denom.add_(eps)
    if weight_decay:
        theta.mul_(1 - lr * weight_decay)
    theta.addcdiv_(exp_avg, denom, value=-lr / bc1)
    if theta is not param:
        param.copy_(theta)


class AdaHessian(CurvatureOptimizer):
    """AdaHessian: ``θ ← θ − lr · m̂ / (sqrt(v̂)^k + eps)`` with ``v`` the EMA of the squared,
    spatially averaged Hutchinson Hessian diagonal.

    The rule (per coordinate):

    * on refresh steps (``t = 1, k + 1, …``, ``k = update_period``): ``D = u ⊙ (H u)`` with a
      Rademacher probe ``u`` from ``generator``, ``D̃ =`` :func:`spatial_average` ``(D)``,
      ``v ← β2 v + (1 − β2) D̃ ⊙ D̃``, ``r ← r + 1``;
    * ``m ← β1 m + (1 − β1) g``; ``θ ← θ − lr (m / (1 − β1^t) / ((sqrt(v / (1 − β2^r)))^p + eps)
      + wd θ)`` with ``p = hessian_power`` (decoupled weight decay, as the official code).

    The counts are per parameter (``state["step"]`` and ``state["hessian_step"]``, as
    ``torch.optim.Adam`` and the official code): a parameter that first gets a gradient late
    (progressive unfreezing, a head added later, an expert without tokens) takes a first step, not
    a scaled-down one. ``v`` is bias-corrected with the number of refreshes ``r``, not the step
    count (so ``update_period > 1`` is not under-corrected), and the first step already has an
    estimate (no ``eps``-sized denominator). Negative curvature gets a positive denominator ``|D̃|``, so steps
    near a saddle are gradient-like and move away from it.

    ``H u`` comes from finite differences of the closure's gradients (``fd_scheme="forward"`` by
    default: one extra closure call per refresh; ``"central"``: two) or, with
    ``opt.step(closure, curvature=op)``, from a curvature operator (exact). The user's closure is
    the standard one, no ``create_graph``.

    ``hessian_power`` ``p`` interpolates between Adam-like (``p → 0``: ``lr`` acts as an absolute
    step) and diagonal-Newton (``p = 1``: the step ``−lr · g / |D̃|`` is scale-free) steps; ``1``
    is the paper's default and the setting the comparisons in ``docs/optimizers.md`` use.

    Args:
        params: parameters or parameter groups.
        lr, betas, eps, weight_decay: as in the paper (defaults of the official code).
        hessian_power: ``0 < p <= 1``.
        update_period: refresh the curvature every this many steps.
        spatial_average: average over convolution kernels (see :func:`spatial_average`).
        signed_average: average the signed estimate (the paper's form) instead of magnitudes.
        fd_scheme: ``"forward"`` or ``"central"``.
        generator: probe generator (seed it identically on every data-parallel rank).
        model: optional module all of whose buffers are restored after the extra closure calls
            (without it, the buffers of every module the closure calls are).

    Examples:
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = AdaHessian([w], lr=0.5, betas=(0.5, 0.999), generator=torch.Generator().manual_seed(0))
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = (torch.tensor([1.0, 100.0]) * w ** 2).sum()
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(20):
        ...     loss = opt.step(closure)
        >>> bool(closure() < 1e-2)
        True
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.15,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        update_period: int = 1,
        spatial_average: bool = True,
        signed_average: bool = False,
        fd_scheme: str = "forward",
        generator: torch.Generator | None = None,
        model: nn.Module | None = None,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, hessian_power=hessian_power)
        self._check_group(defaults)
        self.update_period = check_count(update_period, name="update_period")
        self.spatial_average = bool(spatial_average)
        self.signed_average = bool(signed_average)
        self.fd_scheme = check_choice(fd_scheme, name="fd_scheme", choices=FD_SCHEMES)
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        self.model = model
        super().__init__(params, defaults, generator=generator)

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        check_real(group["lr"], name="lr", low=0.0, low_open=True)
        check_betas(group["betas"])
        check_real(group["eps"], name="eps", low=0.0, low_open=True)
        check_real(group["weight_decay"], name="weight_decay", low=0.0)
        check_real(group["hessian_power"], name="hessian_power", low=0.0, high=1.0, low_open=True)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _curvature(self, D: Tensor) -> Tensor:
        if self.spatial_average:
            return spatial_average(D, signed=self.signed_average)
        return D.abs()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, curvature: Any = None) -> Any:
        """One AdaHessian step; ``closure`` is required on refresh steps (every step by default)
        unless ``curvature=`` (a curvature operator over the parameters) gives the products."""
        t = self.global_step + 1
        due = (t - 1) % self.update_period == 0

        def refresh(params: list[Tensor]) -> bool:
            # Also when a parameter has its first gradient between scheduled refreshes: with no
            # estimate its denominator would be eps (the update_period > 1 explosion).
            return due or any(self.state[p].get("hessian_step", 0) == 0 for p in params)

        loss, items, estimates = hutchinson_refresh(
            self, closure, refresh=refresh, curvature=curvature, scheme=self.fd_scheme, model=self.model,
            what="AdaHessian",
        )
        for group, p in items:
            state = self.state[p]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros(p.shape, dtype=working_dtype(p.dtype), device=p.device)
                state["exp_hessian_diag_sq"] = torch.zeros(p.shape, dtype=working_dtype(p.dtype), device=p.device)
                state["step"] = 0
                state["hessian_step"] = 0
            beta1, beta2 = group["betas"]
            if p in estimates:
                D = self._curvature(estimates[p])
                state["exp_hessian_diag_sq"].mul_(beta2).addcmul_(D, D, value=1 - beta2)
                state["hessian_step"] += 1
            state["step"] += 1
            adahessian_update(
                p, p.grad, state["exp_avg"], state["exp_hessian_diag_sq"], step=state["step"],
                num_refreshes=state["hessian_step"], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], hessian_power=group["hessian_power"],
            )
        glob = self._global
        glob["global_step"] = t
        glob["num_refreshes"] += 1 if estimates else 0
        return loss
