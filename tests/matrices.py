"""The one module of test helpers shared by all test packages: generators, errors, test matrices.

Dense symmetric float64 matrices with known spectra, all from explicit seeds (never the global RNG).
"""

from __future__ import annotations

import torch
from torch import Tensor


def gen(seed: int = 1234) -> torch.Generator:
    """A CPU generator with a fixed seed."""
    return torch.Generator().manual_seed(seed)


def rel(a: Tensor, b: Tensor) -> float:
    """Relative error ``‖a − b‖ / ‖b‖`` (Frobenius)."""
    return float((a - b).norm() / b.norm())


def with_spectrum(eigenvalues: Tensor, seed: int = 0) -> Tensor:
    """``Q diag(eigenvalues) Qᵀ`` with a Haar-random orthogonal ``Q`` (float64, symmetrized)."""
    n = eigenvalues.numel()
    Q, R = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen(seed)))
    Q = Q * torch.sign(torch.diagonal(R))
    A = (Q * eigenvalues.to(torch.float64)) @ Q.T
    return (A + A.T) / 2


def goe(d: int, *, seed: int = 0) -> Tensor:
    """A Gaussian-orthogonal-ensemble matrix, ``(X + Xᵀ)/(2√d)``: a semicircle spectrum on about [-√2, √2]."""
    X = torch.randn(d, d, generator=gen(seed), dtype=torch.float64)
    return (X + X.T) / (2 * d**0.5)


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
