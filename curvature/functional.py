"""Calling a module as a function of (a subset of) its parameters, for ``torch.func`` transforms."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Sequence

from torch import Tensor, nn
from torch.func import functional_call

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
    if isinstance(inputs, Mapping):
        args, kwargs = (), dict(inputs)
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(inputs), {}
    else:
        args, kwargs = (inputs,), {}

    def f(*params: Tensor) -> Any:
        return functional_call(model, {**rest, **dict(zip(names, params))}, args, kwargs, strict=False)

    return f
