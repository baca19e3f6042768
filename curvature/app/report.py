"""A full curvature report of a model: traces, per-layer traces, top eigenvalues and the spectrum.

Application layer (like the CLI): it uses the estimators and spectra packages.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from matplotlib.axes import Axes
from torch import Tensor, nn

import estimators
import spectra
from curvature import GGN, Hessian
from estimators import TraceEstimate
from spectra import EigenResult, SpectralDensity

__all__ = ["CurvatureReport", "curvature_report"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurvatureReport:
    """Everything ``curvature report`` computes, as values (see :func:`curvature_report`).

    Attributes:
        name: what was analysed.
        summary: number of parameters, samples and batches, loss and gradient norm.
        hessian_trace: Hutchinson-family estimate of ``tr(H)`` (a ``TraceEstimate``).
        ggn_trace: the same for the GGN (``tr(H) - tr(G)`` is the curvature of the residual term).
        layer_traces: per-layer (module) trace estimates of ``H`` from the same probes.
        layer_sizes: each layer's parameter count; ``trace / numel`` is HAWQ-V2's sensitivity.
        top_eigenpairs: the ``EigenResult`` of the largest Hessian eigenvalues.
        bottom_eigenvalue: the smallest eigenvalue (an ``EigenResult`` with ``k=1``).
        density: the SLQ ``SpectralDensity`` of the Hessian.
        timings: seconds per stage.
        layer_types: each layer's module class name.
    """

    name: str
    summary: dict[str, Any]
    hessian_trace: TraceEstimate
    ggn_trace: TraceEstimate
    layer_traces: dict[str, TraceEstimate]
    layer_sizes: dict[str, int]
    top_eigenpairs: EigenResult
    bottom_eigenvalue: EigenResult
    density: SpectralDensity
    timings: dict[str, float] = field(default_factory=dict)
    layer_types: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary of the report's numbers."""

        def est(e: TraceEstimate) -> dict[str, Any]:
            return {"value": e.value, "stderr": e.stderr, "num_matvecs": e.num_matvecs, "method": e.method}

        top = self.top_eigenpairs
        return {
            "name": self.name,
            "summary": self.summary,
            "hessian_trace": est(self.hessian_trace),
            "ggn_trace": est(self.ggn_trace),
            "layers": {
                name: {**est(e), "numel": self.layer_sizes[name], "trace_per_param": e.value / self.layer_sizes[name]}
                for name, e in self.layer_traces.items()
            },
            "top_eigenvalues": top.eigenvalues.tolist(),
            "top_eigenvalue_residuals": top.residuals.tolist(),
            "top_eigenvalues_converged": top.converged.tolist(),
            "smallest_eigenvalue": self.bottom_eigenvalue.eigenvalues[0].item(),
            "density": {
                "num_probes": self.density.num_probes,
                "num_steps": self.density.num_steps,
                "support": list(self.density.support()),
                "mass_below_minus_1pct_of_top": self.negative_mass,
                "trace_from_slq": self.density.trace().value,
            },
            "timings_s": self.timings,
        }

    @property
    def negative_mass(self) -> float:
        """Fraction of the (quadrature) spectral mass below ``-1%`` of the top eigenvalue.

        The bulk of a trained network's spectrum straddles zero at the scale of the quadrature's
        resolution, so a plain ``λ < 0`` count mostly measures noise around zero.
        """
        nodes, weights = self.density.nodes, self.density.weights
        threshold = -0.01 * abs(self.top_eigenpairs.eigenvalues[0].item())
        return float((weights * (nodes < threshold)).sum() / weights.sum())

    def layer_label(self, name: str) -> str:
        kind = self.layer_types.get(name)
        return f"{name} ({kind})" if kind else name

    def to_markdown(self) -> str:
        """The report as a Markdown document (the figures are referenced by file name)."""
        s, h, g = self.summary, self.hessian_trace, self.ggn_trace
        top = self.top_eigenpairs
        lines = [
            f"# Curvature report: {self.name}",
            "",
            f"- parameters: {s['num_params']:,} in {s['num_layers']} layers; samples: {s['num_samples']:,} "
            f"in {s['num_batches']} batches",
            f"- loss: {s['loss']:.6g}; gradient norm: {s['grad_norm']:.4g}",
            f"- trace of the Hessian: {h.value:.6g} ± {h.stderr:.2g} ({h.method}, {h.num_matvecs} products)",
            f"- trace of the GGN: {g.value:.6g} ± {g.stderr:.2g}",
            f"- top eigenvalues of the Hessian: {', '.join(f'{v:.5g}' for v in top.eigenvalues.tolist())}"
            f" (max residual {top.residuals.max().item():.2g}, all converged: {bool(top.converged.all())})",
            f"- smallest eigenvalue: {self.bottom_eigenvalue.eigenvalues[0].item():.5g}; "
            f"|λ_min / λ_max| = {abs(self.bottom_eigenvalue.eigenvalues[0].item() / top.eigenvalues[0].item()):.3g}; "
            f"spectral mass below -1% of λ_max: {100 * self.negative_mass:.2f}%",
            f"- λ_max over the mean eigenvalue tr/d: {top.eigenvalues[0].item() / (h.value / s['num_params']):.4g}",
            "",
            "## Per-layer Hessian traces (one shared set of probes)",
            "",
            "| layer | parameters | trace | ± stderr | trace / parameter |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, e in self.layer_traces.items():
            n = self.layer_sizes[name]
            lines.append(f"| {self.layer_label(name)} | {n:,} | {e.value:.5g} | {e.stderr:.2g} | {e.value / n:.4g} |")
        lines += [
            "",
            "## Eigenvalue density (stochastic Lanczos quadrature)",
            "",
            f"{self.density.num_probes} probes × {self.density.num_steps} Lanczos steps; support "
            f"[{self.density.support()[0]:.4g}, {self.density.support()[1]:.4g}].",
            "",
            "![Hessian eigenvalue density](density.png)",
            "",
            "![Per-layer sensitivity](layers.png)",
            "",
            "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in self.timings.items()),
            "",
        ]
        return "\n".join(lines)

    def plot_layers(self, ax: Axes | None = None) -> Axes:
        """Bar chart of each layer's trace per parameter (HAWQ-V2 sensitivity) with 2-stderr bars."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(7, 0.45 * len(self.layer_traces) + 1.5))
        names = list(self.layer_traces)
        vals = [self.layer_traces[n].value / self.layer_sizes[n] for n in names]
        errs = [2 * self.layer_traces[n].stderr / self.layer_sizes[n] for n in names]
        ax.barh(range(len(names)), vals, xerr=errs, color="#3a6ea5", ecolor="#333333", capsize=3)
        ax.set_yticks(range(len(names)), [self.layer_label(n) for n in names])
        ax.invert_yaxis()
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel("Hessian trace per parameter (± 2 s.e.)")
        ax.set_title("Per-layer curvature")
        ax.grid(axis="x", alpha=0.3)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        return ax

    def save(self, directory: str | os.PathLike) -> dict[str, str]:
        """Write ``report.json``, ``report.md``, ``density.png``, ``layers.png`` and the density
        (``density.npz``, reloadable with ``SpectralDensity.load``); return the paths."""
        import matplotlib.pyplot as plt

        os.makedirs(directory, exist_ok=True)
        paths = {k: os.path.join(directory, f) for k, f in (
            ("json", "report.json"), ("markdown", "report.md"), ("density_figure", "density.png"),
            ("layers_figure", "layers.png"), ("density", "density.npz"))}
        with open(paths["json"], "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        with open(paths["markdown"], "w") as f:
            f.write(self.to_markdown())
        fig, ax = plt.subplots(figsize=(7, 4.2))
        self.density.plot(ax=ax, top_eigenvalues=self.top_eigenpairs, title=f"Hessian spectrum: {self.name}")
        fig.tight_layout()
        fig.savefig(paths["density_figure"], dpi=150)
        plt.close(fig)
        ax = self.plot_layers()
        ax.figure.tight_layout()
        ax.figure.savefig(paths["layers_figure"], dpi=150)
        plt.close(ax.figure)
        self.density.save(paths["density"])
        return paths


def _gradient_summary(H: Hessian) -> tuple[float, float]:
    """Mean loss and gradient norm over the data (sample-weighted like the operators)."""
    total_loss, grad, n_total = 0.0, None, 0
    for index, inputs, targets, n in H.batches():
        with torch.enable_grad():
            loss = H.loss(inputs, targets, index)
            g = torch.autograd.grad(loss, H.params, allow_unused=True, materialize_grads=True)
        w = n if H.loss_info.reduction == "mean" else 1
        flat = torch.cat([t.reshape(-1) for t in g]) * w
        grad = flat if grad is None else grad + flat
        total_loss += loss.item() * w
        n_total += n
    scale = n_total if H.loss_info.reduction == "mean" else 1
    return total_loss / scale, (grad / scale).norm().item()


def curvature_report(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    data: tuple[Any, Any] | Iterable[tuple[Any, Any]],
    *,
    name: str = "model",
    num_matvecs: int = 100,
    top_k: int = 5,
    slq_probes: int = 4,
    slq_steps: int = 80,
    tol: float = 1e-5,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> CurvatureReport:
    """Compute a :class:`CurvatureReport` of ``loss_fn(model(inputs), targets)`` over ``data``.

    Costs about ``2 num_matvecs`` products for the traces, a few hundred for the eigenvalues and
    ``slq_probes x slq_steps`` for the density.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
        >>> data = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
        >>> r = curvature_report(model, nn.CrossEntropyLoss(), data, num_matvecs=20, top_k=2,
        ...                      slq_probes=2, slq_steps=10, generator=torch.Generator().manual_seed(0))
        >>> sorted(r.layer_traces)
        ['0', '2']
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    timings: dict[str, float] = {}
    H = Hessian(model, loss_fn, data, progress=False)
    d = H.shape[0]
    with H:
        start = time.perf_counter()
        loss, grad_norm = _gradient_summary(H)
        num_batches, num_samples = H.num_batches, H.num_samples
        timings["gradient"] = time.perf_counter() - start

        start = time.perf_counter()
        layer_traces = estimators.block_traces(
            H, num_matvecs=num_matvecs, group_by_module=True, generator=gen, progress=progress
        )
        groups: dict[str, int] = {}
        for block in H.blocks:
            groups[block.module] = groups.get(block.module, 0) + block.numel
        hessian_trace = layer_traces.total
        timings["hessian traces"] = time.perf_counter() - start

        start = time.perf_counter()
        top = spectra.eigsh(H, k=min(top_k, d), which="LA", tol=tol, generator=gen)
        bottom = spectra.eigsh(H, k=1, which="SA", tol=tol, generator=gen)
        timings["eigenvalues"] = time.perf_counter() - start

        start = time.perf_counter()
        density = spectra.slq(H, num_probes=slq_probes, num_steps=min(slq_steps, d), generator=gen, progress=progress)
        timings["density"] = time.perf_counter() - start

    start = time.perf_counter()
    with GGN(model, loss_fn, data) as G:
        ggn_trace = estimators.trace(G, num_matvecs=num_matvecs, generator=gen, progress=progress)
    timings["ggn trace"] = time.perf_counter() - start
    summary = {
        "num_params": d,
        "num_layers": len(groups),
        "num_samples": num_samples,
        "num_batches": num_batches,
        "loss": loss,
        "grad_norm": grad_norm,
        "dtype": str(H.dtype),
        "device": str(H.device),
    }
    modules = dict(model.named_modules())
    types = {name: type(modules[name]).__name__ for name in groups if name in modules}
    return CurvatureReport(
        name, summary, hessian_trace, ggn_trace, layer_traces, groups, top, bottom, density, timings, types
    )
