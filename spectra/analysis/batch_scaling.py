"""Sharpness of mini-batch curvature against batch size, and the learning rates it allows.

Granziol, Zohren & Roberts, "Learning Rates as a Function of Batch Size: A Random Matrix Theory
Approach to Neural Network Training" (JMLR 2022): the extreme eigenvalues of a mini-batch
Hessian (or GGN) exceed those of the full-data one and shrink as the batch grows; the largest
stable learning rate then grows linearly with the batch size for SGD and as its square root for
Adam, until it saturates. Writing ``H_B = H_N + E_B`` with noise of entry variance ``∝ 1/B``, an
outlier ``θ`` above the noise edge moves to ``θ + s²/θ`` (Wigner noise) and, for a sample
covariance with spike ``ℓ`` and ``γ = P/B``, BBP gives ``λ_max(B) = ℓ + [ℓP/(ℓ−1)]/B``: in both
cases ``λ_max(B) = λ_∞ + κ/B``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from curvature import GGN, EmptyDataError, Hessian, LinearOperator, map_tensors
from curvature.checks import check_count, check_positive_float
from curvature.probes import make_generator

from ..eigsh import eigsh
from ._common import tolist

__all__ = [
    "BatchScalingResult",
    "DiagonallyScaledOperator",
    "ScalingFit",
    "batch_size_scaling",
    "fit_batch_scaling",
]

logger = logging.getLogger(__name__)

_CURVATURES = {"hessian": Hessian, "ggn": GGN}


class DiagonallyScaledOperator(LinearOperator):
    """``S A S`` for a positive diagonal ``S = diag(scale)``: an operator seen by a diagonal
    preconditioner (Adam's ``D^{-1/2} H D^{-1/2}`` with ``scale = (√v̂ + ε)^{-1/2}``).

    Examples:
        >>> import torch
        >>> A = torch.eye(2, dtype=torch.float64)
        >>> op = DiagonallyScaledOperator(A, torch.tensor([2.0, 3.0], dtype=torch.float64))
        >>> (op @ torch.ones(2, dtype=torch.float64)).tolist()
        [4.0, 9.0]
    """

    def __init__(self, op: Any, scale: Tensor):
        from curvature import as_operator

        A = as_operator(op)
        if not isinstance(scale, Tensor) or scale.shape != (A.shape[0],):
            raise ValueError(f"scale must be a tensor of shape ({A.shape[0]},)")
        if not bool((scale > 0).all()) or not bool(torch.isfinite(scale).all()):
            raise ValueError("scale must be positive and finite")
        super().__init__(A.shape[0], A.dtype, A.device, A.blocks)
        self.op = A
        self.scale = scale.to(dtype=A.dtype, device=A.device)

    def _matmat(self, V: Tensor) -> Tensor:
        s = self.scale[:, None]
        return s * (self.op @ (s * V))


# ----------------------------------------------------------------------------- fits
@dataclass(frozen=True)
class ScalingFit:
    """A weighted least-squares fit of ``λ(B)`` over batch sizes.

    Laws:

    * ``"L1"``: ``λ(B) = λ_∞ + κ/B`` (``coefficients = (λ_∞, κ)``); sampling without
      replacement from ``N`` samples is the same line in ``1/B − 1/N`` (``λ_N = λ_∞ + κ/N``).
    * ``"L3"``: ``λ(B) = (a + b/√B)²`` (``coefficients = (a, b)``), the noise-edge regime of
      small batches.

    Attributes:
        law: ``"L1"`` or ``"L3"``.
        coefficients, stderr: fitted parameters and their standard errors (scaled by the
            reduced χ² when it exceeds 1).
        chi2: weighted residual sum of squares in ``λ``; ``dof`` its degrees of freedom.
    """

    law: str
    coefficients: tuple[float, float]
    stderr: tuple[float, float]
    chi2: float
    dof: int

    def predict(self, batch_size: Any) -> np.ndarray:
        """``λ(B)`` of the fitted law."""
        B = np.asarray(batch_size, dtype=np.float64)
        a, b = self.coefficients
        return a + b / B if self.law == "L1" else (a + b / np.sqrt(B)) ** 2

    @property
    def lambda_inf(self) -> float:
        """``λ_∞``, the large-batch limit (``a²`` for ``"L3"``)."""
        a = self.coefficients[0]
        return a if self.law == "L1" else a * a

    @property
    def kappa(self) -> float:
        """``κ`` of ``"L1"`` (NaN for ``"L3"``)."""
        return self.coefficients[1] if self.law == "L1" else float("nan")

    @property
    def critical_batch_size(self) -> float:
        """``B_crit = κ/λ_∞``: below it the noise term dominates and ``α_max ∝ B``."""
        return self.kappa / self.lambda_inf if self.law == "L1" else float("nan")

    def to_dict(self) -> dict:
        return {
            "law": self.law,
            "coefficients": list(self.coefficients),
            "stderr": list(self.stderr),
            "chi2": self.chi2,
            "dof": self.dof,
            "lambda_inf": self.lambda_inf,
            "kappa": self.kappa,
            "critical_batch_size": self.critical_batch_size,
        }


def _wls(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    X = np.stack([np.ones_like(x), x], axis=1)
    # Least squares on sqrt(w)-scaled rows (not the normal equations' inverse): weights that span
    # many decades (a nearly exact point) square the condition number there and none here.
    top = float(w.max())
    sw = np.sqrt(w / top)
    A = X * sw[:, None]
    beta = np.linalg.lstsq(A, y * sw, rcond=None)[0]
    cov = np.linalg.pinv(A.T @ A) / top
    chi2 = float((w * (y - X @ beta) ** 2).sum())
    dof = max(1, x.size - 2)
    cov = cov * max(1.0, chi2 / dof)
    return beta, np.sqrt(np.diag(cov)), chi2


def fit_batch_scaling(
    batch_sizes: Any, means: Any, stderr: Any = None, *, law: Literal["L1", "L3"] = "L1"
) -> ScalingFit:
    """Fit ``λ(B)`` by weighted least squares (weights ``1/s.e.²``; ``∝ B`` where no error bar).

    Examples:
        >>> B = np.array([10.0, 20.0, 40.0, 80.0])
        >>> fit = fit_batch_scaling(B, 3.0 + 50.0 / B)
        >>> round(fit.lambda_inf, 6), round(fit.kappa, 6)
        (3.0, 50.0)
    """
    B = np.asarray(batch_sizes, dtype=np.float64)
    y = np.asarray(means, dtype=np.float64)
    if B.ndim != 1 or B.shape != y.shape or B.size < 3:
        raise ValueError("batch_sizes and means must be 1-D of the same length >= 3")
    se = np.full_like(y, np.nan) if stderr is None else np.asarray(stderr, dtype=np.float64)
    usable = np.isfinite(se) & (se > 0)
    if usable.all():
        w = 1.0 / se**2
    else:
        # Without error bars: the spike's variance is ∝ 1/B, so weight ∝ B.
        w = B / B.mean()
    if law == "L1":
        beta, sd, chi2 = _wls(1.0 / B, y, w)
    elif law == "L3":
        if not (y > 0).all():
            raise ValueError("law 'L3' needs positive values")
        r = np.sqrt(y)
        beta, sd, _ = _wls(1.0 / np.sqrt(B), r, w * 4 * y)  # var(√λ) = var(λ)/(4λ)
        chi2 = float((w * (y - (beta[0] + beta[1] / np.sqrt(B)) ** 2) ** 2).sum())
    else:
        raise ValueError(f"law must be 'L1' or 'L3', got {law!r}")
    return ScalingFit(law, (float(beta[0]), float(beta[1])), (float(sd[0]), float(sd[1])), chi2, max(1, B.size - 2))


def _log_slope(x: np.ndarray, y: np.ndarray) -> float:
    good = (x > 0) & (y > 0) & np.isfinite(y)
    if good.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(x[good]), np.log(y[good]), 1)[0])


# ----------------------------------------------------------------------------- result
@dataclass(frozen=True, eq=False)
class BatchScalingResult:
    """Extreme eigenvalues of mini-batch curvature across batch sizes, fits and learning rates.

    Attributes:
        batch_sizes: the batch sizes ``B``.
        curvature: ``"hessian"`` or ``"ggn"``.
        lambda_max, lambda_min: ``(num_B, num_batches)`` float64 extreme eigenvalues of each
            batch's operator (``lambda_min`` NaN unless requested).
        adam_lambda_max: ``(num_B, num_batches)`` largest eigenvalue of the Adam-preconditioned
            operator ``D^{-1/2} H_B D^{-1/2}``, ``D = diag(√v̂_B + ε)`` with ``v̂_B`` the mean
            squared mini-batch gradient at that ``B`` (NaN unless requested).
        converged: ``(num_B, num_batches)`` whether every requested pair met ``tol``.
        lambda_full_max, lambda_full_min: of the full-data operator (NaN unless computed).
        num_samples: ``N``, the samples the batches were drawn from.
        fit: the ``"L1"`` fit ``λ_∞ + κ/B`` of the means of ``lambda_max``; ``fit_edge`` the
            ``"L3"`` fit; ``law`` the one with the smaller χ².
        batch_indices: per batch size, the ``(num_batches, B)`` sample indices drawn.
        num_matvecs: operator products spent (Lanczos and residual checks).
    """

    batch_sizes: tuple[int, ...]
    curvature: str
    lambda_max: Tensor
    lambda_min: Tensor
    adam_lambda_max: Tensor
    converged: Tensor
    lambda_full_max: float
    lambda_full_min: float
    num_samples: int
    fit: ScalingFit
    fit_edge: ScalingFit
    law: str
    num_matvecs: int
    batch_indices: tuple[Tensor, ...] = field(repr=False)

    # -- summaries over batches
    @staticmethod
    def _mean_se(values: Tensor) -> tuple[np.ndarray, np.ndarray]:
        v = values.double().numpy()
        n = v.shape[1]
        se = v.std(axis=1, ddof=1) / math.sqrt(n) if n > 1 else np.full(v.shape[0], np.nan)
        return v.mean(axis=1), se

    @property
    def mean_lambda_max(self) -> np.ndarray:
        """Mean of ``λ_max`` over batches, per batch size."""
        return self._mean_se(self.lambda_max)[0]

    @property
    def stderr_lambda_max(self) -> np.ndarray:
        """Standard error of that mean."""
        return self._mean_se(self.lambda_max)[1]

    @property
    def mean_lambda_min(self) -> np.ndarray:
        """Mean of ``λ_min`` over batches, per batch size."""
        return self._mean_se(self.lambda_min)[0]

    @property
    def sgd_learning_rates(self) -> np.ndarray:
        """Largest stable plain-SGD rate ``2/λ_max(H_B)`` per batch size (mean ``λ_max``)."""
        return 2.0 / self.mean_lambda_max

    @property
    def adam_learning_rates(self) -> np.ndarray:
        """Largest stable Adam rate ``2/λ_max(D^{-1/2} H_B D^{-1/2})`` per batch size."""
        return 2.0 / self._mean_se(self.adam_lambda_max)[0]

    @property
    def sgd_exponent(self) -> float:
        """Slope of ``log(2/λ_max)`` against ``log B`` (1 = linear scaling, 0 = saturated)."""
        return _log_slope(np.asarray(self.batch_sizes, float), self.sgd_learning_rates)

    @property
    def adam_exponent(self) -> float:
        """Slope of ``log α_max^{Adam}`` against ``log B`` (Granziol et al.: about 1/2)."""
        return _log_slope(np.asarray(self.batch_sizes, float), self.adam_learning_rates)

    def exponents(self, *, max_batch_size: float | None = None) -> tuple[float, float]:
        """Measured ``(SGD, Adam)`` learning-rate exponents over the batch sizes ``<= max_batch_size``.

        Granziol et al.'s linear and square-root rules are for ``B ≪ B_crit``; pass
        ``max_batch_size=result.fit.critical_batch_size`` to measure them there (NaN with fewer
        than two such sizes). Default: all batch sizes.
        """
        B = np.asarray(self.batch_sizes, float)
        keep = B <= (np.inf if max_batch_size is None else max_batch_size)
        if keep.sum() < 2:
            return float("nan"), float("nan")
        return (
            _log_slope(B[keep], self.sgd_learning_rates[keep]),
            _log_slope(B[keep], self.adam_learning_rates[keep]),
        )

    @property
    def excess_exponent(self) -> float:
        """``p`` in ``λ_max(B) − λ_∞ ∝ B^{-p}``, measured (the model says 1; NaN if not positive)."""
        return -_log_slope(np.asarray(self.batch_sizes, float), self.mean_lambda_max - self.fit.lambda_inf)

    def max_learning_rate(self, batch_size: Any, *, momentum: float = 0.0) -> np.ndarray:
        """``2(1+ρ)/(λ_∞ + κ/B)`` from the ``"L1"`` fit: heavy ball with momentum ``ρ`` is stable
        on the local quadratic below it (linear in ``B`` for ``B ≪ B_crit``, then saturating)."""
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        return 2.0 * (1.0 + momentum) / self.fit.predict(batch_size)

    def to_dict(self) -> dict:
        """JSON-serializable summary (batch indices left out)."""
        return {
            "batch_sizes": list(self.batch_sizes),
            "curvature": self.curvature,
            "lambda_max": tolist(self.lambda_max),
            "lambda_min": tolist(self.lambda_min),
            "adam_lambda_max": tolist(self.adam_lambda_max),
            "converged": tolist(self.converged),
            "mean_lambda_max": tolist(self.mean_lambda_max),
            "stderr_lambda_max": tolist(self.stderr_lambda_max),
            "lambda_full_max": self.lambda_full_max,
            "lambda_full_min": self.lambda_full_min,
            "num_samples": self.num_samples,
            "fit": self.fit.to_dict(),
            "fit_edge": self.fit_edge.to_dict(),
            "law": self.law,
            "sgd_learning_rates": tolist(self.sgd_learning_rates),
            "adam_learning_rates": tolist(self.adam_learning_rates),
            "sgd_exponent": self.sgd_exponent,
            "adam_exponent": self.adam_exponent,
            "excess_exponent": self.excess_exponent,
            "num_matvecs": self.num_matvecs,
        }

    def plot(self, axes: Any = None) -> Any:
        """Granziol et al.'s figures: ``λ_max`` against ``B`` on log-log axes with error bars,
        the fit and the full-data value; and the implied largest SGD and Adam learning rates.

        Returns:
            The two matplotlib axes.
        """
        from .plotting import plot_batch_scaling

        return plot_batch_scaling(self, axes=axes)


# ----------------------------------------------------------------------------- computation
def _tensors_only(x: Any) -> Any:
    leaves = pytree.tree_leaves(x)
    if not leaves or any(not isinstance(t, Tensor) for t in leaves):
        raise TypeError(f"data must hold tensors (or tuples/dicts of tensors), got {type(x).__name__}")
    return x


def _index(x: Any, idx: Tensor) -> Any:
    return map_tensors(lambda t: t[idx.to(t.device)], _tensors_only(x))


def _num_samples(x: Any) -> int:
    return int(pytree.tree_leaves(_tensors_only(x))[0].shape[0])


def _cat(parts: list) -> Any:
    return map_tensors(lambda *ts: torch.cat(ts), _tensors_only(parts[0]), *parts[1:])


def _as_dataset(data: Any) -> tuple[Any, Any]:
    """One ``(inputs, targets)`` pair holding all samples (batches of an iterable are joined)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor):
        return data[0], data[1]
    try:
        batches = list(data)
    except TypeError:
        raise TypeError("data must be an (inputs, targets) pair or an iterable of such batches") from None
    if not batches:
        raise ValueError("data is empty")
    return _cat([b[0] for b in batches]), _cat([b[1] for b in batches])


