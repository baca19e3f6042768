"""The report's figures (matplotlib, Agg backend): spectrum, per-layer curvature, analyses, Pareto front."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # the command writes files; never open windows
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import quant  # noqa: E402
from spectra import EigenResult, SpectralDensity  # noqa: E402

from .report import ERROR_BAR_SE, AnalysisSection, QuantSection, TraceSection, below_floor_mass, noise_floor  # noqa: E402

__all__ = ["density_per_decade", "plot_analyses", "plot_layers", "plot_pareto", "plot_spectrum"]

LN10 = math.log(10.0)


def density_per_decade(density: SpectralDensity, part: str = "positive", *,
                       floor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(|λ|, fraction of all eigenvalues per decade of |λ|)`` for one sign, above ``floor``.

    ``evaluate_log`` gives a density per unit ``|λ|``; multiplying by ``|λ| ln 10`` turns it into a
    density in ``log10 |λ|``, so equal areas on a log axis mean equal numbers of eigenvalues and
    the many tiny eigenvalues near zero no longer dominate the picture. Quadrature nodes with
    ``|θ| < floor`` (rounding noise) are left out and the grid starts at ``floor``, so the curve's
    area is the share of eigenvalues of that sign that the products resolve.

    Examples:
        >>> dens = SpectralDensity(torch.tensor([[1e-2, 1.0, 1e2]]), torch.tensor([[0.2, 0.3, 0.5]]), dim=3)
        >>> lam, per_decade = density_per_decade(dens)
        >>> round(float(torch.trapezoid(per_decade, lam.log10())), 3)
        1.0
        >>> lam, per_decade = density_per_decade(dens, floor=0.1)
        >>> round(float(torch.trapezoid(per_decade, lam.log10())), 2), float(lam[0]) >= 0.1
        (0.8, True)
    """
    kept = density.nodes.abs() >= floor
    sign = density.nodes > 0 if part == "positive" else density.nodes < 0
    mass = float((density.weights * kept * sign).sum() / density.weights.sum())
    if floor <= 0 and mass > 0:
        lam, p = density.evaluate_log(part=part)
        return lam, p * lam * LN10
    if mass == 0:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    trimmed = SpectralDensity(density.nodes, density.weights * kept, dim=density.dim)
    top = float(density.nodes.abs().max())
    grid = torch.logspace(math.log10(floor), math.log10(top) + 0.2, 1024, dtype=torch.float64)
    lam, p = trimmed.evaluate_log(grid, part=part, epsilon=floor / 10, normalize=False)
    per_decade = p * lam * LN10
    area = float(torch.trapezoid(per_decade, lam.log10()))
    return lam, per_decade * (mass / area if area > 0 else 0.0)


def _marks(ax, top: EigenResult | None) -> None:
    if top is None:
        return
    for i, value in enumerate(top.eigenvalues.tolist()):
        label = "top eigenvalues (Lanczos)" if i == 0 else None
        ax.axvline(value, color="tab:red", lw=0.9, ls="--", alpha=0.8, label=label)


