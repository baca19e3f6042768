"""Private linear-algebra helpers of the core (M-FAC inverses, CG): precision guards and factorizations."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor

__all__ = ["all_finite", "no_tf32", "stable_cholesky"]


@contextlib.contextmanager
def no_tf32(device: torch.device) -> Iterator[None]:
    """Disable TF32 matmuls on CUDA for the block: its 10-bit mantissa wrecks the M-FAC algebra."""
    if torch.device(device).type != "cuda":
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def all_finite(x: Tensor) -> bool:
    """Whether ``x`` has no NaN/inf, via one sum (a NaN/inf poisons it); exact check only if it overflows."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def stable_cholesky(A: Tensor, floor: float) -> Tensor:
    """Cholesky factor of a batch of SPD matrices whose eigenvalues are known to be ``>= floor``.

    Rounding can make ``A`` numerically indefinite when ``floor`` is tiny next to ``||A||``; then
    the eigenvalues are clamped to ``floor`` (their exact-arithmetic lower bound) and refactored.
    """
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info > 0).any()):
        w, Q = torch.linalg.eigh(A)
        A = (Q * w.clamp_min(floor).unsqueeze(-2)) @ Q.transpose(-1, -2)
        L = torch.linalg.cholesky(A)
    return L
