"""Hessian-vector products by central differences of gradients, for models without a double backward.

``H v ≈ (g(θ + h v) − g(θ − h v)) / (2 h)`` (Nocedal & Wright, *Numerical Optimization*, 2nd ed.,
§8.1): two first-order gradients per column and no graph of the gradient, so it works through
kernels that have no double backward (``once_differentiable`` custom autograd functions, fused
attention kernels). The error is ``O(h²)`` truncation plus ``O(ε/h)`` rounding, balanced by
``h ∝ ε^(1/3)`` (see :func:`central_difference_step`). Used by
``Hessian(..., backend="finite_difference")``; ``docs/finite_difference.md`` gives measured errors.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "central_difference_step",
    "central_difference_products",
    "NoDoubleBackwardError",
    "lacks_double_backward",
    "once_differentiable_functions",
    "check_double_backward",
]


class NoDoubleBackwardError(RuntimeError):
    """An exact curvature product met an operation that PyTorch cannot differentiate twice."""


#: Messages PyTorch raises when a second backward meets an op without one.
_NO_DOUBLE_BACKWARD = re.compile(
    r"once_differentiable|differentiate twice|double backward|derivative for .*backward.* is not implemented"
    r"|is not implemented for .*backward",
    re.IGNORECASE,
)


def lacks_double_backward(exc: BaseException) -> bool:
    """Whether ``exc`` is PyTorch's error for an op without a double backward.

    Examples:
        >>> lacks_double_backward(RuntimeError("trying to differentiate twice a function that was "
        ...                                    "marked with @once_differentiable"))
        True
        >>> lacks_double_backward(RuntimeError("shape mismatch"))
        False
    """
    return isinstance(exc, (RuntimeError, NotImplementedError)) and bool(_NO_DOUBLE_BACKWARD.search(str(exc)))


def once_differentiable_functions(output: Tensor) -> list[str]:
    """Names of the custom autograd Functions in ``output``'s graph whose backward is marked
    ``@once_differentiable``.

    A second backward through such a Function does not always raise: when its gradient output
    reaches the parameters only through the Function's own backward, autograd silently drops that
    path and the "Hessian" is wrong (0.82 relative error on a two-layer MLP with a once-differentiable
    tanh). So the graph is inspected before an exact product uses it.

    Examples:
        >>> from torch.autograd.function import once_differentiable
        >>> class Square(torch.autograd.Function):
        ...     @staticmethod
        ...     def forward(ctx, x):
        ...         ctx.save_for_backward(x)
        ...         return x * x
        ...     @staticmethod
        ...     @once_differentiable
        ...     def backward(ctx, g):
        ...         (x,) = ctx.saved_tensors
        ...         return 2 * x * g
        >>> once_differentiable_functions(Square.apply(torch.ones(2, requires_grad=True)).sum())
        ['Square']
    """
    found: list[str] = []
    seen: set[Any] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        cls = getattr(node, "_forward_cls", None)
        backward = getattr(cls, "backward", None)
        code = getattr(backward, "__code__", None)
        once = code is not None and hasattr(backward, "__wrapped__") and code.co_filename == _FUNCTION_FILE
        if cls is not None and once:
            found.append(cls.__name__)
        stack.extend(f for f, _ in node.next_functions)
    return sorted(set(found))


_FUNCTION_FILE = torch.autograd.function.__file__


def check_double_backward(output: Tensor, operator: str) -> None:
    """Raise :class:`NoDoubleBackwardError` if ``output``'s graph holds a ``once_differentiable``
    Function (an exact curvature product through it would be wrong or fail)."""
    names = once_differentiable_functions(output)
    if names:
        raise NoDoubleBackwardError(
            f"{operator}: the model uses {', '.join(names)}, whose backward is marked @once_differentiable (no "
            "double backward), so exact curvature products through it would be wrong; "
            "Hessian(..., backend='finite_difference') computes the products from gradients alone"
        )


def central_difference_step(params: Sequence[Tensor], v: Sequence[Tensor]) -> float:
    """The step ``h`` of one column ``v`` (per parameter ``v[i]`` shaped like ``params[i]``).

    Each parameter asks for ``ε_i^(1/3) (1 + ‖θ_i‖) / ‖v‖`` with ``ε_i`` the machine epsilon of its
    own dtype; the step is the largest of these: the columns of ``H v`` couple every parameter,
    so the step is one scalar, and the coarsest dtype's rounding error (``ε/h``) dominates. 0
    for a zero column.

    Examples:
        >>> h = central_difference_step([torch.ones(3, dtype=torch.float64)], [torch.ones(3, dtype=torch.float64)])
        >>> round(h / (torch.finfo(torch.float64).eps ** (1 / 3) * (1 + 3 ** 0.5) / 3 ** 0.5), 12)
        1.0
    """
    vnorm = math.sqrt(sum(float(x.detach().double().pow(2).sum()) for x in v))
    if vnorm == 0.0:
        return 0.0
    steps = [
        torch.finfo(p.dtype).eps ** (1.0 / 3.0) * (1.0 + float(p.detach().double().norm())) / vnorm
        for p in params
        if p.is_floating_point() or p.is_complex()
    ]
    return max(steps)


def central_difference_products(
    gradient: Callable[[list[Tensor]], Sequence[Tensor]], params: Sequence[Tensor], V: Sequence[Tensor]
) -> list[Tensor]:
    """``H V`` by central differences: ``gradient(θ')`` is the loss's gradient at parameters ``θ'``
    (a list shaped like ``params``); ``V`` holds the columns per parameter, ``(k, *shape)`` each.

    Examples:
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> grad = lambda ps: [A @ ps[0]]          # the gradient of x^T A x / 2
        >>> theta = torch.zeros(2, dtype=torch.float64)
        >>> HV = central_difference_products(grad, [theta], [torch.eye(2, dtype=torch.float64)])
        >>> torch.allclose(HV[0], A)
        True
    """
    k = V[0].shape[0]
    base = [p.detach() for p in params]
    out = [torch.zeros_like(v) for v in V]
    for c in range(k):
        column = [v[c] for v in V]
        h = central_difference_step(base, column)
        if h == 0.0:
            continue
        plus = gradient([p + (h * u).to(p.dtype) for p, u in zip(base, column)])
        minus = gradient([p - (h * u).to(p.dtype) for p, u in zip(base, column)])
        for o, gp, gm in zip(out, plus, minus):
            o[c] = ((gp - gm) / (2.0 * h)).to(o.dtype)
    return out