def _unit(v: Tensor) -> Tensor:
    return v / v.double().norm().to(v.dtype)


@dataclass
class _Warm:
    """Start vectors carried from one batch's operator to the next."""

    top: Tensor | None = None
    bottom: Tensor | None = None


def _extreme(
    op: LinearOperator,
    which: str,
    start: Tensor | None,
    *,
    num_lanczos_vectors: int,
    tol: float,
    max_iter: int,
    generator: torch.Generator,
) -> tuple[float, Tensor, bool, int]:
    """One extreme eigenpair by thick-restarted Lanczos from a warm start."""
    d = op.shape[0]
    noise = torch.randint(0, 2, (d,), generator=generator, dtype=torch.int8).to(op.dtype) * 2 - 1
    noise = _unit(noise.to(op.device))
    # A little of a random direction keeps every eigenvector in the Krylov space even when the
    # new batch's extreme direction is orthogonal to the previous one.
    v0 = noise if start is None else _unit(start) + 0.1 * noise
    res = eigsh(
        op,
        k=1,
        which=which,
        tol=tol,
        v0=v0,
        num_lanczos_vectors=min(num_lanczos_vectors, d),
        max_iter=max_iter,
        generator=generator,
    )
    return float(res.eigenvalues[0]), res.eigenvectors[:, 0], bool(res.converged[0]), int(res.num_matvecs)


