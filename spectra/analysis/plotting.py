"""Figures of the spectral analyses, as the papers draw them (matplotlib, imported lazily)."""

from __future__ import annotations

from typing import Any

import numpy as np

# The results (OutlierReport, Decomposition, BatchScalingResult, HyperparameterSuggestion) are
# drawn duck-typed: this module imports none of the analyses, so their ``plot`` methods can
# delegate here without an import circle.

__all__ = ["plot_batch_scaling", "plot_decomposition", "plot_hyperparameters", "plot_outliers"]

_BLUE, _RED, _GREEN, _GREY, _ORANGE = "#1f5fa8", "#c0392b", "#1e8449", "#888888", "#d35400"


def _axes(axes: Any, n: int, size: tuple[float, float]) -> list:
    if axes is not None:
        axes = list(np.atleast_1d(axes))
        if len(axes) != n:
            raise ValueError(f"axes must hold {n} matplotlib axes, got {len(axes)}")
        return axes
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(1, n, figsize=size, layout="constrained")
    return list(np.atleast_1d(ax))


def _style(ax: Any) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.grid(True, which="major", alpha=0.25, linewidth=0.6)
    ax.tick_params(labelsize=9)


def plot_outliers(report: Any, *, axes: Any = None, log: bool = True, floor: float = 1e-7) -> list:
    """Density with outliers marked and bulk shaded; scree plot of the top values with the cut.

    Examples:
        >>> import matplotlib, torch
        >>> matplotlib.use("Agg")
        >>> from spectra.analysis import outliers
        >>> A = torch.diag(torch.cat([torch.tensor([50.0, 30.0]), torch.linspace(1, 2, 98)])).double()
        >>> rep = outliers(A, generator=torch.Generator().manual_seed(0))
        >>> len(plot_outliers(rep))
        2
    """
    ax_d, ax_s = _axes(axes, 2, (11.0, 4.0))
    out = report.eigenvalues[: report.count].numpy()
    edge = report.bulk_edge
    if report.density is not None:
        dens = report.density
        lo, hi = dens.support()
        # Resolve the bulk: the kernel width follows the bulk's range, not the outliers'.
        bulk_hi = edge if np.isfinite(edge) else hi
        sigma = max((bulk_hi - lo) / 60.0, 1e-12 * max(abs(hi), 1.0))
        grid = np.linspace(lo - 5 * sigma, hi + 0.05 * (hi - lo) + 5 * sigma, 2000)
        import torch

        t, phi = dens.evaluate(torch.as_tensor(grid), sigma=sigma)
        t, phi = t.numpy(), phi.numpy()
        ax_d.plot(t, phi + floor if log else phi, color=_BLUE, linewidth=1.2, label="SLQ density")
        if log:
            ax_d.set_yscale("log")
            ax_d.text(0.99, 0.02, f"floor {floor:g} added", transform=ax_d.transAxes, ha="right",
                      va="bottom", fontsize=7, color=_GREY)
        ax_d.set_ylabel("density φ(λ)" + (" (log scale)" if log else ""))
        bulk_lo = lo
    else:
        ax_d.text(0.5, 0.5, "no density (eigensolver input)", ha="center", transform=ax_d.transAxes)
        bulk_lo = float(report.eigenvalues.min())
    if np.isfinite(edge):
        ax_d.axvspan(min(bulk_lo, 0.0), edge, color=_GREY, alpha=0.18, label=f"bulk (edge λ₊ = {edge:.3g})")
    for i, lam in enumerate(out):
        ax_d.axvline(lam, color=_RED, linestyle="--", linewidth=1.0, alpha=0.85,
                     label=f"{report.count} outliers" if i == 0 else None)
    ax_d.set_xlabel("eigenvalue λ")
    title = f"Bulk + outliers: k̂ = {report.count}"
    if report.num_classes is not None:
        title += f" (C = {report.num_classes}" + (f", matches {report.matches})" if report.matches else ")")
    ax_d.set_title(title, fontsize=10)
    ax_d.legend(fontsize=8, frameon=False, loc="upper center")
    _style(ax_d)

    vals = report.eigenvalues.numpy()
    j = np.arange(1, vals.size + 1)
    ax_s.semilogy(j, vals, "o", color=_BLUE, markersize=4, label="converged eigenvalues")
    if report.count > 0:
        ax_s.semilogy(j[: report.count], vals[: report.count], "o", color=_RED, markersize=5, label="outliers")
        ax_s.axvline(report.count + 0.5, color=_RED, linestyle=":", linewidth=1.0,
                     label=f"cut (score {report.cut_score:.0f} > z = {report.z:g})")
    if report.num_classes is not None:
        for c, style in ((report.num_classes, "-"), (report.num_classes - 1, "--")):
            ax_s.axvline(c + 0.5, color=_GREEN, linestyle=style, linewidth=0.8, alpha=0.7,
                         label=f"{'C' if c == report.num_classes else 'C−1'} = {c}")
    ax_s.set_xlabel("index j")
    ax_s.set_ylabel("θ_j (log scale)")
    share = report.outlier_share
    ax_s.set_title(
        "Top eigenvalues" + (f"; outliers hold {100 * share:.1f}% of tr" if np.isfinite(share) else ""),
        fontsize=10,
    )
    ax_s.legend(fontsize=8, frameon=False)
    _style(ax_s)
    return [ax_d, ax_s]


