"""Argument checks shared by every package of the toolkit (operators, estimators, spectra, inverses).

One place, so the same option is accepted and refused the same way everywhere: counts accept any
integral type (Python ints, NumPy integers) but not ``bool``; real-valued options accept Python
floats, NumPy scalars and 0-d tensors; every error names the argument and what was expected.

Examples:
    >>> import numpy as np
    >>> check_count(np.int64(3), name="k"), check_positive_float(1e-3, name="damping")
    (3, 0.001)
    >>> check_count(0, name="k")
    Traceback (most recent call last):
        ...
    ValueError: k must be >= 1, got 0
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

from torch import Tensor

__all__ = [
    "check_betas",
    "check_choice",
    "check_count",
    "check_damping",
    "check_optional_count",
    "check_positive_float",
    "check_real",
    "check_rtol",
    "check_tolerance",
]



def check_count(value: Any, *, name: str, minimum: int = 1, dim: int | None = None) -> int:
    """Return ``value`` as an ``int >= minimum`` (and ``<= dim``, the operator dimension, if given);
    ``TypeError`` for non-integers (and ``bool``).

    Examples:
        >>> check_count(5, name="num_matvecs", minimum=2)
        5
        >>> check_count(4, name="k", dim=3)
        Traceback (most recent call last):
            ...
        ValueError: k=4 exceeds the operator dimension d=3
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, Tensor) and value.ndim == 0 and not value.is_floating_point():
            value = int(value)
        else:
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if dim is not None and value > dim:
        raise ValueError(f"{name}={value} exceeds the operator dimension d={dim}")
    return int(value)


def check_optional_count(value: Any, *, name: str, minimum: int = 1) -> int | None:
    """:func:`check_count` that lets ``None`` through (meaning "choose a default").

    Examples:
        >>> check_optional_count(None, name="probe_batch_size") is None
        True
    """
    return None if value is None else check_count(value, name=name, minimum=minimum)


def check_real(value: Any, *, name: str, low: float = -math.inf, high: float = math.inf,
               low_open: bool = False, high_open: bool = False) -> float:
    """Return ``value`` as a finite float in the given interval (closed unless ``*_open``).

    Examples:
        >>> check_real(0.9, name="beta", low=0, high=1, high_open=True)
        0.9
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if isinstance(value, Tensor) and value.numel() != 1:
        raise TypeError(f"{name} must be a real number, got a tensor of shape {tuple(value.shape)}")
    x = float(value)
    too_low = x <= low if low_open else x < low
    too_high = x >= high if high_open else x > high
    if not math.isfinite(x) or too_low or too_high:
        lo = f"{'>' if low_open else '>='} {low:g}" if math.isfinite(low) else ""
        hi = f"{'<' if high_open else '<='} {high:g}" if math.isfinite(high) else ""
        bounds = " and ".join(b for b in (lo, hi) if b)
        raise ValueError(f"{name} must be a finite number{' ' + bounds if bounds else ''}, got {x}")
    return x


def check_positive_float(value: Any, *, name: str) -> float:
    """A finite float ``> 0``.

    Examples:
        >>> check_positive_float(2, name="rho")
        2.0
    """
    return check_real(value, name=name, low=0.0, low_open=True)


def check_damping(value: Any, *, name: str = "damping") -> float:
    """A damping ``λ`` of ``(A + λI)``: a finite float ``> 0``.

    Examples:
        >>> check_damping(1e-4)
        0.0001
    """
    return check_positive_float(value, name=name)


def check_tolerance(value: Any, *, name: str = "tol") -> float:
    """A relative tolerance: a finite float ``> 0`` (``tol`` means a relative residual everywhere).

    Examples:
        >>> check_tolerance(1e-6)
        1e-06
    """
    return check_positive_float(value, name=name)


def check_rtol(value: Any, *, name: str = "rtol") -> float | None:
    """An early-stopping relative standard error (``None`` = no early stop).

    Examples:
        >>> check_rtol(None) is None, check_rtol(0.01)
        (True, 0.01)
    """
    return None if value is None else check_positive_float(value, name=name)


def check_betas(value: Any, *, name: str = "betas") -> tuple[float, float]:
    """A pair of exponential-average coefficients, each in ``[0, 1)`` (the optimizers' ``betas``).

    Examples:
        >>> check_betas((0.9, 0.999))
        (0.9, 0.999)
    """
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {value!r}")
    return (
        check_real(value[0], name=f"{name}[0]", low=0.0, high=1.0, high_open=True),
        check_real(value[1], name=f"{name}[1]", low=0.0, high=1.0, high_open=True),
    )


def check_choice(value: Any, *, name: str, choices: Sequence[str]) -> str:
    """One of ``choices`` (strings), else a ``ValueError`` listing them.

    Examples:
        >>> check_choice("LA", name="which", choices=("LA", "SA"))
        'LA'
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value
