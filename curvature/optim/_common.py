"""Shared machinery of the curvature optimizers: closure evaluation, state that keeps its float32
dtype across ``load_state_dict``, the probe generator's state, and the refusal of complex
parameters (argument checks live in :mod:`curvature.checks`)."""

from __future__ import annotations

import math
from itertools import chain
from typing import Any, Callable, Iterator

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..probes import make_generator

__all__ = [
    "CurvatureOptimizer",
    "NonFiniteError",
    "evaluate_closure",
]


class NonFiniteError(FloatingPointError):
    """A loss or curvature estimate was NaN or infinite; no parameter or state was updated.

    Examples:
        >>> issubclass(NonFiniteError, FloatingPointError)
        True
    """


def evaluate_closure(closure: Callable[[], Any] | None, *, what: str) -> Tensor:
    """Call ``closure`` with gradients enabled and return its loss, refusing a missing closure,
    one that returns no loss, and a non-finite loss."""
    if closure is None:
        raise ValueError(
            f"{what} needs a closure: def closure(): opt.zero_grad(); loss = loss_fn(model(X), y); "
            "loss.backward(); return loss, then opt.step(closure)"
        )
    if not callable(closure):
        raise TypeError(f"closure must be callable, got {type(closure).__name__}")
    with torch.enable_grad():
        loss = closure()
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        loss = torch.tensor(float(loss))
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError(
            f"the closure must return the loss (a scalar tensor) for {what}, got "
            f"{type(loss).__name__ if not isinstance(loss, Tensor) else f'a tensor of shape {tuple(loss.shape)}'}"
        )
    if not math.isfinite(float(loss.detach())):
        raise NonFiniteError(f"the closure returned a non-finite loss ({float(loss.detach())}) in {what}; "
                             "nothing was updated")
    return loss


class CurvatureOptimizer(Optimizer):
    """An :class:`torch.optim.Optimizer` with one global step counter and probe generator kept in
    the first parameter's state, and float32 state for half-precision parameters that survives
    :meth:`load_state_dict` (the base class would cast it to the parameters' dtype)."""

    _GLOBAL_KEYS = ("global_step", "generator_state", "num_refreshes")

    def __init__(self, params: Any, defaults: dict[str, Any], *, generator: torch.Generator | None):
        super().__init__(params, defaults)
        device = self.param_groups[0]["params"][0].device
        self._generator = make_generator(generator, device)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Refused by name: u ⊙ Hu and the clipped/RMS updates have no complex meaning here, and
        # the probe draw would fail with an internal error.
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if isinstance(p, Tensor) and p.is_complex():
                raise TypeError(f"{type(self).__name__} does not support complex parameters (got one of shape "
                                f"{tuple(p.shape)} and dtype {p.dtype}); optimize real and imaginary parts as "
                                "separate real parameters (torch.view_as_real)")
        super().add_param_group({**param_group, "params": params})

    # -- parameters ------------------------------------------------------------------------------
    def _params_with_grad(self) -> Iterator[tuple[dict[str, Any], Tensor]]:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise TypeError(f"{type(self).__name__} does not support sparse gradients")
                    yield group, p

    def _anchor(self) -> Tensor:
        return self.param_groups[0]["params"][0]

    @property
    def _global(self) -> dict[str, Any]:
        state = self.state[self._anchor()]
        if "global_step" not in state:
            state["global_step"] = 0
            state["num_refreshes"] = 0
        return state

    @property
    def global_step(self) -> int:
        """Steps taken so far (the next step is ``global_step + 1``)."""
        return int(self._global["global_step"])

    @property
    def generator(self) -> torch.Generator:
        """The probe generator (its state is saved in :meth:`state_dict`)."""
        return self._generator

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self._global["generator_state"] = self._generator.get_state()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; tensors keep their saved dtypes and the probe generator its
        saved state, so the continuation is bit-identical."""
        saved = {
            key: {name: value for name, value in entry.items() if isinstance(value, Tensor)}
            for key, entry in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        id_map = dict(
            zip(
                chain.from_iterable(g["params"] for g in state_dict["param_groups"]),
                chain.from_iterable(g["params"] for g in self.param_groups),
            )
        )
        for key, tensors in saved.items():
            param = id_map[key]
            for name, value in tensors.items():
                self.state[param][name] = value.to(device=param.device).clone()
        gen_state = self._global.get("generator_state")
        if gen_state is not None:
            self._generator.set_state(gen_state.cpu())
