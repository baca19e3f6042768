"""Calling a module as a function of (a subset of) its parameters, for ``torch.func`` transforms."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import Tensor, nn
from torch.func import functional_call

from .data import call_model

__all__ = ["model_as_function"]


def model_as_function(model: nn.Module, names: Sequence[str], inputs: Any) -> Callable[..., Any]:
    """Return ``f(*params) -> model(inputs)`` with the named parameters replaced by ``params``.

    Parameters not in ``names`` and buffers keep their current values (detached).

    Example:
        >>> import torch
        >>> m = nn.Linear(2, 1)
        >>> f = model_as_function(m, ["weight"], torch.ones(1, 2))
        >>> f(torch.zeros(1, 2)).item() == m.bias.item()
        True
    """
    names = list(names)
    selected = set(names)
    rest = {n: p.detach() for n, p in model.named_parameters() if n not in selected}
    rest.update({n: b for n, b in model.named_buffers()})

    def f(*params: Tensor) -> Any:
        values = {**rest, **dict(zip(names, params))}
        return call_model(lambda *args, **kwargs: functional_call(model, values, args, kwargs, strict=False), inputs)

    return f
