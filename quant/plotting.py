"""Figures for bit plans: per-layer sensitivities and the size/Ω Pareto frontier (matplotlib)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .plan import BitPlan
from .sensitivity import LayerSensitivity

__all__ = ["plot_sensitivities", "plot_pareto"]


def _axes(ax: Any) -> Any:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 4))[1]


def plot_sensitivities(sensitivities: Mapping[str, LayerSensitivity], *, ax: Any = None, log: bool = True) -> Any:
    """Bar chart of each layer's score (``Tr(H_ii)/n_i`` or ``λ_i``) with ±2 standard errors.

    Returns the matplotlib axes.
    """
    ax = _axes(ax)
    names = list(sensitivities)
    values = [sensitivities[n].score for n in names]
    errors = [2 * sensitivities[n].score_stderr for n in names]
    metric = next(iter(sensitivities.values())).metric
    ax.bar(range(len(names)), values, yerr=errors, capsize=3, color="tab:blue")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{n}\n{sensitivities[n].kind}\n{sensitivities[n].num_params}" for n in names], fontsize=8)
    ax.set_xlabel("layer (type, weights)")
    ax.set_ylabel("average trace Tr(H_ii)/n_i" if metric == "trace" else "top eigenvalue λ_i")
    if log and all(v > 0 for v in values):
        ax.set_yscale("log")
    ax.set_title("HAWQ-V2 average trace per layer (±2 s.e.)" if metric == "trace"
                 else "HAWQ-V1 top eigenvalue per layer (±2 residual norms)")
    return ax


def plot_pareto(
    frontier: Sequence[BitPlan],
    *,
    ax: Any = None,
    highlight: Mapping[str, BitPlan] | None = None,
    others: Sequence[BitPlan] = (),
) -> Any:
    """The (size, Ω) Pareto frontier as a step line, with optional other plans and labelled points."""
    ax = _axes(ax)
    if others:
        ax.scatter([p.size_bytes / 1024 for p in others], [p.omega for p in others], s=8, color="0.6",
                   label="random plans", zorder=1)
    ax.step([p.size_bytes / 1024 for p in frontier], [p.omega for p in frontier], where="post", color="tab:blue",
            label="Pareto frontier (exact DP)", zorder=2)
    for label, plan in (highlight or {}).items():
        ax.scatter([plan.size_bytes / 1024], [plan.omega], s=40, zorder=3, label=label)
    ax.set_xlabel("model size (KiB)")
    ax.set_ylabel("predicted Ω = Σ Tr(H_ii)/n_i ‖ΔW_i‖²")
    if all(p.omega > 0 for p in frontier):
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("size vs Ω")
    return ax
