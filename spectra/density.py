"""The SLQ result: Gauss quadrature nodes and weights per probe, and what is computed from them."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import Tensor

from estimators import Estimate

from . import density_io, quadrature
from .quadrature import KAPPA, as_f64, default_sigma

__all__ = ["SpectralDensity", "SpectralSumEstimate", "default_sigma"]

@dataclass(frozen=True)
class SpectralSumEstimate(Estimate):
    """An estimate of ``tr f(H)`` from stochastic Lanczos quadrature (an :class:`estimators.Estimate`).

    Attributes:
        value: the mean over probes of ``‖v‖² Σ_k τ_k f(θ_k)``.
        stderr: standard error across probes (``std/√n_v``); ``inf`` with a single probe, as for
            every estimate of the toolkit. It covers the probe (Hutchinson) noise, not the
            quadrature error, which is exact for polynomials of degree ``≤ 2m − 1`` and small for
            smooth ``f``.
        num_probes: probes averaged.
        num_matvecs: operator products the density cost.
        method: ``"slq"``.
        samples: the per-probe values (float64), or ``None``.

    Examples:
        >>> est = SpectralSumEstimate(3.0, 0.1, 10, 100)
        >>> est.value, est.method, [round(x, 3) for x in est.confidence_interval(0.95)]
        (3.0, 'slq', [2.804, 3.196])
    """

    value: float
    stderr: float
    num_probes: int
    num_matvecs: int
    method: str = "slq"
    samples: Tensor | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, eq=False)
class SpectralDensity:
    """An eigenvalue density estimated by stochastic Lanczos quadrature (SLQ).

    For probe ``l`` the quadrature ``Σ_k weights[l, k] δ(t − nodes[l, k])`` approximates the
    probe's local spectral measure; their average over probes approximates the spectral density
    ``φ(t) = (1/d) Σ_i δ(t − λ_i)``.

    Attributes:
        nodes: ``(num_probes, m)`` float64 Ritz values ``θ``.
        weights: ``(num_probes, m)`` float64 weights ``τ`` (each row sums to 1).
        dim: the operator dimension ``d``.
        probe_norms_sq: ``(num_probes,)`` float64 ``‖v‖²`` of each probe (``d`` for Rademacher).
        num_matvecs: operator products spent.
        metadata: JSON-serializable facts about the run (steps, seed, operator type, ...).

    Examples:
        >>> dens = SpectralDensity(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.5, 0.5]]), dim=2)
        >>> dens.trace().value
        4.0
    """

    nodes: Tensor
    weights: Tensor
    dim: int
    probe_norms_sq: Tensor | None = None
    num_matvecs: int = 0
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        nodes, weights = as_f64(self.nodes), as_f64(self.weights)
        if nodes.ndim == 1:
            nodes, weights = nodes[None], weights[None] if weights.ndim == 1 else weights
        if nodes.ndim != 2 or nodes.shape != weights.shape:
            raise ValueError(
                f"nodes and weights must both have shape (num_probes, m), got {tuple(nodes.shape)} "
                f"and {tuple(weights.shape)}"
            )
        if nodes.shape[0] == 0 or nodes.shape[1] == 0:
            raise ValueError("nodes must hold at least one probe and one node")
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"dim must be a positive int, got {self.dim!r}")
        norms = self.probe_norms_sq
        norms = (
            torch.full((nodes.shape[0],), float(self.dim), dtype=torch.float64)
            if norms is None
            else as_f64(norms)
        )
        if norms.shape != (nodes.shape[0],):
            raise ValueError(
                f"probe_norms_sq must have shape ({nodes.shape[0]},), got {tuple(norms.shape)}"
            )
        object.__setattr__(self, "nodes", nodes)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "probe_norms_sq", norms)
        object.__setattr__(self, "metadata", dict(self.metadata))

    @classmethod
    def from_lanczos(cls, result: Any, *, metadata: dict | None = None) -> SpectralDensity:
        """The density of a :class:`~spectra.LanczosResult` (its Gauss quadratures).

        Examples:
            >>> from spectra import lanczos
            >>> A = torch.diag(torch.arange(4.0, dtype=torch.float64))
            >>> res = lanczos(A, num_steps=4, generator=torch.Generator().manual_seed(0))
            >>> round(SpectralDensity.from_lanczos(res).trace().value, 6)
            6.0
        """
        nodes, weights = result.quadrature()
        return cls(
            nodes.cpu(), weights.cpu(), int(result.dim), (result.start_norms**2).cpu(),
            int(result.num_matvecs), metadata or {},
        )

    # ------------------------------------------------------------------ basics
    @property
    def num_probes(self) -> int:
        """Number of probes ``n_v``."""
        return int(self.nodes.shape[0])

    @property
    def num_steps(self) -> int:
        """Quadrature nodes per probe (Lanczos steps ``m``)."""
        return int(self.nodes.shape[1])

    def support(self) -> tuple[float, float]:
        """Smallest and largest node carrying weight (Ritz values lie inside ``[λ_min, λ_max]``)."""
        return quadrature.support(self.nodes, self.weights)

    def default_sigma(self, *, kappa: float = KAPPA) -> float:
        """The kernel standard deviation :meth:`evaluate` uses by default (:func:`default_sigma`)."""
        lo, hi = self.support()
        return default_sigma(lo, hi, self.num_steps, kappa=kappa)

    def default_grid(self, *, sigma: float | None = None, num_points: int = 1024) -> Tensor:
        """Uniform grid over the node range plus ``max(5 % of the range, 5σ)`` on each side."""
        sigma = self.default_sigma() if sigma is None else sigma
        return quadrature.default_grid(self.nodes, self.weights, sigma, num_points)

    # ------------------------------------------------------------------ densities
    def evaluate(
        self,
        grid: Tensor | np.ndarray | None = None,
        sigma: float | None = None,
        *,
        sigma_squared: float | None = None,
        num_points: int = 1024,
        normalize: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Gaussian-broadened density on a grid.

        ``φ̂(t) = (1/n_v) Σ_l Σ_k τ_lk g_σ(t − θ_lk)`` with ``g_σ`` the normal density of standard
        deviation ``σ``, then (``normalize=True``) divided by its trapezoid integral over the
        grid so that it integrates to exactly 1 there (this only restores tails cut off by the
        grid).

        Kernel width, two conventions (give at most one):

        * ``sigma``: the standard deviation, in eigenvalue units. Default :meth:`default_sigma`,
          about ``(range)/(3(m − 1))`` (Papyan 2020; tied to the node spacing of ``m`` steps).
        * ``sigma_squared``: Ghorbani et al. / PyHessian's relative variance: the variance is
          ``sigma_squared · max(1, λ_max − λ_min)`` (their default ``1e-5``).

        Args:
            grid: points ``t`` (1-D); default :meth:`default_grid` with ``num_points`` points.
            sigma: kernel standard deviation.
            sigma_squared: PyHessian-style relative variance, instead of ``sigma``.
            num_points: size of the default grid.
            normalize: rescale to unit integral on the grid.

        Returns:
            ``(grid, density)``, float64 tensors.

        Examples:
            >>> nodes, weights = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.5]])
            >>> dens = SpectralDensity(nodes, weights, dim=2)
            >>> t, p = dens.evaluate(sigma=0.1)
            >>> round(float(torch.trapezoid(p, t)), 6)
            1.0
        """
        sigma = quadrature.resolve_sigma(self.nodes, self.weights, sigma, sigma_squared)
        grid = None if grid is None else quadrature.as_f64(grid)
        return quadrature.broadened_density(self.nodes, self.weights, grid, sigma, num_points=num_points,
                                            normalize=normalize)

    def evaluate_log(
        self,
        grid: Tensor | np.ndarray | None = None,
        sigma: float | None = None,
        *,
        epsilon: float = 1e-5,
        part: Literal["abs", "positive", "negative"] = "abs",
        num_points: int = 1024,
        normalize: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Density of ``|λ|`` on a log-spaced grid, for spectra spanning decades.

        Papyan's log spectrum: nodes are mapped to ``u = log(|θ| + ε)``, broadened in ``u`` with
        standard deviation ``sigma`` (default: :func:`default_sigma` on the ``u`` range), and
        pushed back to ``λ = e^u − ε`` with the Jacobian ``1/(λ + ε)``, so the result is a density
        over ``|λ|`` to plot on a log x-axis. No new products are needed.

        The sign is lost; ``part="positive"`` / ``"negative"`` keeps only nodes ``θ > 0`` /
        ``θ < 0``,
        and the result then integrates to that part's share of the mass (so the two parts can be
        drawn on one axis).

        Args:
            grid: ``|λ|`` values (positive); default log-spaced over the node range.
            sigma: kernel standard deviation in ``log`` units (natural log).
            epsilon: shift ``ε`` that keeps ``log`` finite near zero.
            part: ``"abs"`` (default), ``"positive"`` or ``"negative"``.
            num_points: size of the default grid.
            normalize: rescale to the part's mass (1 for ``"abs"``) on the grid (trapezoid rule).

        Returns:
            ``(grid, density)`` over ``|λ|``, float64 tensors.

        Examples:
            >>> nodes, weights = torch.tensor([[1e-3, 1e2]]), torch.tensor([[0.5, 0.5]])
            >>> dens = SpectralDensity(nodes, weights, dim=2)
            >>> t, p = dens.evaluate_log()
            >>> round(float(torch.trapezoid(p, t)), 6)
            1.0
        """
        return quadrature.log_density(self.nodes, self.weights, grid, sigma, epsilon=epsilon, part=part,
                                      num_points=num_points, normalize=normalize)

    # ------------------------------------------------------------------ spectral sums
    def trace(self, f: Callable[[Tensor], Any] | None = None) -> SpectralSumEstimate:
        """Estimate ``tr f(H) = Σ_i f(λ_i)`` from the same quadrature (no new products).

        Per probe ``‖v‖² Σ_k τ_k f(θ_k)``; the estimate is their mean and the error bar their
        standard error. ``f`` receives a float64 tensor of nodes and must act elementwise
        (``torch.log``, ``lambda x: x**2``, ...); default the identity (``tr H``). Zero-weight
        nodes are skipped, so ``f`` need not be defined there.

        Examples:
            >>> nodes, weights = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 0.5]])
            >>> dens = SpectralDensity(nodes, weights, dim=2)
            >>> dens.trace(lambda x: x**2).value
            5.0
        """
        per_probe = quadrature.spectral_sum_samples(self.nodes, self.weights, self.probe_norms_sq, f)
        n = self.num_probes
        mean = float(per_probe.mean())
        stderr = float(per_probe.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.inf
        return SpectralSumEstimate(mean, stderr, n, self.num_matvecs, "slq", per_probe)

    # ------------------------------------------------------------------ combining, I/O
    def select(self, probes: slice | Tensor | list[int]) -> SpectralDensity:
        """A density over a subset of the probes (matvecs are prorated).

        Examples:
            >>> dens = SpectralDensity(torch.zeros(3, 2), torch.full((3, 2), 0.5), dim=4)
            >>> dens.select(slice(0, 2)).num_probes
            2
        """
        nodes = self.nodes[probes]
        share = nodes.shape[0] / self.num_probes
        return SpectralDensity(
            nodes,
            self.weights[probes],
            self.dim,
            self.probe_norms_sq[probes],
            int(round(self.num_matvecs * share)),
            self.metadata,
        )

    @staticmethod
    def concatenate(densities: list[SpectralDensity]) -> SpectralDensity:
        """Pool the probes of densities of the same operator and step count.

        Examples:
            >>> a = SpectralDensity(torch.zeros(1, 2), torch.full((1, 2), 0.5), dim=4)
            >>> SpectralDensity.concatenate([a, a]).num_probes
            2
        """
        if not densities:
            raise ValueError("densities must be a non-empty list")
        first = densities[0]
        for other in densities[1:]:
            if other.dim != first.dim or other.num_steps != first.num_steps:
                raise ValueError("densities must share dim and num_steps to be concatenated")
        return SpectralDensity(
            torch.cat([x.nodes for x in densities]),
            torch.cat([x.weights for x in densities]),
            first.dim,
            torch.cat([x.probe_norms_sq for x in densities]),
            sum(x.num_matvecs for x in densities),
            first.metadata,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write to ``path`` as an ``.npz`` archive (float64 arrays + JSON metadata, no pickle).

        The file is written to a temporary name and renamed, so a crash never leaves a torn file.
        """
        density_io.save_density(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SpectralDensity:
        """Read a density written by :meth:`save` (exact round trip).

        Examples:
            >>> import tempfile, os
            >>> nodes, weights = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.25, 0.75]])
            >>> dens = SpectralDensity(nodes, weights, dim=2)
            >>> path = os.path.join(tempfile.mkdtemp(), "density.npz")
            >>> dens.save(path)
            >>> bool(torch.equal(SpectralDensity.load(path).weights, dens.weights))
            True
        """
        return cls(*density_io.load_density_fields(path))

    # ------------------------------------------------------------------ plotting
    def plot(
        self,
        ax: Any = None,
        *,
        log: bool = True,
        top_eigenvalues: Any = None,
        log_lambda: bool = False,
        sigma: float | None = None,
        floor: float = 1e-7,
        **kwargs: Any,
    ) -> Any:
        """Draw the density (log-scale y by default, as in Ghorbani et al. 2019 / PyHessian).

        Args:
            ax: matplotlib axes; default a new figure.
            log: log-scale y-axis, plotting ``φ̂ + floor`` (the floor is printed on the figure).
            top_eigenvalues: eigenvalues to mark (a sequence, tensor or :class:`EigenResult`).
            log_lambda: plot the density of ``|λ|`` on a log x-axis (:meth:`evaluate_log`), with
                positive and negative eigenvalues as separate curves.
            sigma: kernel standard deviation (default as in :meth:`evaluate`).
            floor: added to the density on a log y-axis so empty regions stay finite.
            **kwargs: passed to :func:`spectra.plotting.plot_density` (``title``, ``color``,
                ``label``, ``xlabel``).

        Returns:
            The matplotlib axes.
        """
        from .plotting import plot_density

        return plot_density(
            self,
            ax=ax,
            log=log,
            top_eigenvalues=top_eigenvalues,
            log_lambda=log_lambda,
            sigma=sigma,
            floor=floor,
            **kwargs,
        )

    def __repr__(self) -> str:
        lo, hi = self.support()
        return (
            f"SpectralDensity(dim={self.dim}, num_probes={self.num_probes}, "
            f"num_steps={self.num_steps}, "
            f"support=[{lo:.4g}, {hi:.4g}], num_matvecs={self.num_matvecs})"
        )
