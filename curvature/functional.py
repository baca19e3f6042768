"""Calling a module as a function of (a subset of) its parameters, for ``torch.func`` transforms."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["with_parameters"]


class _Calling(nn.Module):
    """Holds ``model`` as a submodule so ``functional_call`` can swap its parameters around ``fn()``."""

    def __init__(self, model: nn.Module, fn: Callable[[], Any]):
        super().__init__()
        self.inner = model
        self.fn = fn

    def forward(self) -> Any:
        return self.fn()


def with_parameters(model: nn.Module, names: Sequence[str], fn: Callable[[], Any]) -> Callable[..., Any]:
    """Return ``f(*params) -> fn()`` evaluated with ``model``'s named parameters replaced by ``params``.

    ``fn`` calls the model however its caller does (an operator's one forward path, with its
    input casts and output selection); parameters not in ``names`` and buffers keep their
    current values (detached), so ``torch.func`` transforms see only ``params``.

    Examples:
        >>> import torch
        >>> m = nn.Linear(2, 1)
        >>> f = with_parameters(m, ["weight"], lambda: m(torch.ones(1, 2)))
        >>> f(torch.zeros(1, 2)).item() == m.bias.item()
        True
    """
    names = list(names)
    selected = set(names)
    rest = {f"inner.{n}": p.detach() for n, p in model.named_parameters() if n not in selected}
    rest.update({f"inner.{n}": b for n, b in model.named_buffers()})
    calling = _Calling(model, fn)
    keys = [f"inner.{n}" for n in names]

    def f(*params: Tensor) -> Any:
        return functional_call(calling, {**rest, **dict(zip(keys, params))}, (), strict=False)

    return f
