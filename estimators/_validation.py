"""Argument checks shared by the estimators, and normalisation of the ``op`` argument."""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

from curvature import LinearOperator, as_operator

from .probes import DISTRIBUTIONS


class _MatmulOperator(LinearOperator):
    """Adapter for objects with ``shape``, ``dtype``, ``device`` and ``@`` on torch tensors.

    ``curvature.as_operator`` routes unknown objects through SciPy, which cannot call a torch
    operator from another library; the design promises that any such object works here.
    """

    def __init__(self, obj: Any):
        super().__init__(obj.shape[0], obj.dtype, torch.device(getattr(obj, "device", "cpu")))
        self.obj = obj

    def _matmat(self, V: Tensor) -> Tensor:
        return self.obj @ V


def as_square_operator(op: Any) -> LinearOperator:
    """Normalise ``op`` to a :class:`LinearOperator`, rejecting non-square or shapeless input."""
    if isinstance(op, LinearOperator):
        return op
    shape = getattr(op, "shape", None)
    if shape is None or not hasattr(op, "__matmul__"):
        raise TypeError(f"op must be an operator with .shape and @ (or a square tensor), got {type(op).__name__}")
    shape = tuple(shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"op must be a square (d, d) operator, got shape {shape}")
    if shape[0] < 1:
        raise ValueError("op must have dimension d >= 1, got shape (0, 0)")
    if isinstance(op, Tensor):
        if not op.is_floating_point():
            raise TypeError(f"op must be a floating-point tensor, got dtype {op.dtype}")
        return as_operator(op)
    if isinstance(getattr(op, "dtype", None), torch.dtype) and not hasattr(op, "matmat"):
        return _MatmulOperator(op)
    return as_operator(op)


def check_num_matvecs(num_matvecs: Any, *, method: str, multiple: int = 1, minimum: int = 1) -> int:
    """Return ``num_matvecs`` as an int after checking it is a positive multiple of ``multiple``."""
    if isinstance(num_matvecs, bool) or not isinstance(num_matvecs, numbers.Integral):
        raise TypeError(f"num_matvecs must be an int, got {type(num_matvecs).__name__}")
    num_matvecs = int(num_matvecs)
    if num_matvecs < minimum:
        raise ValueError(f"num_matvecs must be >= {minimum} for method={method!r}, got {num_matvecs}")
    if num_matvecs % multiple:
        why = {3: "a multiple of 3 (one third sketch, one third sketch products, one third residual)",
               2: "even (each XTrace/XDiag test vector costs two products)"}.get(multiple, f"a multiple of {multiple}")
        raise ValueError(f"num_matvecs must be {why} for method={method!r}, got {num_matvecs}")
    return num_matvecs


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def check_distribution(distribution: Any) -> str:
    return check_choice(distribution, "distribution", DISTRIBUTIONS)


def check_probe_batch_size(probe_batch_size: Any) -> int | None:
    if probe_batch_size is None:
        return None
    if isinstance(probe_batch_size, bool) or not isinstance(probe_batch_size, numbers.Integral):
        raise TypeError(f"probe_batch_size must be an int or None, got {type(probe_batch_size).__name__}")
    if probe_batch_size < 1:
        raise ValueError(f"probe_batch_size must be >= 1, got {probe_batch_size}")
    return int(probe_batch_size)


def check_rtol(rtol: Any) -> float | None:
    if rtol is None:
        return None
    if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real):
        raise TypeError(f"rtol must be a positive float or None, got {type(rtol).__name__}")
    if not rtol > 0 or rtol != rtol or rtol == float("inf"):
        raise ValueError(f"rtol must be a finite positive float, got {rtol}")
    return float(rtol)


def require_symmetric(op: LinearOperator, method: str) -> None:
    if not getattr(op, "is_symmetric", True):
        raise ValueError(f"method={method!r} needs a symmetric operator (op.is_symmetric is False)")
