"""Selecting the parameters an operator differentiates with respect to."""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

from torch import Tensor, nn

__all__ = ["select_parameters", "ParamSpec"]

ParamSpec = Union[None, Sequence[str], Sequence[Tensor], Callable[[str, Tensor], bool]]


def select_parameters(model: nn.Module, params: ParamSpec = None) -> tuple[list[str], list[Tensor]]:
    """Resolve a parameter selection to ``(names, tensors)`` in the model's parameter order.

    ``params`` may be ``None`` (all parameters that require grad), a sequence of names (a tied
    parameter may be named by any of its names; it is listed under its first), a sequence of
    the model's parameter tensors, or a predicate ``(name, tensor) -> bool``.

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
        >>> select_parameters(m, ["1.weight"])[0]
        ['1.weight']
        >>> select_parameters(m, lambda n, p: n.endswith("bias"))[0]
        ['0.bias', '1.bias']
    """
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError("the model has no parameters that require grad; pass params= or call requires_grad_()")
    elif callable(params):
        chosen = [(n, p) for n, p in named if params(n, p)]
    else:
        chosen = _from_sequence(named, [_canonical_name(model, i) for i in params])
    if not chosen:
        raise ValueError("params= selects no parameters")
    for name, p in chosen:
        if not p.requires_grad:
            raise ValueError(
                f"parameter {name!r} does not require grad; call .requires_grad_() or leave it out of params="
            )
    dtypes = {p.dtype for _, p in chosen}
    if len(dtypes) > 1:
        raise TypeError(f"selected parameters have mixed dtypes {sorted(map(str, dtypes))}; use one dtype")
    devices = {p.device for _, p in chosen}
    if len(devices) > 1:
        raise ValueError(f"selected parameters live on several devices {sorted(map(str, devices))}")
    return [n for n, _ in chosen], [p for _, p in chosen]


def _canonical_name(model: nn.Module, item: Any) -> Any:
    """A tied parameter's other name (``lm_head.weight`` tied to ``embed.weight``) -> the name
    ``named_parameters()`` lists it under."""
    if not isinstance(item, str):
        return item
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
        if name == item:
            return first[id(p)]
    return item


def _from_sequence(named: list[tuple[str, Tensor]], items: list[Any]) -> list[tuple[str, Tensor]]:
    if all(isinstance(i, str) for i in items):
        lookup = dict(named)
        missing = [i for i in items if i not in lookup]
        if missing:
            raise ValueError(f"unknown parameter names {missing}; the model has {list(lookup)[:8]}...")
        wanted = set(items)
        return [(n, p) for n, p in named if n in wanted]
    if all(isinstance(i, Tensor) for i in items):
        ids = {id(i) for i in items}
        chosen = [(n, p) for n, p in named if id(p) in ids]
        if len(chosen) != len(ids):
            raise ValueError("params= contains tensors that are not parameters of the model")
        return chosen
    raise TypeError("params= must be None, parameter names, parameter tensors, or a predicate (name, tensor) -> bool")
