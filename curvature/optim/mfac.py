"""The M-FAC optimizer: gradient steps preconditioned by a sliding-window M-FAC inverse."""

from __future__ import annotations

import math
import numbers
from itertools import chain
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import SlidingMFACInverse
from ..checks import check_count, check_damping

__all__ = ["MFAC"]

_STATE_KEYS = ("mfac_window", "mfac_gram", "mfac_slot", "mfac_num_updates")


def _check_number(value: Any, name: str, low: float, high: float = math.inf, *, open_high: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (low <= value and (value < high if open_high else value <= high)):
        bound = f" and {'<' if open_high else '<='} {high}" if math.isfinite(high) else ""
        raise ValueError(f"{name} must be >= {low}{bound}, got {value}")
    return value


class MFAC(Optimizer):
    """M-FAC (Frantar et al., NeurIPS 2021): ``p ← p − lr · F⁻¹ g`` with ``F`` the damped
    empirical Fisher of the last ``num_grads`` step gradients.

    Each step flattens the gradients of ALL parameter groups into one vector ``g`` (weight decay
    is coupled: ``g = grad + weight_decay · p``, per group), pushes it into a
    :class:`~curvature.sliding_mfac.SlidingMFACInverse` window and applies ``u = F⁻¹ g`` for the
    new window (the cancellation-free in-window product). With ``momentum`` ``μ > 0`` the applied
    direction is the EMA ``v ← μ v + (1 − μ) u`` (not heavy-ball). The preconditioner is global;
    only ``lr``, ``momentum`` and ``weight_decay`` may differ per group, and ``num_grads`` and
    ``damping`` must be the same in all groups.

    The first steps are normalized steps, not ``1/damping``-sized ones: with one gradient in the
    window ``u = m g / (λ m + |g|²)``; so ``lr`` is roughly a step length relative to ``m / |g|``.
    As ``damping → ∞`` the method tends to SGD with learning rate ``lr / damping``.

    State (in :meth:`state_dict`, so a checkpoint resumes exactly): the window ``(m, d)`` and its
    float64 Gram matrix ``(m, m)``, the ring position and the update count (in the first
    parameter's state), plus each parameter's ``momentum_buffer``. Memory: ``m · d`` numbers in
    the parameters' dtype (float32 for half-precision parameters), on the parameters' device.
    Cost per step: two passes over the window plus an ``m x m`` Cholesky factorisation.

    Parameters whose ``.grad`` is ``None`` count as a zero gradient and are not updated.

    Args:
        params: parameters or parameter groups (all on one device, one dtype).
        lr: learning rate.
        num_grads: ``m``, the window size (reference default 1024).
        damping: ``λ > 0`` (reference: ``1e-5`` for vision, ``1e-6`` for BERT).
        momentum: EMA coefficient ``μ`` in ``[0, 1)``.
        weight_decay: coupled L2 coefficient ``>= 0``.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = MFAC([w], lr=0.5, num_grads=4, damping=1e-4)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     loss = (w ** 2).sum()
        ...     loss.backward()
        ...     opt.step()
        >>> float((w.detach() ** 2).sum()) < loss.item()
        True
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        *,
        num_grads: int = 1024,
        damping: float = 1e-6,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ):
        defaults = dict(
            lr=_check_number(lr, "lr", 0.0),
            num_grads=check_count(num_grads, name="num_grads"),
            damping=check_damping(damping),
            momentum=_check_number(momentum, "momentum", 0.0, 1.0, open_high=True),
            weight_decay=_check_number(weight_decay, "weight_decay", 0.0),
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; ``num_grads`` and ``damping`` must match the optimizer's, and the window's
        dimension is fixed once the first step has run."""
        if self.param_groups and self._window_state() is not None:
            raise ValueError("cannot add parameters after the first step: the M-FAC window's dimension is fixed")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_number(group["lr"], "lr", 0.0)
        _check_number(group["momentum"], "momentum", 0.0, 1.0, open_high=True)
        _check_number(group["weight_decay"], "weight_decay", 0.0)
        self._check_global(group)

    def _check_global(self, group: dict[str, Any]) -> None:
        for key in ("num_grads", "damping"):
            if group[key] != self.defaults[key]:
                raise ValueError(
                    f"{key} is global to the M-FAC preconditioner: every parameter group must use "
                    f"{key}={self.defaults[key]}, got {group[key]}"
                )

    # -- state -----------------------------------------------------------------------------------
    def _anchor(self) -> Tensor:
        return self.param_groups[0]["params"][0]

    def _window_state(self) -> dict[str, Any] | None:
        state = self.state.get(self._anchor())
        return state if state and "mfac_window" in state else None

    def _preconditioner(self, dim: int, dtype: torch.dtype, device: torch.device) -> SlidingMFACInverse:
        group = self.param_groups[0]
        m, damping = check_count(group["num_grads"], name="num_grads"), check_damping(group["damping"])
        for other in self.param_groups[1:]:
            if other["num_grads"] != m or other["damping"] != damping:
                raise ValueError("num_grads and damping must be the same in all parameter groups")
        state = self._window_state()
        if state is None:
            state = self.state[self._anchor()]
            state["mfac_window"] = torch.zeros(m, dim, dtype=dtype, device=device)
            state["mfac_gram"] = torch.zeros(m, m, dtype=torch.float64, device=device)
            state["mfac_slot"] = 0
            state["mfac_num_updates"] = 0
        elif tuple(state["mfac_window"].shape) != (m, dim):
            raise ValueError(
                f"the M-FAC window has shape {tuple(state['mfac_window'].shape)} but num_grads={m} and "
                f"the parameters have {dim} entries; num_grads and the parameters cannot change between steps"
            )
        return SlidingMFACInverse.from_buffers(
            state["mfac_window"], state["mfac_gram"], damping=damping,
            slot=state["mfac_slot"], num_updates=state["mfac_num_updates"],
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; the window and Gram matrix keep their saved dtypes.

        (The base class casts floating state to the parameters' dtype, which would round the
        float64 Gram matrix and change the continuation.)
        """
        saved = {
            key: (value["mfac_window"], value["mfac_gram"])
            for key, value in state_dict["state"].items()
            if isinstance(value, dict) and "mfac_window" in value
        }
        super().load_state_dict(state_dict)
        id_map = dict(
            zip(
                chain.from_iterable(g["params"] for g in state_dict["param_groups"]),
                chain.from_iterable(g["params"] for g in self.param_groups),
            )
        )
        for key, (window, gram) in saved.items():
            param = id_map[key]
            self.state[param]["mfac_window"] = window.to(device=param.device)
            self.state[param]["mfac_gram"] = gram.to(device=param.device, dtype=torch.float64)

    # -- step ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One M-FAC step; ``closure`` (re-evaluating the loss with gradients) is optional."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for group in self.param_groups for p in group["params"]]
        devices = {p.device for p in params}
        dtypes = {p.dtype for p in params}
        if len(devices) > 1:
            raise ValueError(f"MFAC needs all parameters on one device, got {sorted(map(str, devices))}")
        if len(dtypes) > 1:
            raise TypeError(f"MFAC needs all parameters in one dtype, got {sorted(map(str, dtypes))}")
        (device,), (param_dtype,) = devices, dtypes
        dtype = torch.float32 if param_dtype in (torch.float16, torch.bfloat16) else param_dtype

        pieces = []
        for group in self.param_groups:
            wd = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    pieces.append(torch.zeros(p.numel(), dtype=dtype, device=device))
                    continue
                if p.grad.is_sparse:
                    raise TypeError("MFAC does not support sparse gradients")
                grad = p.grad.reshape(-1).to(dtype)
                if wd:
                    grad = grad.add(p.reshape(-1).to(dtype), alpha=wd)
                pieces.append(grad)
        g = torch.cat(pieces)

        inverse = self._preconditioner(g.numel(), dtype, device)
        u = inverse.update_and_multiply(g)
        state = self.state[self._anchor()]
        state["mfac_slot"], state["mfac_num_updates"] = inverse.slot, inverse.num_updates

        offset = 0
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                n = p.numel()
                direction = u[offset : offset + n].view_as(p)
                offset += n
                if p.grad is None:
                    continue
                if mu:
                    buf = self.state[p].get("momentum_buffer")
                    if buf is None:
                        buf = self.state[p]["momentum_buffer"] = torch.zeros_like(direction)
                    buf.mul_(mu).add_(direction, alpha=1 - mu)
                    direction = buf
                p.add_(direction.to(p.dtype), alpha=-lr)
        return loss