def _gradient_moments(op: Any, model: nn.Module, loss_fn: Callable[..., Tensor], inputs: Any, targets: Any,
                      chunk: int = 256) -> tuple[Tensor, Tensor]:
    """The data set's gradient ``ḡ`` and the per-sample second moment of a mini-batch gradient.

    Samples are weighted as the operators weight batches (:meth:`curvature.BatchSource.batch_weight`
    of each sample: its valid targets, summed class weights, ...): with ``z_i`` that weight and
    ``u_i = z_i g_i`` the sample's unnormalized gradient, a batch's gradient is the ratio
    ``Σ_B u_i / Σ_B z_i`` and ``ḡ = Σ u_i / Σ z_i``. Returned with ``ḡ`` is
    ``mean_i ((u_i − ḡ z_i) / z̄)²`` (``z̄`` the mean weight), the variance of one sample's
    contribution to the ratio to first order (Cochran, *Sampling Techniques*, 1977, §6.3); for
    equal weights it is ``mean_i g_i² − ḡ²``. A sample of weight 0 (all targets ignored) adds
    nothing. Per-sample gradients by ``torch.func.vmap(grad(...))`` over the selected parameters
    (those of ``op``), in chunks; models that ``vmap`` cannot trace fall back to one backward per sample.
    """
    from torch.func import functional_call, grad, vmap

    names = list(op.param_names)
    params = {n: p.detach() for n, p in zip(names, op.params)}
    N = _num_samples(inputs)
    source = op.batch_source
    rows_u, rows_z = [], []

    def one(p: dict, x: Any, t: Any) -> Tensor:
        out = functional_call(model, p, (_unsqueeze(x),))
        return loss_fn(out, _unsqueeze(t))

    per_sample = vmap(grad(one), in_dims=(None, 0, 0))
    for start in range(0, N, chunk):
        idx = torch.arange(start, min(start + chunk, N))
        xb, tb = _index(inputs, idx), _index(targets, idx)
        samples = [(_index(xb, torch.tensor([k])), _index(tb, torch.tensor([k]))) for k in range(idx.numel())]
        z = torch.tensor([source.batch_weight(*sample) for sample in samples], dtype=torch.float64)
        try:
            G = per_sample(params, xb, tb)
            flat = torch.cat([G[n].reshape(idx.numel(), -1) for n in names], 1).double()
        except Exception:  # noqa: BLE001 - any untraceable model takes the slow, generic path
            rows = []
            for (xk, tk), zk in zip(samples, z.tolist()):
                if zk == 0:
                    rows.append(torch.zeros(op.shape[0], dtype=torch.float64, device=op.device))
                    continue
                loss = op.loss(xk, tk)
                rows.append(op.flatten(list(torch.autograd.grad(loss, op.params))).double())
            flat = torch.stack(rows)
        u = flat.cpu() * z[:, None]
        u[z == 0] = 0.0  # the sample's own loss is 0/0: it is no part of any batch's mean
        rows_u.append(u)
        rows_z.append(z)
    U, Z = torch.cat(rows_u), torch.cat(rows_z)
    total_z = float(Z.sum())
    if total_z == 0:
        raise EmptyDataError("every sample of the data has weight 0 (e.g. all targets are ignore_index)")
    mean = U.sum(0) / total_z
    spread = ((U - Z[:, None] * mean) / (total_z / N)).pow(2).mean(0)
    return mean.to(op.device), spread.to(op.device)


