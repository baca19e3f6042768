"""Estimator-specific argument checks (the generic ones live in :mod:`curvature.checks`)."""

from __future__ import annotations

from typing import Any

from curvature import LinearOperator
from curvature.checks import check_choice, check_count, check_optional_count
from curvature.probes import DISTRIBUTIONS

__all__ = ["check_distribution", "check_num_matvecs", "check_probe_batch_size", "require_symmetric"]


def check_num_matvecs(num_matvecs: Any, *, method: str, multiple: int = 1, minimum: int = 1) -> int:
    """Return ``num_matvecs`` as an int after checking it is a positive multiple of ``multiple``."""
    num_matvecs = check_count(num_matvecs, name="num_matvecs", minimum=1)
    if num_matvecs < minimum:
        raise ValueError(f"num_matvecs must be >= {minimum} for method={method!r}, got {num_matvecs}")
    if num_matvecs % multiple:
        why = {3: "a multiple of 3 (one third sketch, one third sketch products, one third residual)",
               2: "even (each XTrace/XDiag test vector costs two products)"}.get(multiple, f"a multiple of {multiple}")
        raise ValueError(f"num_matvecs must be {why} for method={method!r}, got {num_matvecs}")
    return num_matvecs


def check_distribution(distribution: Any) -> str:
    return check_choice(distribution, name="distribution", choices=DISTRIBUTIONS)


def check_probe_batch_size(probe_batch_size: Any) -> int | None:
    return check_optional_count(probe_batch_size, name="probe_batch_size")


def require_symmetric(op: LinearOperator, method: str) -> None:
    if not getattr(op, "is_symmetric", True):
        raise ValueError(f"method={method!r} needs a symmetric operator (op.is_symmetric is False)")