def plot_decomposition(dec: Any, *, axes: Any = None) -> list:
    """Extreme eigenvalues of H, G, R on a symlog axis; the G/R split of H's extreme values."""
    ax_e, ax_b = _axes(axes, 2, (11.0, 4.0))
    colors = {"H": _BLUE, "G": _GREEN, "R": _ORANGE}
    markers = {"H": "o", "G": "s", "R": "^"}
    k = dec.terms[0].top.numel()
    style = {"H": dict(markersize=10, fillstyle="none", markeredgewidth=1.4), "G": dict(markersize=5),
             "R": dict(markersize=5)}
    for t in dec.terms:
        top, bottom = t.top.numpy(), t.bottom.numpy()
        x = np.concatenate([-np.arange(bottom.size, 0, -1), np.arange(1, k + 1)])
        ax_e.plot(x, np.concatenate([bottom[::-1], top]), markers[t.name], color=colors[t.name], linestyle="none",
                  label=f"{t.name}: tr = {t.trace:.3g}", **style[t.name])
    vals = np.concatenate([np.abs(t.top.numpy()) for t in dec.terms] + [np.abs(t.bottom.numpy()) for t in dec.terms])
    linthresh = max(float(np.max(vals)) * 1e-4, 1e-12)
    ax_e.set_yscale("symlog", linthresh=linthresh)
    ax_e.axhline(0, color=_GREY, linewidth=0.6)
    ax_e.set_xlabel("index j (+j: j-th largest, −j: j-th smallest)")
    ax_e.set_ylabel("eigenvalue (symlog)")
    ax_e.set_title("H = G + R: extreme eigenvalues of each term", fontsize=10)
    ax_e.legend(fontsize=8, frameon=False)
    _style(ax_e)

    top, bottom = dec.top_split.numpy(), dec.bottom_split.numpy()
    split = np.concatenate([top, bottom[::-1]])
    x = np.arange(split.shape[0])
    ax_b.bar(x, split[:, 0], color=_GREEN, label="xᵀGx")
    ax_b.bar(x, split[:, 1], bottom=np.where(split[:, 1] * split[:, 0] > 0, split[:, 0], 0), color=_ORANGE,
             label="xᵀRx")
    ax_b.plot(x, split.sum(1), "k_", markersize=12, label="λ(H) = xᵀGx + xᵀRx")
    ax_b.set_yscale("symlog", linthresh=linthresh)
    ax_b.axvline(top.shape[0] - 0.5, color=_GREY, linestyle=":")
    ax_b.set_xticks(x)
    ax_b.set_xticklabels([f"+{i + 1}" for i in range(top.shape[0])] + [f"−{i}" for i in range(bottom.shape[0], 0, -1)],
                         fontsize=7)
    ax_b.set_xlabel("eigenvector x of H (top: +j, most negative: −j)")
    ax_b.set_title(f"Who carries H's extremes: outliers → {dec.outlier_carrier}, negatives → {dec.negative_carrier}",
                   fontsize=10)
    ax_b.legend(fontsize=8, frameon=False)
    _style(ax_b)
    return [ax_e, ax_b]