def _unsqueeze(x: Any) -> Any:
    return map_tensors(lambda t: t.unsqueeze(0), x)


def _expected_batch_second_moment(mean: Tensor, spread: Tensor, B: int, N: int) -> Tensor:
    """``E[g_B²]`` for a batch of ``B`` of ``N`` samples drawn without replacement (``spread``:
    the per-sample variance of :func:`_gradient_moments`)."""
    fpc = (N - B) / (N - 1) if N > 1 else 0.0
    return mean.pow(2) + fpc * spread / B


def batch_size_scaling(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    data: Any,
    *,
    batch_sizes: Sequence[int] = (16, 32, 64, 128, 256),
    num_batches: int = 8,
    curvature: Literal["hessian", "ggn"] = "hessian",
    smallest: bool = True,
    adam: bool = True,
    adam_eps: float = 1e-8,
    full_data: bool = True,
    num_steps: int = 10,
    tol: float = 1e-5,
    tol_min: float = 1e-3,
    max_iter: int = 1000,
    generator: torch.Generator | None = None,
    **operator_options: Any,
) -> BatchScalingResult:
    """``λ_max`` (and ``λ_min``) of mini-batch Hessians or GGNs across batch sizes, at fixed weights.

    For each ``B``, ``num_batches`` batches are drawn without replacement from the ``N`` samples
    of ``data``; each gets ONE operator (its autograd graph is cached and serves every product),
    and its extreme eigenvalues come from thick-restarted Lanczos (``spectra.eigsh`` with a small
    basis of ``num_steps`` vectors) started from the previous batch's top (and bottom)
    eigenvector plus a little noise, since the extreme directions change little between batches.

    The means over batches are fitted with ``λ_∞ + κ/B`` (``"L1"``) and ``(a + b/√B)²``
    (``"L3"``) by weighted least squares (:func:`fit_batch_scaling`), the law with the smaller χ²
    is reported, and the largest stable rates follow: ``2/λ_max(H_B)`` for SGD (linear in ``B``
    below ``B_crit = κ/λ_∞``), and ``2/λ_max(D^{-1/2} H_B D^{-1/2})`` for Adam, with
    ``D = diag(√v̂_B + ε)`` and ``v̂_B = E[g_B²]``, the expected squared mini-batch gradient at
    batch size ``B`` (what Adam's moving average estimates), computed exactly from per-sample
    gradients: ``v̂_B = ḡ² + (N−B)/(N−1) · (mean_i g_i² − ḡ²)/B`` for batches drawn without
    replacement (times ``B²`` for ``reduction="sum"`` losses). Granziol et al.: ``α_max ∝ √B`` in the noise-dominated
    regime. Both exponents are *measured* (log-log slopes), not assumed.

    Args:
        model, loss_fn: as for :class:`curvature.Hessian` (``model.eval()`` first).
        data: an ``(inputs, targets)`` pair of tensors holding all ``N`` samples (or an iterable
            of such batches, joined).
        batch_sizes: increasing batch sizes, each ``<= N``; a geometric grid spanning ``≥ 16×``
            with ``≥ 5`` values gives a well-posed fit.
        num_batches: batches per batch size (the error bars).
        curvature: ``"hessian"`` or ``"ggn"``.
        smallest: also compute ``λ_min``.
        adam: also compute the Adam-preconditioned ``λ_max`` (one more eigensolve per batch, and
            one pass of per-sample gradients over the data).
        adam_eps: Adam's ``ε``.
        full_data: also compute the full-data extremes (``spectra.eigsh``).
        num_steps: Lanczos basis size per restart cycle (small, since a warm start is close).
        tol: relative residual tolerance ``‖H x − θ x‖ ≤ tol·‖H‖`` of ``λ_max``; the eigenvalue
            error is then about ``(tol·‖H‖)²/gap``.
        tol_min: the same for ``λ_min``, looser by default: the bottom of a mini-batch Hessian is
            a cluster of small values without a gap, where Lanczos converges slowly.
        max_iter: most products per eigenvalue (unconverged batches are flagged in
            ``converged``).
        generator: randomness of the batches and start vectors.
        **operator_options: passed to the operator (``params=``, ...).

    Returns:
        A :class:`BatchScalingResult`.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(256, 5, generator=g, dtype=torch.float64)
        >>> y = torch.randn(256, 1, generator=g, dtype=torch.float64)
        >>> model = nn.Linear(5, 1, bias=False).double()
        >>> res = batch_size_scaling(model, nn.MSELoss(), (x, y), batch_sizes=(8, 16, 32, 64),
        ...                          num_batches=4, adam=False, generator=g)
        >>> res.lambda_max.shape, bool(res.converged.all())
        (torch.Size([4, 4]), True)
    """
    if curvature not in _CURVATURES:
        raise ValueError(f"curvature must be 'hessian' or 'ggn', got {curvature!r}")
    sizes = [check_count(b, name="batch_sizes") for b in batch_sizes]
    if len(sizes) < 3:
        raise ValueError(f"batch_sizes needs at least 3 sizes for a fit, got {len(sizes)}")
    if sorted(set(sizes)) != sizes:
        raise ValueError(f"batch_sizes must be strictly increasing, got {tuple(batch_sizes)}")
    R = check_count(num_batches, name="num_batches", minimum=2)
    num_steps = check_count(num_steps, name="num_steps", minimum=2)
    max_iter = check_count(max_iter, name="max_iter")
    tol = check_positive_float(tol, name="tol")
    tol_min = check_positive_float(tol_min, name="tol_min")
    adam_eps = check_positive_float(adam_eps, name="adam_eps")
    g = make_generator(generator)
    inputs, targets = _as_dataset(data)
    N = _num_samples(inputs)
    if _num_samples(targets) != N:
        raise ValueError(f"inputs hold {N} samples but targets {_num_samples(targets)}")
    if sizes[-1] > N:
        raise ValueError(
            f"batch_sizes go up to {sizes[-1]}, but data holds only N={N} samples; "
            "use batch sizes <= N (batches are drawn without replacement)"
        )
    make = _CURVATURES[curvature]

    # Separate streams: the batches drawn do not depend on which eigenvalues are requested.
    batch_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
    start_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
    shape = (len(sizes), R)
    lam_max = torch.full(shape, float("nan"), dtype=torch.float64)
    lam_min = torch.full(shape, float("nan"), dtype=torch.float64)
    adam_max = torch.full(shape, float("nan"), dtype=torch.float64)
    converged = torch.zeros(shape, dtype=torch.bool)
    all_indices = []
    warm, warm_adam = _Warm(), _Warm()
    matvecs = 0
    moments = None
    if adam:
        probe = make(model, loss_fn, (_index(inputs, torch.arange(1)), _index(targets, torch.arange(1))),
                     **operator_options)
        moments = _gradient_moments(probe, model, loss_fn, inputs, targets)
    opts = dict(num_lanczos_vectors=num_steps, max_iter=max_iter, generator=start_gen)
    for i, B in enumerate(sizes):
        idx = torch.stack([torch.randperm(N, generator=batch_gen)[:B] for _ in range(R)])
        all_indices.append(idx)
        scales = None
        if adam:
            v_hat = _expected_batch_second_moment(*moments, B, N)
            if probe.loss_info.reduction == "sum":
                v_hat = v_hat * B**2  # a summed batch loss has B times the mean's gradient
            scales = (v_hat.sqrt() + adam_eps).rsqrt()
        for j, r in enumerate(idx):
            op = make(model, loss_fn, (_index(inputs, r), _index(targets, r)), **operator_options)
            lam_max[i, j], warm.top, ok, mv = _extreme(op, "LA", warm.top, tol=tol, **opts)
            matvecs += mv
            if smallest:
                lam_min[i, j], warm.bottom, ok_min, mv = _extreme(op, "SA", warm.bottom, tol=tol_min, **opts)
                ok, matvecs = ok and ok_min, matvecs + mv
            if adam:
                pre = DiagonallyScaledOperator(op, scales)
                adam_max[i, j], warm_adam.top, ok_adam, mv = _extreme(pre, "LA", warm_adam.top, tol=tol, **opts)
                ok, matvecs = ok and ok_adam, matvecs + mv
            converged[i, j] = ok
            if hasattr(op, "release"):
                op.release()
    if not bool(converged.all()):
        logger.warning("batch_size_scaling: %d of %d batches not converged", int((~converged).sum()), converged.numel())

    full_max = full_min = float("nan")
    if full_data:
        full = make(model, loss_fn, (inputs, targets), **operator_options)
        top = eigsh(full, k=1, which="LA", tol=tol, v0=warm.top, generator=start_gen)
        full_max = float(top.eigenvalues[0])
        if smallest:
            bottom = eigsh(full, k=1, which="SA", tol=tol_min, v0=warm.bottom, generator=start_gen)
            full_min = float(bottom.eigenvalues[0])
        matvecs += full.num_matvecs
        if hasattr(full, "release"):
            full.release()

    v = lam_max.numpy()
    means = v.mean(1)
    # A mean is never known better than the eigensolver's tolerance: at B = N every batch is the
    # whole data set and the spread is rounding noise, whose 1/se² weight would swamp the fit.
    se = np.maximum(v.std(1, ddof=1) / math.sqrt(R), tol * np.abs(means))
    fit = fit_batch_scaling(sizes, means, se, law="L1")
    fit_edge = fit_batch_scaling(sizes, means, se, law="L3") if (means > 0).all() else fit
    law = "L3" if fit_edge.law == "L3" and fit_edge.chi2 < fit.chi2 else "L1"
    return BatchScalingResult(
        batch_sizes=tuple(sizes),
        curvature=curvature,
        lambda_max=lam_max,
        lambda_min=lam_min,
        adam_lambda_max=adam_max,
        converged=converged,
        lambda_full_max=full_max,
        lambda_full_min=full_min,
        num_samples=N,
        fit=fit,
        fit_edge=fit_edge,
        law=law,
        num_matvecs=int(matvecs),
        batch_indices=tuple(all_indices),
    )