def plot_spectrum(density: SpectralDensity, *, top: EigenResult | None, name: str,
                  bulk_edge: float | None = None, floor: float | None = None) -> Figure:
    """Two panels: the density over λ (log y) and the fraction of eigenvalues per decade of |λ|.

    The right panel starts at the noise ``floor`` (default :func:`~curvature.app.report.noise_floor`
    with ``top``'s largest eigenvalue, in float64): the share of the spectrum below it is written on
    the panel, not drawn as a hump of tiny eigenvalues.
    """
    if floor is None:
        floor = noise_floor(density, lambda_max=float(top.eigenvalues[0]) if top is not None else None)
    below = below_floor_mass(density, floor)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    density.plot(ax=ax1, title="")
    if ax1.get_legend() is not None:
        ax1.get_legend().remove()
    _marks(ax1, top)
    ax1.set_title("Eigenvalue density (SLQ, Gaussian-broadened)")
    ax1.set_xlabel("eigenvalue λ")
    ax1.set_ylabel("density (log scale)")
    for part, color in (("positive", "tab:blue"), ("negative", "tab:orange")):
        lam, per_decade = density_per_decade(density, part, floor=floor)
        if len(lam) == 0:
            continue
        label = "λ > 0" if part == "positive" else "λ < 0 (as |λ|)"
        ax2.plot(lam.numpy(), per_decade.numpy(), color=color, label=label)
    ax2.set_xscale("log")
    ax2.set_ylim(bottom=0)
    if floor > 0:
        ax2.set_xlim(left=floor)
        ax2.text(0.02, 0.97, f"|λ| < noise floor {floor:.2g} (max of √d·ε·|λ|max and SLQ σ):\n"
                 f"{100 * below:.1f}% of the spectrum, not resolved: not drawn",
                 transform=ax2.transAxes, va="top", fontsize=8, color="#555555")
    _marks(ax2, top)
    if bulk_edge is not None and math.isfinite(bulk_edge) and bulk_edge > 0:
        ax2.axvline(bulk_edge, color="tab:green", lw=1.2, ls=":", label="bulk edge (outlier analysis)")
    ax2.set_title("Eigenvalues per decade of |λ| (above the noise floor)")
    ax2.set_xlabel("|λ| (log scale)")
    ax2.set_ylabel("fraction of eigenvalues per decade")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    handles, labels = ax2.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.suptitle(f"Hessian spectrum: {name}")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def plot_layers(traces: TraceSection, *, name: str) -> Figure:
    """Per-layer Hessian trace per parameter (all of the module's parameters) with ± 2 s.e. bars.

    Not HAWQ-V2's sensitivity, which counts the weights only (the bit-plan table shows it).
    """
    layers = traces.layers
    labels = [f"{layer.label}, {layer.numel:,} params" for layer in layers]
    # Room for the longest label beside a 5-inch panel (GPT-2's "transformer.h.11.mlp.c_proj
    # (Conv1D), 2,360,064 params" would push a fixed-width panel and its title off the figure);
    # rows get narrower with many layers (75 at GPT-2 small).
    width = 5.0 + 0.075 * max((len(t) for t in labels), default=0)
    row = 0.5 if len(layers) <= 20 else 0.3
    height = row * len(layers) + 1.8
    fig, ax = plt.subplots(figsize=(width, height))
    values = [layer.trace.value / layer.numel for layer in layers]
    errors = [ERROR_BAR_SE * layer.trace.stderr / layer.numel for layer in layers]
    ax.barh(range(len(layers)), values, xerr=errors, color="#3a6ea5", ecolor="#333333", capsize=3)
    ax.set_yticks(range(len(layers)), labels)
    ax.set_ylim(len(layers) - 0.5, -0.5)
    ax.axvline(0, color="black", lw=0.8)
    kind = "exact" if traces.hessian.method == "exact" else f"± {ERROR_BAR_SE:g} s.e."
    ax.set_xlabel(f"Hessian trace / parameter, weights and biases ({kind})")
    fig.suptitle(f"Per-layer curvature: {name}")
    ax.grid(axis="x", alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / height))  # half an inch above the panel for the title
    return fig


def plot_analyses(section: AnalysisSection, *, name: str) -> Figure | None:
    """The outlier analysis and the ``H = G + R`` split, side by side (``None`` if neither ran; one
    panel where one was skipped, as the outliers at GPT-2 scale)."""
    panels = [p for p in (section.outliers, section.decomposition) if p is not None]
    if not panels:
        return None
    fig = plt.figure(figsize=(5.5 * len(panels), 4.2))
    if section.outliers is not None:
        ax = fig.add_subplot(1, len(panels), 1)
        o = section.outliers
        ev = o.eigenvalues.numpy()
        colors = ["tab:red" if i < o.count else "tab:blue" for i in range(len(ev))]
        ax.bar(range(1, len(ev) + 1), ev, color=colors)
        ax.set_yscale("log") if (ev > 0).all() and len(ev) else None
        if o.count > 0 and math.isfinite(o.bulk_edge) and o.bulk_edge > 0:
            ax.axhline(o.bulk_edge, color="tab:green", ls=":", label=f"bulk edge {o.bulk_edge:.3g}")
            ax.legend(loc="upper right", frameon=False)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("index of the top eigenvalue (converged)")
        ax.set_ylabel("eigenvalue")
        classes = f" vs {o.num_classes} classes" if o.num_classes else ""
        ax.set_title(f"Outliers: {o.count}{classes}")
        ax.grid(alpha=0.3)
    if section.decomposition is not None:
        ax = fig.add_subplot(1, len(panels), len(panels))
        dec = section.decomposition
        split = dec.top_split.numpy()
        idx = range(1, len(split) + 1)
        ax.bar(idx, split[:, 0], color="tab:blue", label="Gauss-Newton part xᵀGx")
        ax.bar(idx, split[:, 1], bottom=split[:, 0].clip(min=0) * (split[:, 1] > 0), color="tab:orange",
               label="residual part xᵀRx")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(list(idx))
        ax.set_xlabel("top eigenvector x of H")
        ax.set_ylabel("Rayleigh quotient")
        ax.set_title("H = G + R on the top eigenvectors")
        ax.legend(loc="upper right", frameon=False)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Spectral analyses: {name}")
    fig.tight_layout()
    return fig


def plot_pareto(section: QuantSection, *, name: str) -> Figure:
    """HAWQ-V2's Pareto frontier (size vs Ω) with the chosen and the uniform plans."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    highlight = {f"uniform {b}-bit": p for b, p in section.uniform.items()}
    quant.plot_pareto(list(section.frontier), ax=ax, highlight=highlight)
    # a ring, so a chosen plan that equals a uniform one does not hide it
    ax.scatter([section.plan.size_bytes / 1024], [section.plan.omega], s=180, facecolors="none",
               edgecolors="black", linewidths=1.6, zorder=5, label="chosen (≤ 4-bit size)")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"Mixed-precision bit plans: {name}")
    fig.tight_layout()
    return fig
