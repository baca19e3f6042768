"""Working precision of iterative methods on half-precision operators.

Products of a bfloat16/float16 model carry about 3 (bfloat16) or 4 (float16) significant
digits. The methods built on them (Lanczos, CG, estimators) must not also do their own
arithmetic in that precision: a Lanczos breakdown test at ``100 eps(bfloat16) = 0.78`` flags
almost every step, and orthogonality is lost after a few steps. :func:`in_working_precision`
presents such an operator in float32: vectors are rounded to the operator's dtype on the way in
and the products come back as float32; everything else runs in float32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .linear_operator import LinearOperator, as_operator

__all__ = ["working_dtype", "in_working_precision"]

_HALF = (torch.float16, torch.bfloat16)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision dtypes, ``dtype`` itself otherwise.

    Example:
        >>> working_dtype(torch.bfloat16), working_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.float32 if dtype in _HALF else dtype


class _Upcast(LinearOperator):
    def __init__(self, op: Any):
        super().__init__(op.shape[0], torch.float32, op.device, getattr(op, "blocks", None))
        self.inner = op
        self.is_symmetric = getattr(op, "is_symmetric", True)

    def _matmat(self, V: Tensor) -> Tensor:
        return (self.inner @ V.to(self.inner.dtype)).to(torch.float32)


def in_working_precision(op: Any) -> LinearOperator:
    """``op`` itself, or for a half-precision operator a float32 view of it.

    Example:
        >>> A = in_working_precision(torch.eye(3, dtype=torch.bfloat16))
        >>> A.dtype, (A @ torch.ones(3)).dtype
        (torch.float32, torch.float32)
    """
    A = as_operator(op)
    if A.dtype not in _HALF:
        return A
    return _Upcast(A)
