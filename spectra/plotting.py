"""Figures: eigenvalue densities (Ghorbani et al. 2019 / PyHessian style) and loss landscapes."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

# This module draws results it is handed (duck-typed) and imports none of the modules defining
# them, so the results can delegate their ``plot`` methods here without an import circle.
__all__ = ["plot_block_spectra", "plot_density", "plot_landscape"]

_BLUE = "#1f5fa8"
_RED = "#c0392b"
_ORANGE = "#d35400"
_GREY = "#555555"


def _new_axes(ax: Any) -> Any:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    return ax


def _style(ax: Any) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.grid(True, which="major", alpha=0.25, linewidth=0.6)
    ax.tick_params(labelsize=9)


def _eigenvalues(top: Any) -> np.ndarray:
    values = getattr(top, "eigenvalues", top)
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return np.sort(np.atleast_1d(np.asarray(values, dtype=np.float64)))[::-1]


def _mark_eigenvalues(ax: Any, values: np.ndarray, *, absolute: bool = False) -> None:
    shown = ", ".join(f"{lam:.4g}" for lam in values[:4]) + (", …" if len(values) > 4 else "")
    noun = "eigenvalues" if len(values) > 1 else "eigenvalue"
    for i, lam in enumerate(values):
        ax.axvline(
            abs(lam) if absolute else lam,
            color=_RED,
            linestyle="--",
            linewidth=1.0,
            alpha=0.85,
            label=f"top-{len(values)} {noun} ({shown})" if i == 0 else None,
        )


def plot_density(
    density: Any,
    *,
    ax: Any = None,
    log: bool = True,
    top_eigenvalues: Any = None,
    log_lambda: bool = False,
    sigma: float | None = None,
    floor: float = 1e-7,
    title: str | None = None,
    color: str = _BLUE,
    label: str | None = None,
    xlabel: str = "Eigenvalue λ",
) -> Any:
    """Plot a :class:`~spectra.SpectralDensity` (see :meth:`SpectralDensity.plot`).

    Examples:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> from spectra import SpectralDensity
        >>> dens = SpectralDensity(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.5]]), dim=2)
        >>> plot_density(dens).get_yscale()
        'log'
    """
    if not floor > 0 and log:
        raise ValueError(f"floor must be > 0 on a log scale, got {floor}")
    ax = _new_axes(ax)
    default_title = (
        f"Eigenvalue density  (SLQ: {density.num_probes} "
        f"probe{'s' if density.num_probes > 1 else ''}"
        f" × {density.num_steps} steps, d = {density.dim:,})"
    )
    y_note = f"  (log scale, floor {floor:g})" if log else ""
    if log_lambda:
        curves = []
        for part, col, name in (("positive", color, "λ > 0"), ("negative", _ORANGE, "λ < 0")):
            nodes = density.nodes[density.weights > 0]
            if not bool(((nodes > 0) if part == "positive" else (nodes < 0)).any()):
                continue
            grid, dens = density.evaluate_log(sigma=sigma, part=part)
            curves.append((grid.numpy(), dens.numpy(), col, name))
        for grid, dens, col, name in curves:
            y = dens + floor if log else dens
            ax.plot(grid, y, color=col, linewidth=1.6, label=name)
            ax.fill_between(grid, floor if log else 0.0, y, color=col, alpha=0.18, linewidth=0)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel.replace("λ", "|λ|") + "  (log scale)")
        ax.set_ylabel("Density of |λ|" + y_note)
        peak = max(float(c[1].max()) for c in curves)
    else:
        grid_t, dens_t = density.evaluate(sigma=sigma)
        grid, dens = grid_t.numpy(), dens_t.numpy()
        y = dens + floor if log else dens
        width = density.default_sigma() if sigma is None else sigma
        ax.plot(grid, y, color=color, linewidth=1.6, label=label or f"SLQ density (σ = {width:.3g})")
        ax.fill_between(grid, floor if log else 0.0, y, color=color, alpha=0.18, linewidth=0)
        if grid[0] < 0 < grid[-1]:
            ax.axvline(0.0, color=_GREY, linewidth=0.8, linestyle=":", alpha=0.8)
        ax.set_xlim(grid[0], grid[-1])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("Density φ(λ)" + y_note)
        peak = float(dens.max())
    if log:
        ax.set_yscale("log")
        ax.set_ylim(floor * 0.5, max(peak * 3.0, floor * 10))
    else:
        ax.set_ylim(0, peak * 1.08)
    if top_eigenvalues is not None:
        _mark_eigenvalues(ax, _eigenvalues(top_eigenvalues), absolute=log_lambda)
    ax.set_title(default_title if title is None else title, fontsize=10.5)
    _style(ax)
    ax.legend(fontsize=8.5, loc="best", frameon=True, framealpha=0.9, edgecolor="none")
    return ax


def plot_landscape(landscape: Any, *, ax: Any = None, title: str | None = None, cmap: str = "viridis") -> Any:
    """Plot a :class:`~spectra.LossLandscape` (see :meth:`LossLandscape.plot`).

    Examples:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> from spectra import LossLandscape
        >>> ls = LossLandscape((torch.linspace(-1, 1, 3),), torch.tensor([1.0, 0.0, 1.0]), 0.0)
        >>> plot_landscape(ls).get_xlabel()
        'step α along direction 1'
    """
    ax = _new_axes(ax)
    eig = landscape.eigenvalues

    def axis_label(i: int) -> str:
        name = "αβ"[i]
        if eig is not None:
            return f"step {name} along eigenvector {i + 1} (λ{'₁₂'[i]} = {eig[i]:.4g})"
        return f"step {name} along direction {i + 1}"

    if landscape.ndim == 1:
        a = landscape.coords[0].numpy()
        ax.plot(a, landscape.losses.numpy(), color=_BLUE, linewidth=1.8, marker="o", markersize=3,
                label="loss")
        model = landscape.quadratic_model()
        if model is not None:
            ax.plot(a, model.numpy(), color=_RED, linestyle="--", linewidth=1.2,
                    label="quadratic model L + αgᵀu + ½λα²")
        ax.axvline(0.0, color=_GREY, linewidth=0.8, linestyle=":")
        ax.set_xlabel(axis_label(0))
        ax.set_ylabel("loss")
        ax.legend(frameon=False, fontsize=8.5)
        _style(ax)
    else:
        a, b = (c.numpy() for c in landscape.coords)
        Z = landscape.losses.numpy().T  # rows follow β (y), columns α (x)
        filled = ax.contourf(a, b, Z, levels=30, cmap=cmap)
        ax.contour(a, b, Z, levels=10, colors="white", linewidths=0.5, alpha=0.6)
        ax.figure.colorbar(filled, ax=ax, label="loss")
        ax.plot([0], [0], marker="*", color="white", markersize=10, markeredgecolor="black")
        ax.set_xlabel(axis_label(0))
        ax.set_ylabel(axis_label(1))
        ax.set_aspect("equal")
    ax.set_title(title if title is not None else f"Loss around the current parameters (L = {landscape.base_loss:.4g})",
                 fontsize=10.5)
    return ax


#: Colours of the block kinds (spectra.blockwise.block_kind), so a figure reads by role.
_KIND_COLORS = {
    "embedding": "#8e44ad", "attention query": "#1f5fa8", "attention key": "#2e86c1",
    "attention value": "#48c9b0", "attention qkv": "#1f5fa8", "attention output": "#117a65",
    "mlp": "#d35400", "layernorm": "#7f8c8d", "head": "#c0392b", "conv": "#1f5fa8",
    "linear": "#d35400", "batchnorm": "#7f8c8d",
}


def plot_block_spectra(
    spectra: Any,
    *,
    ncols: int | None = None,
    floor: float = 1e-6,
    max_label: int = 28,
    title: str | None = None,
) -> Any:
    """One figure of blockwise spectra (a :class:`~spectra.BlockSpectra`): each block's SLQ
    density on a log scale with its top eigenvalues, coloured by kind, and the matrix of
    Jensen-Shannon distances between the blocks' densities. Returns the figure.

    Examples:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> from curvature import DenseOperator, make_blocks
        >>> from spectra import block_spectra
        >>> H = DenseOperator(torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64)),
        ...                   blocks=make_blocks(["a", "b"], [(3,), (2,)]))
        >>> fig = plot_block_spectra(block_spectra(H, k=1, num_steps=3, generator=torch.Generator().manual_seed(0)))
        >>> len(fig.axes) >= 3
        True
    """
    import matplotlib.pyplot as plt

    blocks = list(spectra.blocks)
    n = len(blocks)
    if ncols is None:  # about square panels overall: 4 columns for 8 blocks, 7 for 38
        ncols = min(6, max(4, math.ceil(math.sqrt(n))))
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    panel_w, panel_h = 2.5, 1.75
    heat = max(4.2, min(0.2 * n + 2.5, 8.0))
    fig = plt.figure(figsize=(ncols * panel_w + heat + 0.6, max(nrows * panel_h + 0.9, heat)), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[ncols * panel_w, heat + 0.6])
    axes = np.atleast_1d(left.subplots(nrows, ncols, squeeze=False)).ravel()

    def short(name: str) -> str:
        return name if len(name) <= max_label else "…" + name[-(max_label - 1):]

    for ax, b in zip(axes, blocks):
        color = _KIND_COLORS.get(b.kind, _GREY)
        grid_t, dens_t = b.density.evaluate()
        grid, dens = grid_t.numpy(), dens_t.numpy()
        ax.fill_between(grid, floor, dens + floor, color=color, alpha=0.25, linewidth=0)
        ax.plot(grid, dens + floor, color=color, linewidth=1.2)
        for lam in b.eigenvalues.tolist():
            ax.axvline(lam, color=_RED, linestyle="--", linewidth=0.8, alpha=0.8)
        ax.set_yscale("log")
        ax.set_ylim(floor * 0.5, max(float(dens.max()) * 3, floor * 10))
        ax.set_xlim(grid[0], grid[-1])
        ax.set_title(f"{short(b.name)}\n{b.kind}, d = {b.dim:,}", fontsize=7.5)
        ax.tick_params(labelsize=6.5)
        ax.xaxis.get_offset_text().set_fontsize(6.5)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    for ax in axes[n:]:
        ax.set_visible(False)
    left.supxlabel("eigenvalue λ of the diagonal block, each on its own scale and kernel width"
                   "  (dashed: top eigenvalues)", fontsize=8.5)
    left.supylabel(f"SLQ density (log, floor {floor:g})", fontsize=8.5)

    ax = right.subplots()
    D = spectra.js_distances.numpy()
    # Scaled to the largest distance so small heterogeneity still shows (the bound is √ln2 ≈ 0.83).
    im = ax.imshow(D, cmap="magma_r", vmin=0.0, vmax=max(float(D.max()), 1e-3))
    labels = [short(b.name) for b in blocks]
    fs = 7 if n <= 20 else 5.5 if n <= 40 else 4.5
    ax.set_xticks(range(n), labels, rotation=90, fontsize=fs)
    ax.set_yticks(range(n), labels, fontsize=fs)
    for tick, b in zip(ax.get_yticklabels(), blocks):
        tick.set_color(_KIND_COLORS.get(b.kind, _GREY))
    for tick, b in zip(ax.get_xticklabels(), blocks):
        tick.set_color(_KIND_COLORS.get(b.kind, _GREY))
    right.colorbar(im, ax=ax, shrink=0.55, label="Jensen-Shannon distance (bound √ln2 ≈ 0.83)")
    ax.set_title(f"JS distance between block densities (one kernel, σ = {spectra.sigma:.3g})\n"
                 f"heterogeneity (mean over pairs) = {spectra.heterogeneity:.3f}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig
