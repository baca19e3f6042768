"""Learning rate and momentum from the spectrum: Polyak's heavy ball on the measured curvature.

Granziol, Zohren & Roberts (JMLR 2022) propose an SLQ-based on-the-fly learner of the learning
rate and momentum. Its exact rule was not available to us; what is implemented is the
reconstruction in its spirit: Lanczos on the curvature at the batch size actually trained with
gives the sharpness ``L`` (top Ritz value) and an effective small curvature ``μ`` from the
quadrature (``mu_rule``), and Polyak's optimal heavy ball on ``[μ, L]`` follows:

``α* = 4/(√L + √μ)²``,  ``ρ* = ((√L − √μ)/(√L + √μ))²``,

capped so that ``α ≤ safety·2(1+ρ)/L`` (the stability limit of heavy ball on a quadratic).
The classic optimum uses the exact extreme eigenvalues of the positive part instead.

Assumptions: the loss is locally quadratic with curvature ``op``; plain gradient descent
diverges above ``2/λ_max`` along the top eigenvector and heavy ball above ``2(1+ρ)/λ_max``; on a
deep-net bulk piled up at zero the choice of ``μ`` is a modelling decision (``mu_rule``), and
negative curvature is ignored (only the positive part is used).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from curvature.checks import check_count, check_positive_float
from curvature.probes import make_generator

from ..density import SpectralDensity
from ..eigsh import eigsh
from ..lanczos import lanczos
from ._common import symmetric_operator, tolist

__all__ = ["HyperparameterSuggestion", "heavy_ball", "suggest_hyperparameters"]

#: Ritz values at or below this fraction of ``L`` are not "positive curvature".
POSITIVE_FLOOR = 1e-3
_MU_RULES = ("ritz_min_positive", "mass_quantile")


def heavy_ball(L: float, mu: float) -> tuple[float, float]:
    """Polyak's optimal heavy-ball learning rate and momentum for a spectrum in ``[μ, L]``.

    Examples:
        >>> a, r = heavy_ball(1.0, 0.01)
        >>> round(a, 6), round(r, 6)
        (3.305785, 0.669421)
    """
    L = check_positive_float(L, name="L")
    mu = check_positive_float(mu, name="mu")
    if mu > L:
        raise ValueError(f"mu={mu} must not exceed L={L}")
    sL, smu = math.sqrt(L), math.sqrt(mu)
    return 4.0 / (sL + smu) ** 2, ((sL - smu) / (sL + smu)) ** 2


@dataclass(frozen=True, eq=False)
class HyperparameterSuggestion:
    """Learning rates and momentum implied by a curvature spectrum.

    Attributes:
        lambda_max: ``L``, the largest Ritz value (sharpness at this batch).
        mu: the effective small curvature from ``mu_rule``.
        learning_rate, momentum: the suggested heavy-ball ``α`` and ``ρ`` (Polyak on ``[μ, L]``,
            momentum capped at ``momentum_max``, rate capped at ``safety·2(1+ρ)/L``).
        max_learning_rate: ``2/L``, the largest stable plain gradient-descent rate.
        max_learning_rate_momentum: ``2(1+ρ)/L`` for heavy ball with the suggested ``ρ``.
        classic_learning_rate, classic_momentum: Polyak's optimum from the exact extreme
            eigenvalues of the positive part (``eigsh``; NaN when not computed).
        classic_mu: the smallest positive eigenvalue used for it (NaN when not computed).
        mu_rule, safety, momentum_max: the settings used.
        num_matvecs: products spent.
        density: the Lanczos quadrature the suggestion came from (for :meth:`plot`).
    """

    lambda_max: float
    mu: float
    learning_rate: float
    momentum: float
    max_learning_rate: float
    max_learning_rate_momentum: float
    classic_learning_rate: float
    classic_momentum: float
    classic_mu: float
    mu_rule: str
    safety: float
    momentum_max: float
    num_matvecs: int
    density: SpectralDensity | None = field(default=None, repr=False)

    @property
    def condition_number(self) -> float:
        """``L/μ``."""
        return self.lambda_max / self.mu

    def damping(self, batch_size: int, *, constant: float = 1.0) -> float:
        """A damping recommendation ``constant·α/B`` for stochastic second-order or adaptive
        methods (Granziol et al.: the minimal damping scales as ``lr/B``; the constant is the
        user's)."""
        batch_size = check_count(batch_size, name="batch_size")
        return constant * self.learning_rate / batch_size

    def to_dict(self) -> dict:
        """JSON-serializable summary (the density is left out)."""
        out = {k: tolist(getattr(self, k)) for k in self.__dataclass_fields__ if k != "density"}
        out["condition_number"] = self.condition_number
        return out

    def plot(self, ax: Any = None, *, floor: float = 1e-7) -> Any:
        """The density (log scale) with ``μ`` and ``L`` marked and the suggested rates written
        on the figure.

        Returns:
            The matplotlib axes.
        """
        from .plotting import plot_hyperparameters

        return plot_hyperparameters(self, ax=ax, floor=floor)


def _mu_from(nodes: np.ndarray, weights: np.ndarray, L: float, mu_rule: Any, quantile: float) -> float:
    if callable(mu_rule):
        return float(mu_rule(torch.as_tensor(nodes), torch.as_tensor(weights)))
    positive = nodes > POSITIVE_FLOOR * L
    if not positive.any():
        raise ValueError("the spectrum has no Ritz value above 1e-3·λ_max; μ is undefined")
    if mu_rule == "ritz_min_positive":
        return float(nodes[positive].min())
    # "mass_quantile": the curvature below which `quantile` of the positive spectral mass lies.
    v, w = nodes[positive], weights[positive]
    order = np.argsort(v)
    cum = np.cumsum(w[order]) / w.sum()
    return float(v[order][np.searchsorted(cum, quantile)])


def suggest_hyperparameters(
    op_or_density: Any,
    *,
    num_steps: int = 30,
    mu_rule: str | Callable[[torch.Tensor, torch.Tensor], float] = "ritz_min_positive",
    quantile: float = 0.1,
    safety: float = 0.9,
    momentum_max: float = 0.99,
    classic: bool = True,
    tol: float = 1e-6,
    generator: torch.Generator | None = None,
) -> HyperparameterSuggestion:
    """Suggest a learning rate and momentum from the spectrum of ``op`` (or of an SLQ density).

    With an operator, one Lanczos run (``num_steps``, one Rademacher probe, full
    reorthogonalization) gives Ritz values ``θ`` and weights ``τ``; ``L = θ_max`` is the
    sharpness and ``μ`` comes from ``mu_rule``:

    * ``"ritz_min_positive"`` (default): the smallest Ritz value above ``1e-3·L``;
    * ``"mass_quantile"``: the curvature below which a fraction ``quantile`` of the positive
      spectral mass lies (robust to a bulk piled up at zero);
    * a callable ``(nodes, weights) -> μ``.

    Then Polyak's heavy ball on ``[μ, L]`` (:func:`heavy_ball`), with ``ρ ≤ momentum_max`` and
    ``α ≤ safety·2(1+ρ)/L``. ``max_learning_rate = 2/L`` is the largest stable plain-GD rate.
    With ``classic=True`` and an operator, Polyak's optimum from the *exact* extremes of the
    positive part is reported too: ``λ_max`` and the smallest eigenvalue above ``1e-3·λ_max``
    (``eigsh``; for a singular operator this finds the smallest eigenvalue if it is positive,
    else NaN). A density (``SpectralDensity`` from ``spectra.slq``) uses all its probes'
    nodes and weights and spends no products.

    Args:
        op_or_density: a symmetric operator (``Hessian``, ``GGN``, tensor, ...) or a
            ``SpectralDensity``.
        num_steps: Lanczos steps (operator input).
        mu_rule, quantile: the choice of ``μ`` (see above).
        safety: the rate cap's fraction of the stability limit.
        momentum_max: cap on ``ρ``.
        classic: also compute the exact-extremes optimum (operator input).
        tol: eigensolver tolerance for it.
        generator: randomness of the Lanczos start.

    Returns:
        A :class:`HyperparameterSuggestion`.

    Examples:
        >>> import torch
        >>> A = torch.diag(torch.linspace(0.01, 1.0, 100, dtype=torch.float64))
        >>> s = suggest_hyperparameters(A, num_steps=100, generator=torch.Generator().manual_seed(0))
        >>> round(s.max_learning_rate, 6), round(s.momentum, 6), round(s.classic_momentum, 6)
        (2.0, 0.669421, 0.669421)
    """
    if not (callable(mu_rule) or mu_rule in _MU_RULES):
        raise ValueError(f"mu_rule must be one of {_MU_RULES} or a callable, got {mu_rule!r}")
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    safety = check_positive_float(safety, name="safety")
    if safety > 1.0:
        raise ValueError(f"safety must be in (0, 1], got {safety}")
    if not 0.0 <= momentum_max < 1.0:
        raise ValueError(f"momentum_max must be in [0, 1), got {momentum_max}")
    num_steps = check_count(num_steps, name="num_steps", minimum=2)
    g = make_generator(generator)
    matvecs = 0
    op = None
    if isinstance(op_or_density, SpectralDensity):
        density = op_or_density
    else:
        op = symmetric_operator(op_or_density, name="op_or_density", generator=g)
        res = lanczos(op, num_steps=num_steps, num_probes=1, generator=g)
        density = SpectralDensity.from_lanczos(res)
        matvecs += res.num_matvecs
    nodes = density.nodes.numpy().ravel()
    weights = density.weights.numpy().ravel()
    live = weights > 0
    nodes, weights = nodes[live], weights[live]
    L = float(nodes.max())
    if L <= 0:
        raise ValueError("op_or_density has no positive curvature; no learning rate follows")
    mu = _mu_from(nodes, weights, L, mu_rule, quantile)
    mu = min(max(mu, POSITIVE_FLOOR * L), L)
    alpha, rho = heavy_ball(L, mu)
    rho = min(rho, momentum_max)
    alpha = min(alpha, safety * 2.0 * (1.0 + rho) / L)

    c_alpha = c_rho = c_mu = float("nan")
    if classic and op is not None:
        top = eigsh(op, k=1, which="LA", tol=tol, generator=g)
        bottom = eigsh(op, k=1, which="SA", tol=tol, generator=g)
        matvecs += top.num_matvecs + bottom.num_matvecs
        lam_max, lam_min = float(top.eigenvalues[0]), float(bottom.eigenvalues[0])
        if lam_max > 0 and lam_min > POSITIVE_FLOOR * lam_max:
            c_mu = lam_min
            c_alpha, c_rho = heavy_ball(lam_max, lam_min)
    return HyperparameterSuggestion(
        lambda_max=L,
        mu=mu,
        learning_rate=alpha,
        momentum=rho,
        max_learning_rate=2.0 / L,
        max_learning_rate_momentum=2.0 * (1.0 + rho) / L,
        classic_learning_rate=c_alpha,
        classic_momentum=c_rho,
        classic_mu=c_mu,
        mu_rule=mu_rule if isinstance(mu_rule, str) else getattr(mu_rule, "__name__", "callable"),
        safety=safety,
        momentum_max=momentum_max,
        num_matvecs=matvecs,
        density=density,
    )
