"""Selecting the parameters an operator differentiates with respect to.

Every ``params=`` in the toolkit goes through :func:`select_parameters`, so all of them accept the
same forms: ``None``, names, glob patterns over names (``"transformer.h.*.attn.*"``, as
hessian-eigenthings' ``match_names``), parameter tensors, or a predicate.
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable, Iterable, Sequence, Union

from torch import Tensor, nn

__all__ = ["select_parameters", "ParamSpec", "match_names", "is_pattern"]

ParamSpec = Union[None, str, Sequence[str], Sequence[Tensor], Callable[[str, Tensor], bool]]

#: Characters that make a name a glob pattern (:mod:`fnmatch`).
_GLOB_CHARS = frozenset("*?[")


def is_pattern(name: str) -> bool:
    """Whether ``name`` is a glob pattern (contains ``*``, ``?`` or ``[``) rather than a name.

    Examples:
        >>> is_pattern("transformer.h.*.attn.*"), is_pattern("fc1.weight")
        (True, False)
    """
    return any(c in _GLOB_CHARS for c in name)


def _closest(item: str, names: Sequence[str], count: int = 5) -> list[str]:
    """The names most like ``item`` (for a pattern: like its literal part), best first."""
    literal = "".join(c for c in item if c not in _GLOB_CHARS)
    close = difflib.get_close_matches(literal, list(names), n=count, cutoff=0.0)
    return close or list(names)[:count]


def match_names(
    names: Iterable[str], items: str | Sequence[str], *, what: str = "parameter", option: str = "params"
) -> list[str]:
    """The names in ``names`` (kept in their order) equal to one of ``items`` or matching one of
    its glob patterns (:func:`fnmatch.fnmatchcase`: ``*`` also crosses dots).

    Each item must select something: an unknown name or a pattern that matches nothing raises
    ``ValueError`` naming the closest names, since a silently empty selection would give a
    curvature of the wrong parameters.

    Examples:
        >>> names = ["h.0.attn.weight", "h.0.mlp.weight", "h.1.attn.weight", "ln_f.weight"]
        >>> match_names(names, "h.*.attn.*")
        ['h.0.attn.weight', 'h.1.attn.weight']
        >>> match_names(names, ["ln_f.weight", "h.1.*"])
        ['h.1.attn.weight', 'ln_f.weight']
    """
    names = list(names)
    items = [items] if isinstance(items, str) else list(items)
    chosen: set[str] = set()
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{option}= mixes names with {type(item).__name__}; use names (or patterns) only")
        hits = fnmatch.filter(names, item) if is_pattern(item) else [item] if item in names else []
        if not hits:
            found = (f"the {what} pattern {item!r} matches nothing" if is_pattern(item)
                     else f"unknown {what} names [{item!r}]")
            raise ValueError(f"{option}=: {found}; closest {what} names: {_closest(item, names)} ({len(names)} in all)")
        chosen.update(hits)
    return [n for n in names if n in chosen]


def select_parameters(model: nn.Module, params: ParamSpec = None) -> tuple[list[str], list[Tensor]]:
    """Resolve a parameter selection to ``(names, tensors)`` in the model's parameter order.

    ``params`` may be ``None`` (all parameters that require grad), a name or glob pattern, a
    sequence of names and patterns (a tied parameter may be named by any of its names; it is listed
    under its first), a sequence of the model's parameter tensors, or a predicate
    ``(name, tensor) -> bool``. Patterns follow :mod:`fnmatch` (``*`` also crosses dots) and skip
    frozen parameters; a name or pattern that matches nothing is an error that names the closest
    parameter names.

    Examples:
        >>> m = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
        >>> select_parameters(m, ["1.weight"])[0]
        ['1.weight']
        >>> select_parameters(m, "*.bias")[0]
        ['0.bias', '1.bias']
        >>> select_parameters(m, lambda n, p: n.endswith("bias"))[0]
        ['0.bias', '1.bias']
    """
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError("the model has no parameters that require grad; pass params= or call requires_grad_()")
    elif isinstance(params, str):
        chosen = _from_sequence(model, named, [params])
    elif callable(params):
        chosen = [(n, p) for n, p in named if params(n, p)]
    else:
        chosen = _from_sequence(model, named, list(params))
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


def _canonical_names(model: nn.Module) -> dict[str, str]:
    """Every name of every parameter -> the name ``named_parameters()`` lists it under (a tied
    ``lm_head.weight`` -> ``embed.weight``)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(p), name)
    return out


def _from_sequence(model: nn.Module, named: list[tuple[str, Tensor]], items: list[Any]) -> list[tuple[str, Tensor]]:
    if items and all(isinstance(i, str) for i in items):
        canonical = _canonical_names(model)
        trainable = {n for n, p in named if p.requires_grad}
        wanted: set[str] = set()
        for item in items:
            if is_pattern(item):
                hits = {canonical[n] for n in match_names(canonical, item)}
                # A pattern covers a region of the model; its frozen parameters are not an error.
                live = hits & trainable
                if not live:
                    raise ValueError(
                        f"params=: the pattern {item!r} matches only parameters that do not require grad: "
                        f"{sorted(hits)[:8]}"
                    )
                wanted |= live
            else:
                wanted.add(canonical[match_names(canonical, item)[0]])
        return [(n, p) for n, p in named if n in wanted]
    if items and all(isinstance(i, Tensor) for i in items):
        ids = {id(i) for i in items}
        chosen = [(n, p) for n, p in named if id(p) in ids]
        if len(chosen) != len(ids):
            raise ValueError("params= contains tensors that are not parameters of the model")
        return chosen
    if not items:
        raise ValueError("params= is empty; pass None for all parameters")
    raise TypeError(
        "params= must be None, parameter names or glob patterns, parameter tensors, "
        "or a predicate (name, tensor) -> bool"
    )
