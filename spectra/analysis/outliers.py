"""Bulk plus outliers: how many eigenvalues stand out of the bulk, and where the bulk ends.

Trained networks have a Hessian spectrum made of a bulk near zero and a few outliers (Sagun et
al. 2017, "Empirical Analysis of the Hessian of Over-Parametrized Neural Networks"), about one per
class, carried by the Gauss-Newton term (Papyan 2019, "Measurements of Three-Level Hierarchical
Structure in the Outliers in the Spectrum of Deepnet Hessians"). The count is *detected* here,
never assumed: it drifts with architecture and training time.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

import estimators
from curvature.checks import check_count, check_positive_float
from curvature.probes import make_generator

from ..density import SpectralDensity
from ..lanczos import LanczosResult, lanczos
from ..results import EigenResult
from ._common import (
    as_numpy,
    symmetric_operator,
    tolist,
)

__all__ = ["GapRule", "OutlierReport", "log_gap_rule", "outliers"]

logger = logging.getLogger(__name__)

#: Converged values needed below the last cut, so that the bulk reference holds enough gaps.
MIN_BULK_VALUES = 8
#: Consistent scale 1.4826·MAD of the normal distribution.
MAD_SCALE = 1.4826


@dataclass(frozen=True)
class GapRule:
    """Outcome of the robust log-gap rule on a descending list of eigenvalues.

    Attributes:
        count: number of outliers ``k̂`` (the position of the deepest cut; 0 without a cut).
        scores: ``(n - 1,)`` robust z-scores of the log-gaps ``log θ_j − log θ_{j+1}``.
        cuts: positions ``j`` (1-based: a cut after the ``j``-th value) with ``score > z``.
        levels: cuts that are local maxima of the score (hierarchy levels, e.g. ``C`` and
            ``C(C−1)``).
        reference_median: median of the reference (bulk) log-gaps.
        reference_scale: their robust scale ``1.4826·MAD`` (floored, see :func:`log_gap_rule`).
        z: the threshold used.
    """

    count: int
    scores: np.ndarray
    cuts: tuple[int, ...]
    levels: tuple[int, ...]
    reference_median: float
    reference_scale: float
    z: float


def log_gap_rule(eigenvalues: Any, *, z: float = 20.0) -> GapRule:
    """Count outliers in descending eigenvalues ``θ_1 ≥ θ_2 ≥ …`` by robust log-gap scores.

    The log-gaps ``ℓ_j = log θ_j − log θ_{j+1}`` of the lower half of the list are taken as the
    bulk reference; each gap is scored ``s_j = (ℓ_j − median)/(1.4826·MAD)``, every ``j`` with
    ``s_j > z`` is a cut and the count is the deepest cut. The default ``z = 20`` was calibrated
    on pure Wishart matrices (n = 2000, 60 values), whose largest score was 4.3–13.1, so it gives no
    false positives there; planted outliers well above the edge score in the hundreds. The
    scale is floored at ``1e-3`` times the median gap (a perfectly regular bulk has MAD = 0).
    Only positive values above ``1e-3·θ_1`` may be passed (log-gaps near zero are rounding).

    Args:
        eigenvalues: descending positive values (converged Ritz values or exact eigenvalues).
        z: score threshold for a cut.

    Returns:
        A :class:`GapRule`.

    Examples:
        >>> import numpy as np
        >>> bulk = np.linspace(1.0, 0.5, 30)
        >>> log_gap_rule(np.concatenate([[9.0, 7.0, 5.0], bulk])).count
        3
    """
    theta = as_numpy(eigenvalues).ravel()
    z = check_positive_float(z, name="z")
    if theta.size < 4:
        raise ValueError(f"eigenvalues must hold at least 4 values for a gap rule, got {theta.size}")
    if not np.all(theta > 0):
        raise ValueError("eigenvalues must all be positive (drop values near or below zero first)")
    if np.any(np.diff(theta) > 1e-12 * theta[0]):
        raise ValueError("eigenvalues must be sorted in descending order")
    gaps = np.log(theta[:-1]) - np.log(theta[1:])
    reference = gaps[gaps.size // 2 :]
    median = float(np.median(reference))
    scale = MAD_SCALE * float(np.median(np.abs(reference - median)))
    scale = max(scale, 1e-3 * abs(median), 1e-12)
    scores = (gaps - median) / scale
    cuts = tuple(int(j) + 1 for j in np.nonzero(scores > z)[0])
    levels = tuple(
        j
        for j in cuts
        if (j == 1 or scores[j - 1] >= scores[j - 2]) and (j == gaps.size or scores[j - 1] >= scores[j])
    )
    return GapRule(max(cuts) if cuts else 0, scores, cuts, levels, median, scale, z)


@dataclass(frozen=True, eq=False)
class OutlierReport:
    """How many outliers a spectrum has, where its bulk ends, and what they weigh.

    Attributes:
        count: the number of outliers ``k̂`` (0 if no cut).
        conclusive: whether at least ``k̂ + 8`` converged values backed the rule; when ``False``
            the count is a lower bound at best (see :func:`outliers`).
        eigenvalues: ``(n,)`` float64 converged top eigenvalues the rule used, descending.
        residuals: ``(n,)`` float64 residual norms ``‖H x − θ x‖`` of those values (NaN where
            the input did not have them).
        scores: robust log-gap scores (:class:`GapRule`); ``cut_score`` is the one at ``k̂``.
        levels: hierarchy levels (local maxima of the score among cuts).
        bulk_edge: ``θ_{k̂+1}``, the largest bulk eigenvalue.
        separation: ``θ_1/θ_{k̂+1}`` and ``θ_{k̂}/θ_{k̂+1}`` (NaN without outliers).
        trace, trace_stderr: ``tr H`` (exact or estimated; ``stderr`` 0 when exact, NaN if
            unknown).
        outlier_share: ``Σ_{j≤k̂} θ_j / tr H``.
        num_classes: ``C`` if given; ``matches`` is ``"C"``, ``"C-1"``, ``"C(C-1)"``, ``"C^2"``
            or ``None``, and ``ratio`` is ``k̂/C``.
        slq_count: Lanczos-quadrature estimate of the number of eigenvalues above the cut
            ``√(θ_k̂ θ_{k̂+1})`` (unbiased over Rademacher probes, variance ≤ 2 per outlier and
            probe) and its standard error (NaN with one probe); a cross-check of ``count``.
        num_converged: converged top values available; ``num_steps``: Lanczos steps used (0 for
            eigensolver input); ``num_matvecs``: operator products spent here.
        density: a spectral density for :meth:`plot` (the Lanczos quadrature), or ``None``.
    """

    count: int
    conclusive: bool
    eigenvalues: Tensor
    residuals: Tensor
    scores: np.ndarray
    cut_score: float
    z: float
    levels: tuple[int, ...]
    bulk_edge: float
    separation: tuple[float, float]
    trace: float | None
    trace_stderr: float
    outlier_share: float
    num_classes: int | None
    matches: str | None
    ratio: float
    slq_count: float
    slq_count_stderr: float
    negative_mass: float
    num_converged: int
    num_steps: int
    num_matvecs: int
    density: SpectralDensity | None = field(default=None, repr=False)

    @property
    def outliers(self) -> Tensor:
        """The ``k̂`` outlying eigenvalues, descending."""
        return self.eigenvalues[: self.count]

    def to_dict(self) -> dict:
        """JSON-serializable summary (the density is left out; save it with its own ``save``)."""
        out = {
            k: tolist(getattr(self, k))
            for k in self.__dataclass_fields__
            if k not in ("density",)
        }
        out["outliers"] = tolist(self.outliers)
        return out

    def plot(self, axes: Any = None, *, log: bool = True, floor: float = 1e-7) -> Any:
        """The Ghorbani/Papyan figure: the density on a log y-axis with outliers marked and the
        bulk shaded, next to the log-scale scree plot of the top eigenvalues with the cut.

        Args:
            axes: two matplotlib axes (density, scree); default a new figure.
            log: log-scale y-axis for the density (``φ̂ + floor``).
            floor: added to the density on the log axis.

        Returns:
            The two axes.
        """
        from .plotting import plot_outliers

        return plot_outliers(self, axes=axes, log=log, floor=floor)


# ----------------------------------------------------------------------------- helpers
def _compare_with_classes(count: int, num_classes: int | None) -> tuple[str | None, float]:
    if num_classes is None:
        return None, float("nan")
    C = num_classes
    names = {C: "C", C - 1: "C-1", C * (C - 1): "C(C-1)", C * C: "C^2"}
    return names.get(count), count / C


def _converged_block(values: np.ndarray, ok: np.ndarray, floor: float) -> int:
    """Length of the contiguous top run of converged values above ``floor·θ_1``.

    A value converged to a residual ``≤ floor·θ_1`` is only known to about that much, so values
    below it carry no log-gap information.
    """
    if values.size == 0 or values[0] <= 0:
        return 0
    good = ok & (values > floor * values[0])
    bad = np.nonzero(~good)[0]
    return int(bad[0]) if bad.size else int(values.size)


def _apply_rule(values: np.ndarray, n_ok: int, z: float) -> tuple[GapRule | None, bool]:
    if n_ok < 4:
        return None, False
    rule = log_gap_rule(values[:n_ok], z=z)
    return rule, n_ok >= rule.count + MIN_BULK_VALUES


def _slq_count(nodes: Tensor, weights: Tensor, norms_sq: Tensor, threshold: float) -> tuple[float, float]:
    per_probe = norms_sq * (weights * (nodes > threshold)).sum(1)
    n = per_probe.numel()
    se = float(per_probe.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return float(per_probe.mean()), se


def _trace(op: Any, trace: Any, trace_matvecs: int, generator: torch.Generator) -> tuple[float | None, float, int]:
    if trace is not None:
        value = getattr(trace, "value", trace)
        return float(value), float(getattr(trace, "stderr", 0.0)), 0
    if op is None:
        return None, float("nan"), 0
    d = op.shape[0]
    # method="auto" multiplies d unit vectors (exact) when the budget covers them.
    est = estimators.trace(op, num_matvecs=min(d, trace_matvecs), method="auto", generator=generator)
    return float(est.value), float(est.stderr), int(est.num_matvecs)


# ----------------------------------------------------------------------------- main entry
def outliers(
    op_or_result: Any,
    *,
    num_classes: int | None = None,
    k: int | None = None,
    z: float = 20.0,
    num_steps: int | None = None,
    max_steps: int | None = None,
    residual_tol: float = 1e-3,
    trace: Any = None,
    trace_matvecs: int = 96,
    generator: torch.Generator | None = None,
) -> OutlierReport:
    """Count the outliers of a symmetric spectrum and locate its bulk edge.

    **The rule** (robust log-gap, :func:`log_gap_rule`): among the top ``k`` eigenvalues, keep
    only the contiguous top block of *converged* ones that are above ``residual_tol·θ_1`` (below
    that a value is not known well enough for its log-gap to mean anything); score their
    log-gaps against the median and MAD of the lower half; the deepest gap scoring above ``z``
    is the cut, ``k̂`` values lie above it and ``θ_{k̂+1}`` is the bulk edge. Unconverged Ritz values
    are quadrature nodes, not eigenvalues, and their gaps are no evidence (on a spiked Wishart
    matrix, the rule on all Ritz values found 0–3 of 3 planted outliers; on the converged block, 3
    of 3 in every seed). The count is *conclusive* when ``k̂ + 8`` converged values back it.

    **Inputs.**

    * An operator (``Hessian``, ``GGN``, tensor, ...): Lanczos with full reorthogonalization
      from a Rademacher vector; a Ritz pair is converged when its *true* residual
      ``‖H x − θ x‖ ≤ residual_tol·|θ_1|`` (one block product for the top ``k``). While the
      count is inconclusive the run is repeated with twice the steps (up to ``max_steps`` or
      ``d``).
    * An :class:`~spectra.EigenResult` (e.g. ``spectra.eigsh(op, k=40)``): its ``converged``
      flags and residuals are used as they are.
    * A :class:`~spectra.LanczosResult`: its Ritz residual estimates ``|β_m y_mk|`` (exact up to
      rounding with full reorthogonalization).
    * A :class:`~spectra.SpectralDensity` (SLQ) with at least 2 probes: a top node counts as
      converged when every probe has a node within ``residual_tol·θ_1`` of it (extreme Ritz
      values converge to the same eigenvalue from any start). If too few agree, a
      ``ValueError`` asks for more Lanczos steps.

    Args:
        op_or_result: a symmetric operator or one of the results above.
        num_classes: ``C``; the report then says whether ``k̂`` is ``C``, ``C−1`` (natural for
            cross-entropy, whose softmax Hessian annihilates the all-ones logit direction),
            ``C(C−1)`` or ``C²``.
        k: candidate window (top values examined); default ``max(2C + 10, 40)``.
        z: score threshold (default 20, see :func:`log_gap_rule`).
        num_steps: first Lanczos run's steps (operator input); default ``max(150, 4k)``.
        max_steps: most Lanczos steps of one run when extending; default ``min(d, 8·num_steps)``.
        residual_tol: relative residual below which a Ritz pair is converged, and the floor
            (relative to ``θ_1``) below which values are dropped. Lower it (e.g. ``1e-6``) to see
            levels far below the top, such as a bulk at ``1e-4·θ_1``.
        trace: ``tr H`` if already known (a number or a ``TraceEstimate``); otherwise computed
            by ``estimators.trace(method="auto")`` for operators (exact when ``d ≤
            trace_matvecs``) or from the density's quadrature.
        trace_matvecs: product budget of that trace estimate.
        generator: randomness of the Lanczos start, restarts and trace probes.

    Returns:
        An :class:`OutlierReport`.

    Examples:
        >>> import torch
        >>> A = torch.diag(torch.cat([torch.tensor([50.0, 30.0, 20.0]),
        ...                           torch.linspace(1.0, 2.0, 197)])).double()
        >>> rep = outliers(A, generator=torch.Generator().manual_seed(0))
        >>> rep.count, round(rep.bulk_edge, 6), rep.conclusive
        (3, 2.0, True)
    """
    z = check_positive_float(z, name="z")
    residual_tol = check_positive_float(residual_tol, name="residual_tol")
    trace_matvecs = check_count(trace_matvecs, name="trace_matvecs")
    if num_classes is not None:
        num_classes = check_count(num_classes, name="num_classes", minimum=2)
    if k is None:
        k = max(2 * num_classes + 10, 40) if num_classes is not None else 40
    k = check_count(k, name="k", minimum=5)
    g = make_generator(generator)

    density: SpectralDensity | None = None
    op = None
    steps_used = 0
    matvecs = 0
    if isinstance(op_or_result, EigenResult):
        values, residuals, ok = _from_eigen_result(op_or_result)
        matvecs = 0
    elif isinstance(op_or_result, LanczosResult):
        values, residuals, ok, density = _from_lanczos_result(op_or_result, residual_tol)
        steps_used = op_or_result.num_steps
    elif isinstance(op_or_result, SpectralDensity):
        values, residuals, ok, density = _from_density(op_or_result, residual_tol, k)
        steps_used = op_or_result.num_steps
    else:
        op = symmetric_operator(op_or_result, name="op_or_result", generator=g)
        values, residuals, ok, density, steps_used, matvecs = _from_operator(
            op, k=k, z=z, num_steps=num_steps, max_steps=max_steps, residual_tol=residual_tol, generator=g
        )

    order = np.argsort(-values, kind="stable")
    values, residuals, ok = values[order][:k], residuals[order][:k], ok[order][:k]
    if values.size == 0 or values[0] <= 0:
        raise ValueError("op_or_result has no positive top eigenvalue; there is nothing to count")
    n_ok = _converged_block(values, ok, residual_tol)
    rule, conclusive = _apply_rule(values, n_ok, z)
    if rule is None:
        if isinstance(op_or_result, SpectralDensity):
            raise ValueError(_too_few_steps_message(op_or_result, n_ok))
        raise ValueError(
            f"only {n_ok} converged top eigenvalue(s) above {residual_tol:g}·θ_1 are available; "
            "the gap rule needs at least 4 (request more pairs or steps)"
        )
    if not conclusive:
        if isinstance(op_or_result, SpectralDensity):
            raise ValueError(_too_few_steps_message(op_or_result, n_ok, rule.count))
        logger.warning(
            "outliers: inconclusive; %d converged values back a count of %d (need %d)",
            n_ok,
            rule.count,
            rule.count + MIN_BULK_VALUES,
        )
    kh = rule.count
    used = values[:n_ok]
    bulk_edge = float(used[kh]) if kh < n_ok else float("nan")
    separation = (
        (float(used[0] / bulk_edge), float(used[kh - 1] / bulk_edge)) if kh > 0 else (float("nan"), float("nan"))
    )
    tr, tr_se, tr_mv = _trace(op, trace, trace_matvecs, g)
    if tr is None and density is not None and isinstance(op_or_result, SpectralDensity):
        est = density.trace()
        tr, tr_se = est.value, est.stderr
    matvecs += tr_mv
    share = float(used[:kh].sum() / tr) if tr not in (None, 0.0) else float("nan")
    if density is not None and kh > 0 and kh < n_ok:
        threshold = math.sqrt(used[kh - 1] * used[kh])
        slq_n, slq_se = _slq_count(density.nodes, density.weights, density.probe_norms_sq, threshold)
    else:
        slq_n, slq_se = (0.0 if kh == 0 else float("nan")), float("nan")
    matches, ratio = _compare_with_classes(kh, num_classes)
    negative_mass = float("nan")
    if density is not None:
        below = (density.nodes < -residual_tol * float(used[0])).double()
        negative_mass = float((density.weights * below).sum(1).mean())
    return OutlierReport(
        count=kh,
        conclusive=bool(conclusive),
        eigenvalues=torch.as_tensor(used.copy()),
        residuals=torch.as_tensor(residuals[:n_ok].copy()),
        scores=rule.scores,
        cut_score=float(rule.scores[kh - 1]) if kh > 0 else float("nan"),
        z=z,
        levels=rule.levels,
        bulk_edge=bulk_edge,
        separation=separation,
        trace=tr,
        trace_stderr=tr_se,
        outlier_share=share,
        num_classes=num_classes,
        matches=matches,
        ratio=ratio,
        slq_count=slq_n,
        slq_count_stderr=slq_se,
        negative_mass=negative_mass,
        num_converged=n_ok,
        num_steps=steps_used,
        num_matvecs=matvecs,
        density=density,
    )


def _too_few_steps_message(dens: SpectralDensity, n_ok: int, count: int | None = None) -> str:
    need = f"{count + MIN_BULK_VALUES}" if count is not None else f"{4}"
    return (
        f"the density has too few Lanczos steps for an outlier count: with num_steps={dens.num_steps} "
        f"and {dens.num_probes} probe(s) only {n_ok} top Ritz value(s) agree across probes, and the "
        f"gap rule needs {need}; rerun spectra.slq with more num_steps (at least ~150) or pass the "
        "operator itself"
    )


def _from_eigen_result(res: EigenResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    values = as_numpy(res.eigenvalues)
    residuals = as_numpy(res.residuals)
    ok = as_numpy(res.converged).astype(bool)
    return values, residuals, ok


def _from_lanczos_result(
    res: LanczosResult, residual_tol: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, SpectralDensity]:
    if res.num_probes != 1:
        raise ValueError(f"a LanczosResult for outliers must have one probe, got {res.num_probes}")
    theta, Y = res.ritz()
    theta, Y = theta[0], Y[0]
    last_beta = float(res.beta[0, -1]) if res.num_steps > 1 else 0.0
    resid = (last_beta * Y[-1, :]).abs()
    values = as_numpy(theta)
    residuals = as_numpy(resid)
    ok = residuals <= residual_tol * np.abs(values).max()
    return values, residuals, ok, SpectralDensity.from_lanczos(res)


def _from_density(
    dens: SpectralDensity, residual_tol: float, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, SpectralDensity]:
    if dens.num_probes < 2:
        raise ValueError(
            "a SpectralDensity needs at least 2 probes for an outlier count (convergence of a top "
            "Ritz value is judged by agreement across probes); rerun spectra.slq with num_probes >= 2"
        )
    nodes = as_numpy(dens.nodes)
    weights = as_numpy(dens.weights)
    first = np.sort(nodes[0][weights[0] > 0])[::-1][:k]
    scale = np.abs(nodes).max()
    ok = np.ones(first.size, dtype=bool)
    spread = np.zeros(first.size)
    for p in range(1, dens.num_probes):
        live = nodes[p][weights[p] > 0]
        dist = np.abs(first[:, None] - live[None, :]).min(1)
        spread = np.maximum(spread, dist)
        ok &= dist <= residual_tol * scale
    return first, spread, ok, dens


def _from_operator(
    op: Any,
    *,
    k: int,
    z: float,
    num_steps: int | None,
    max_steps: int | None,
    residual_tol: float,
    generator: torch.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, SpectralDensity, int, int]:
    d = op.shape[0]
    m = min(d, check_count(num_steps, name="num_steps", minimum=2) if num_steps is not None else max(150, 4 * k))
    cap = min(d, check_count(max_steps, name="max_steps", minimum=2) if max_steps is not None else 8 * m)
    matvecs = 0
    while True:
        res = lanczos(op, num_steps=m, num_probes=1, generator=generator, return_basis=True)
        matvecs += res.num_matvecs
        theta, X = res.ritz_vectors()
        theta, X = theta[0].flip(0), X[0].flip(0)  # descending
        w = min(k, theta.numel())
        top = X[:w].T.contiguous()  # (d, w)
        # True residuals, one block product: the Lanczos estimate |β_m y_m| is exact only up
        # to the loss of orthogonality, and the rule must never score unconverged nodes.
        R = op @ top
        matvecs += w
        resid = (R.double() - top.double() * theta[:w].to(torch.float64)).norm(dim=0)
        values = theta.double().cpu().numpy()
        residuals = np.full(values.size, np.nan)
        residuals[:w] = resid.cpu().numpy()
        ok = np.zeros(values.size, dtype=bool)
        ok[:w] = residuals[:w] <= residual_tol * np.abs(values).max()
        n_ok = _converged_block(values[:w], ok[:w], residual_tol)
        rule, conclusive = _apply_rule(values[:w], n_ok, z)
        done = conclusive and (n_ok >= min(w, 4))
        if done or m >= cap:
            return values, residuals, ok, SpectralDensity.from_lanczos(res), m, matvecs
        logger.info("outliers: %d converged values after %d steps; extending the run", n_ok, m)
        m = min(cap, 2 * m)
