"""Dense test matrices with known spectra, all float64."""

from __future__ import annotations

import torch
from torch import Tensor


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def with_spectrum(eigenvalues: Tensor, seed: int = 0) -> Tensor:
    """Symmetric matrix ``Q diag(eigenvalues) Qᵀ`` with a random orthogonal ``Q``."""
    n = eigenvalues.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen(seed)))
    A = (Q * eigenvalues.to(torch.float64)) @ Q.T
    return (A + A.T) / 2


def psd(n: int = 60, seed: int = 1) -> Tensor:
    return with_spectrum(0.1 + 2 * torch.rand(n, dtype=torch.float64, generator=gen(seed)), seed)


def indefinite(n: int = 60, seed: int = 2) -> Tensor:
    return with_spectrum(torch.randn(n, dtype=torch.float64, generator=gen(seed)), seed)


def low_rank_plus_noise(n: int = 60, rank: int = 5, seed: int = 3) -> Tensor:
    g = gen(seed)
    top = 5 + 10 * torch.rand(rank, dtype=torch.float64, generator=g)
    return with_spectrum(torch.cat([top, 0.05 * torch.randn(n - rank, dtype=torch.float64, generator=g)]), seed)


def fast_decay(n: int = 300, power: float = 1.5, seed: int = 4) -> Tensor:
    return with_spectrum(torch.arange(1, n + 1, dtype=torch.float64) ** -power, seed)


def low_rank(n: int, rank: int, seed: int = 5) -> Tensor:
    g = gen(seed)
    return with_spectrum(torch.cat([1 + torch.rand(rank, dtype=torch.float64, generator=g),
                                    torch.zeros(n - rank, dtype=torch.float64)]), seed)


MATRICES = {"psd": psd, "indefinite": indefinite, "low_rank_plus_noise": low_rank_plus_noise}
