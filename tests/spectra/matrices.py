"""Dense symmetric test matrices with known spectra (float64, fixed seeds)."""

from __future__ import annotations

import torch


def symmetric_with_spectrum(eigenvalues: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """``Q diag(eigenvalues) Qᵀ`` with a Haar-random orthogonal ``Q``."""
    g = torch.Generator().manual_seed(seed)
    d = eigenvalues.numel()
    Q, R = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(R))
    A = (Q * eigenvalues.to(torch.float64)) @ Q.T
    return (A + A.T) / 2


def goe(d: int, *, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, d, generator=g, dtype=torch.float64)
    return (X + X.T) / (2 * d**0.5)


def gen(seed: int = 1234) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
