"""Working precision of iterative methods on half-precision operators.

Products of a bfloat16/float16 model carry about 3 (bfloat16) or 4 (float16) significant
digits. The methods built on them (Lanczos, CG, estimators) must not also do their own
arithmetic in that precision: a Lanczos breakdown test at ``100 eps(bfloat16) = 0.78`` flags
almost every step, and orthogonality is lost after a few steps. :func:`in_working_precision`
presents such an operator in float32: vectors are rounded to the operator's dtype on the way in
and the products come back as float32; everything else runs in float32.

The curvature operators compute in the model's dtype: a bfloat16 model gives bfloat16 products,
measured 3e-3 to 4e-3 relative error against the float64 product of the same weights (tested
bound 2e-2), a float16 model 4e-4 to 5e-4 (bound 2.5e-3; ``tests/curvature/test_half_precision.py``).
With ``compute_dtype=torch.float32`` they analyse a float32 :class:`ComputeCopy` of the model
instead (kept in sync with it before every product) and the products of the bfloat16 weights are
float32-accurate (measured 1e-7, bound 1e-5).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .data import map_tensors
from .linear_operator import LinearOperator, as_operator

__all__ = ["working_dtype", "in_working_precision", "ComputeCopy"]

_HALF = (torch.float16, torch.bfloat16)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision dtypes, ``dtype`` itself otherwise.

    Examples:
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

    Examples:
        >>> A = in_working_precision(torch.eye(3, dtype=torch.bfloat16))
        >>> A.dtype, (A @ torch.ones(3)).dtype
        (torch.float32, torch.float32)
    """
    A = as_operator(op)
    if A.dtype not in _HALF:
        return A
    return _Upcast(A)


def _cast_floating(obj: Any, dtype: torch.dtype) -> Any:
    return map_tensors(lambda t: t.to(dtype) if t.is_floating_point() else t, obj)


class ComputeCopy:
    """A copy of ``model`` in ``dtype`` that follows the original (products in float32 on a
    bfloat16 model, without the user copying it).

    :meth:`sync` (called before every product) copies the original's parameters, buffers and
    train/eval modes into the copy when they changed (a float64 checksum of every tensor, so
    ``p.data`` edits are seen too); the copy costs one model's worth of memory in ``dtype``.

    Examples:
        >>> from torch import nn
        >>> m = nn.Linear(2, 1).to(torch.bfloat16)
        >>> cc = ComputeCopy(m, torch.float32)
        >>> cc.model.weight.dtype
        torch.float32
        >>> with torch.no_grad():
        ...     _ = m.weight.fill_(1.0)
        >>> cc.sync(); cc.model.weight.tolist()
        [[1.0, 1.0]]
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        import copy

        if not dtype.is_floating_point:
            raise ValueError(f"compute_dtype must be a floating-point dtype, got {dtype}")
        self.original = model
        self.dtype = dtype
        self.model = copy.deepcopy(model).to(dtype)
        self._fingerprint = self._checksum()

    def _tensors(self, model: torch.nn.Module) -> list[Tensor]:
        return [*model.parameters(), *model.buffers()]

    def _checksum(self) -> tuple:
        with torch.no_grad():
            sums = tuple(float(t.detach().double().sum()) for t in self._tensors(self.original))
        return sums + tuple(m.training for m in self.original.modules())

    def sync(self) -> None:
        """Bring the copy up to date with the original (no-op when nothing changed)."""
        fingerprint = self._checksum()
        if fingerprint == self._fingerprint:
            return
        with torch.no_grad():
            for dst, src in zip(self._tensors(self.model), self._tensors(self.original)):
                dst.copy_(src.to(dst.dtype) if dst.is_floating_point() else src)
        for dst, src in zip(self.model.modules(), self.original.modules()):
            dst.training = src.training
        self._fingerprint = fingerprint

    def cast_inputs(self, inputs: Any) -> Any:
        """Floating-point tensors of ``inputs`` in the compute dtype."""
        return _cast_floating(inputs, self.dtype)
