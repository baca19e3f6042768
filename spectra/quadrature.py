"""The numerics of a spectral density from Gauss quadratures: kernel widths, grids, the
Gaussian-broadened density, the log-|λ| density and spectral sums (Spec 03 §3-§6).

Pure functions of the quadrature nodes ``(num_probes, m)`` and weights; :class:`spectra.
SpectralDensity` holds the result and delegates here.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["KAPPA", "MARGIN", "as_f64", "default_sigma", "support", "default_grid", "resolve_sigma",
           "broadened_density", "log_density", "spectral_sum_samples"]

#: Papyan's (JMLR 2020, App. D.2) kernel parameter: Gaussians of neighbouring nodes meet at
#: 1/KAPPA of their peak.
KAPPA = 3.0
#: Relative margin added on each side of the node range for the default grid.
MARGIN = 0.05


def default_sigma(lo: float, hi: float, num_steps: int, *, kappa: float = KAPPA) -> float:
    """Default Gaussian standard deviation for a density from ``num_steps``-node quadratures.

    Lin–Saad–Yang's heuristic as used by Papyan (App. D.2) and curvlinops: with the range
    ``[lo, hi]`` widened by 5 % per side and ``m`` nodes, the spacing is ``h = width/(m − 1)``
    and ``σ = h / √(8 ln κ)`` (``κ = 3``), so a Gaussian at distance ``h/2`` is ``1/κ`` of its
    peak. About ``R/(3(m − 1))`` for a range ``R``; more steps give a sharper density.

    Examples:
        >>> round(default_sigma(0.0, 1.0, 101), 5)
        0.00371
    """
    width = (hi - lo) * (1 + 2 * MARGIN)
    if width <= 0:
        width = max(abs(lo), abs(hi), 1.0) * 1e-3
    return width / (max(num_steps, 2) - 1) / math.sqrt(8 * math.log(kappa))


def as_f64(x: Any) -> Tensor:
    return (
        torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
        .detach()
        .to("cpu", torch.float64)
    )



def support(nodes: Tensor, weights: Tensor) -> tuple[float, float]:
    """Smallest and largest node carrying weight (zero-weight nodes come from restarts after a
    breakdown and carry no mass)."""
    s = nodes[weights > 0]
    return float(s.min()), float(s.max())


def default_grid(nodes: Tensor, weights: Tensor, sigma: float, num_points: int) -> Tensor:
    """Uniform grid over the node range plus ``max(5 % of the range, 5σ)`` on each side."""
    lo, hi = support(nodes, weights)
    pad = max(MARGIN * (hi - lo), 5 * sigma)
    return torch.linspace(lo - pad, hi + pad, num_points, dtype=torch.float64)


def resolve_sigma(nodes: Tensor, weights: Tensor, sigma: float | None, sigma_squared: float | None) -> float:
    """The kernel standard deviation from ``sigma`` or PyHessian's relative ``sigma_squared``
    (default: :func:`default_sigma` of the node range)."""
    if sigma is not None and sigma_squared is not None:
        raise ValueError(
            "give sigma (standard deviation) or sigma_squared (relative variance), not both"
        )
    if sigma_squared is not None:
        if not sigma_squared > 0:
            raise ValueError(f"sigma_squared must be > 0, got {sigma_squared}")
        lo, hi = support(nodes, weights)
        return math.sqrt(sigma_squared * max(1.0, hi - lo))
    if sigma is None:
        lo, hi = support(nodes, weights)
        return default_sigma(lo, hi, nodes.shape[1])
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    return float(sigma)


def broadened_density(nodes: Tensor, weights: Tensor, t: Tensor | None, sigma: float, *, num_points: int,
                      normalize: bool) -> tuple[Tensor, Tensor]:
    """``(grid, φ̂)``: the Gaussian-broadened density (see :meth:`spectra.SpectralDensity.evaluate`)."""
    t = default_grid(nodes, weights, sigma, num_points) if t is None else _check_grid(t)
    density = _mixture(t, nodes, weights, sigma)
    if normalize:
        density = _normalize(t, density, 1.0)
    return t, density


def log_density(
    nodes: Tensor,
    weights: Tensor,
    grid: Any,
    sigma: float | None,
    *,
    epsilon: float,
    part: Literal["abs", "positive", "negative"],
    num_points: int,
    normalize: bool,
) -> tuple[Tensor, Tensor]:
    """``(|λ| grid, density)``: Papyan's log spectrum (see :meth:`spectra.SpectralDensity.evaluate_log`)."""
    if part not in ("abs", "positive", "negative"):
        raise ValueError(f"part must be 'abs', 'positive' or 'negative', got {part!r}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    all_weights = weights
    if part == "positive":
        weights = torch.where(nodes > 0, weights, torch.zeros_like(weights))
    elif part == "negative":
        weights = torch.where(nodes < 0, weights, torch.zeros_like(weights))
    mass = float(weights.sum() / nodes.shape[0])
    u = torch.log(nodes.abs() + epsilon)
    live = u[all_weights > 0]
    u_lo, u_hi = float(live.min()), float(live.max())
    if sigma is None:
        sigma = default_sigma(u_lo, u_hi, nodes.shape[1])
    elif not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if grid is None:
        pad = max(MARGIN * (u_hi - u_lo), 5 * sigma)
        grid_u = torch.linspace(u_lo - pad, u_hi + pad, num_points, dtype=torch.float64)
        lam = torch.exp(grid_u) - epsilon
        keep = lam > 0
        grid_u, lam = grid_u[keep], lam[keep]
    else:
        lam = _check_grid(grid)
        if (lam <= 0).any():
            raise ValueError("grid for evaluate_log must be positive (it is |λ|)")
        grid_u = torch.log(lam + epsilon)
    density = _mixture(grid_u, u, weights, sigma) / (lam + epsilon)
    if normalize and mass > 0:
        density = _normalize(lam, density, mass)
    return lam, density


def spectral_sum_samples(nodes: Tensor, weights: Tensor, probe_norms_sq: Tensor,
                         f: Callable[[Tensor], Any] | None) -> Tensor:
    """Per-probe ``‖v‖² Σ_k τ_k f(θ_k)`` (zero-weight nodes skipped, so ``f`` need not be defined there)."""
    live = weights > 0
    if f is None:
        values = nodes
    else:
        values = torch.zeros_like(nodes)
        values[live] = as_f64(f(nodes[live]))
    return probe_norms_sq * (weights * values).sum(1)


def _check_grid(grid: Any) -> Tensor:
    t = as_f64(grid)
    if t.ndim != 1 or t.numel() < 2:
        raise ValueError(
            f"grid must be a 1-D array of at least 2 points, got shape {tuple(t.shape)}"
        )
    if not torch.isfinite(t).all():
        raise ValueError("grid contains NaN or inf")
    return t


def _mixture(
    t: Tensor, nodes: Tensor, weights: Tensor, sigma: float, *, chunk: int = 1 << 22
) -> Tensor:
    """``(1/n_v) Σ_lk τ_lk g_σ(t − θ_lk)``, chunked over the grid to bound memory."""
    live = weights > 0
    theta, tau = nodes[live], weights[live] / nodes.shape[0]
    out = torch.empty_like(t)
    step = max(1, chunk // max(theta.numel(), 1))
    norm = 1.0 / (sigma * math.sqrt(2 * math.pi))
    for s in range(0, t.numel(), step):
        z = (t[s : s + step, None] - theta[None, :]) / sigma
        out[s : s + step] = (torch.exp(-0.5 * z * z) * tau).sum(1) * norm
    return out


def _normalize(t: Tensor, density: Tensor, mass: float) -> Tensor:
    total = float(torch.trapezoid(density, t))
    if total <= 0 or not math.isfinite(total):
        raise ValueError("the density vanishes on the grid; widen the grid or increase sigma")
    return density * (mass / total)