def plot_batch_scaling(res: Any, *, axes: Any = None) -> list:
    """Log-log ``λ_max`` against ``B`` with error bars and the fits; implied learning rates."""
    ax_l, ax_r = _axes(axes, 2, (11.0, 4.0))
    B = np.asarray(res.batch_sizes, dtype=np.float64)
    mean, se = res.mean_lambda_max, res.stderr_lambda_max
    ax_l.errorbar(B, mean, yerr=se, fmt="o", color=_BLUE, capsize=3,
                  label=f"λ_max of mini-batch {res.curvature} (±s.e., {res.lambda_max.shape[1]} batches)")
    Bf = np.geomspace(B.min() / 1.3, max(B.max() * 1.3, res.num_samples), 200)
    fit = res.fit
    ax_l.plot(Bf, fit.predict(Bf), color=_RED,
              label=f"fit λ_∞ + κ/B: λ_∞ = {fit.lambda_inf:.3g}, κ = {fit.kappa:.3g}")
    ax_l.plot(Bf, res.fit_edge.predict(Bf), color=_ORANGE, linestyle=":", label="fit (a + b/√B)²")
    if np.isfinite(res.lambda_full_max):
        ax_l.axhline(res.lambda_full_max, color=_GREEN, linestyle="--",
                     label=f"full data (N = {res.num_samples}): {res.lambda_full_max:.3g}")
    ax_l.set_xscale("log")
    ax_l.set_yscale("log")
    ax_l.set_xlabel("batch size B")
    ax_l.set_ylabel("λ_max")
    ax_l.set_title(f"Sharpness vs batch size (chosen law {res.law}, B_crit = {fit.critical_batch_size:.3g})",
                   fontsize=10)
    ax_l.legend(fontsize=7, frameon=False)
    _style(ax_l)

    sgd = res.sgd_learning_rates
    ax_r.loglog(B, sgd, "o-", color=_BLUE, label=f"SGD 2/λ_max (slope {res.sgd_exponent:.2f})")
    ax_r.loglog(Bf, res.max_learning_rate(Bf), color=_RED, linewidth=0.8, alpha=0.7, label="SGD from the fit")
    adam = res.adam_learning_rates
    if np.isfinite(adam).all():
        ax_r.loglog(B, adam, "s-", color=_GREEN, label=f"Adam 2/λ_max(D^-½HD^-½) (slope {res.adam_exponent:.2f})")
    ref = sgd[0] * (B / B[0])
    ax_r.loglog(B, ref, color=_GREY, linestyle=":", linewidth=0.8, label="∝ B (linear)")
    ax_r.loglog(B, (adam[0] if np.isfinite(adam[0]) else sgd[0]) * np.sqrt(B / B[0]), color=_GREY,
                linestyle="--", linewidth=0.8, label="∝ √B")
    ax_r.set_xlabel("batch size B")
    ax_r.set_ylabel("largest stable learning rate")
    ax_r.set_title("Implied maximal learning rates", fontsize=10)
    ax_r.legend(fontsize=7, frameon=False)
    _style(ax_r)
    return [ax_l, ax_r]


def plot_hyperparameters(s: Any, *, ax: Any = None, floor: float = 1e-7) -> Any:
    """The quadrature density on a log axis with ``μ`` and ``L`` marked and the rates written."""
    (ax,) = _axes(ax, 1, (6.4, 4.0))
    if s.density is not None:
        t, phi = s.density.evaluate()
        ax.plot(t.numpy(), phi.numpy() + floor, color=_BLUE, linewidth=1.2, label="Lanczos density")
        ax.set_yscale("log")
    ax.axvline(s.lambda_max, color=_RED, linestyle="--", label=f"L = λ_max = {s.lambda_max:.3g}")
    ax.axvline(s.mu, color=_GREEN, linestyle="--", label=f"μ ({s.mu_rule}) = {s.mu:.3g}")
    text = (f"α* = {s.learning_rate:.3g}, ρ* = {s.momentum:.3f}\n2/L = {s.max_learning_rate:.3g}, "
            f"2(1+ρ)/L = {s.max_learning_rate_momentum:.3g}")
    ax.text(0.98, 0.97, text, transform=ax.transAxes, ha="right", va="top", fontsize=8)
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel("density (log scale)")
    ax.set_title("Heavy-ball learning rate and momentum from the spectrum", fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="center right")
    _style(ax)
    return ax
