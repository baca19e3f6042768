"""A curvature report of a problem, section by section: traces, eigenvalues, spectrum, analyses, bit plan.

Each section is a frozen dataclass of results. :func:`compute_sections` yields them one at a time
so the command can save each as soon as it is finished (Ctrl-C then keeps what was done);
:func:`curvature_report` runs them all and returns a :class:`CurvatureReport`.

Numbers carry their standard errors; tables and figures show ``± 2 s.e.`` everywhere.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch
from torch import Tensor, nn

import curvature
import estimators
import quant
import spectra
from curvature import GGN, Hessian
from curvature.checks import check_count, check_tolerance
from estimators import TraceEstimate
from spectra import EigenResult, SpectralDensity, SpectralSumEstimate, analysis

from .problem import Problem, check_problem
from .provenance import Provenance

__all__ = [
    "AnalysisSection",
    "CurvatureReport",
    "EigenSection",
    "LayerTrace",
    "QuantSection",
    "ReportSettings",
    "SpectrumSection",
    "SummarySection",
    "TraceSection",
    "compute_sections",
    "curvature_report",
    "disagreements",
    "below_floor_mass",
    "noise_floor",
]

logger = logging.getLogger(__name__)

#: Sections that are skipped (with the reason) rather than failing the report when they cannot run.
OPTIONAL_SECTIONS = ("analyses", "quantization")
OPTIONAL_SECTION_ERRORS = (ValueError, TypeError, KeyError, RuntimeError, NotImplementedError)

#: The error-bar width of every table and figure, in standard errors.
ERROR_BAR_SE = 2.0

#: Every section the report knows, in the order they are computed.
SECTIONS = ("summary", "traces", "eigenvalues", "spectrum", "analyses", "quantization")

#: Options that make every product of the report reproducible bit for bit (given the seed): the
#: Hessian's fixed double-backward rule and the output-space operators' ``"loop"`` backend, instead
#: of ``"auto"``'s per-process timing, whose choice changed the last bits between two runs.
DETERMINISTIC = {"deterministic": True}


@dataclass(frozen=True)
class ReportSettings:
    """Budgets of a report (``quick()`` for smoke tests; every field has a sensible default).

    Attributes:
        num_matvecs: product budget of each trace estimate; traces are exact when the number of
            parameters ``d`` is at most this.
        top_k: top eigenvalues (with true residuals).
        slq_probes, slq_steps: the spectral density's probes and Lanczos steps.
        tol: eigensolver tolerance (relative residual).
        eig_max_iter: products each eigensolve of the eigenvalue section may spend; pairs not
            converged by then are reported as such (at GPT-2 small one product takes ~10 s on a
            CPU, and a 7-vector basis may need hundreds for ``tol=1e-5``).
        outlier_window: top eigenvalues the outlier analysis examines.
        decompose_k: extreme eigenvalues per term of ``H = G + R``; ``decompose_max_iter`` caps
            the products of each of its eigensolves and ``decompose_trace_matvecs`` those of each
            of its three traces.
        quant_matvecs: Hutchinson products of the HAWQ sensitivities.
        bit_choices: bit-widths the bit plan chooses from.
        graph_cache_bytes: memory the operators may keep for cached graphs.
        sections: which sections to compute (of ``summary``, ``traces``, ``eigenvalues``, ``spectrum``,
            ``analyses``, ``quantization``).
    """

    num_matvecs: int = 120
    top_k: int = 5
    slq_probes: int = 4
    slq_steps: int = 80
    tol: float = 1e-5
    eig_max_iter: int = 500
    outlier_window: int = 30
    decompose_k: int = 2
    decompose_max_iter: int = 80
    decompose_trace_matvecs: int = 30
    quant_matvecs: int = 48
    bit_choices: tuple[int, ...] = (2, 4, 8)
    graph_cache_bytes: int = 1 << 30
    sections: tuple[str, ...] = SECTIONS

    def __post_init__(self) -> None:
        for name in ("num_matvecs", "top_k", "slq_probes", "slq_steps", "eig_max_iter", "outlier_window", "decompose_k",
                     "decompose_max_iter", "decompose_trace_matvecs", "quant_matvecs", "graph_cache_bytes"):
            check_count(getattr(self, name), name=name)
        check_tolerance(self.tol)
        for b in self.bit_choices:
            check_count(b, name="bit_choices")
        unknown = [x for x in self.sections if x not in SECTIONS]
        if unknown or not self.sections:
            raise ValueError(f"sections must be a non-empty subset of {SECTIONS}, got {self.sections}")

    def budgets(self) -> dict[str, Any]:
        """Every field, for the provenance record."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    @classmethod
    def quick(cls, **changes: Any) -> ReportSettings:
        """Small budgets on the same problem: every section runs, in seconds on the built-in problem."""
        base = dict(num_matvecs=30, top_k=3, slq_probes=2, slq_steps=30, tol=1e-3, eig_max_iter=100, outlier_window=20,
                    decompose_k=2, decompose_max_iter=40, decompose_trace_matvecs=12, quant_matvecs=12)
        base.update(changes)
        return cls(**base)


@dataclass(frozen=True)
class SummarySection:
    """What was analysed: sizes, loss, gradient norm, the problem's metric and extra numbers."""

    name: str
    num_params: int
    num_layers: int
    num_samples: int
    num_batches: int
    loss: float
    grad_norm: float
    metric_name: str | None
    metric: float | None
    info: dict[str, float]
    dtype: str
    device: str
    ggn_unavailable: str | None


@dataclass(frozen=True)
class LayerTrace:
    """The Hessian trace of one layer (module, by qualified name) and its size."""

    name: str
    type: str
    numel: int
    trace: TraceEstimate

    @property
    def label(self) -> str:
        """``"name (Type)"``, the layer's label in tables and figures."""
        return f"{self.name} ({self.type})" if self.name else f"(root) ({self.type})"


@dataclass(frozen=True)
class TraceSection:
    """Traces of the Hessian and the GGN, per-layer Hessian traces, and notes on disagreements.

    ``hessian`` is the best estimate for the budget (exact when ``d <= num_matvecs``); the others in
    ``alternatives`` estimate the same number and are compared with it in ``notes``.
    """

    hessian: TraceEstimate
    ggn: TraceEstimate | None
    layers: tuple[LayerTrace, ...]
    alternatives: dict[str, TraceEstimate]
    notes: tuple[str, ...]


@dataclass(frozen=True)
class EigenSection:
    """Extreme Hessian eigenvalues with the solver's and the true relative residuals ``‖Hv − λv‖/|λ|``."""

    top: EigenResult
    bottom: EigenResult
    top_true_residuals: Tensor
    bottom_true_residuals: Tensor


@dataclass(frozen=True)
class SpectrumSection:
    """The SLQ eigenvalue density and the spectral sums it gives for free.

    ``noise_floor`` is the smallest ``|λ|`` the density resolves, the larger of two limits:
    ``√d · ε · |λ|max`` (``ε`` the machine epsilon of the operator's dtype), the rounding error of
    a ``d``-term dot product relative to the largest eigenvalue (the probabilistic bound of
    Higham & Mary 2019; the worst case ``d · ε`` exceeds 1 in float32 beyond d = 8.4M and would
    call GPT-2 small's whole spectrum, its converged top eigenvalues included, unresolved); and
    the SLQ resolution, the
    Gaussian kernel width ``σ`` of the density (node spacing of ``num_steps`` Lanczos steps,
    :meth:`spectra.SpectralDensity.default_sigma`): a large cluster at zero comes out of Lanczos
    as symmetric ``±`` Ritz values of about that size. Quadrature nodes below the floor are not
    eigenvalues one can read off; ``below_floor_mass`` is their share of the spectrum, and the
    figure does not draw them as signal.
    """

    density: SpectralDensity
    trace: SpectralSumEstimate
    negative_mass: float
    noise_floor: float
    below_floor_mass: float


@dataclass(frozen=True)
class AnalysisSection:
    """Spectral analyses (:mod:`spectra.analysis`): outliers vs classes, ``H = G + R``, learning rate."""

    outliers: analysis.OutlierReport | None
    decomposition: analysis.Decomposition | None
    hyperparameters: analysis.HyperparameterSuggestion | None
    skipped: dict[str, str]


@dataclass(frozen=True)
class QuantSection:
    """A HAWQ-V2 bit plan under the size of uniform 4-bit weights, with the Pareto frontier."""

    sensitivities: dict[str, quant.LayerSensitivity]
    plan: quant.BitPlan
    uniform: dict[int, quant.BitPlan]
    frontier: tuple[quant.BitPlan, ...]
    budget_bytes: float


Section = Union[SummarySection, TraceSection, EigenSection, SpectrumSection, AnalysisSection, QuantSection]
SECTION_NAMES = {SummarySection: "summary", TraceSection: "traces", EigenSection: "eigenvalues",
                 SpectrumSection: "spectrum", AnalysisSection: "analyses", QuantSection: "quantization"}


@dataclass
class CurvatureReport:
    """The sections computed so far, their timings and the settings (complete once all are in).

    ``skipped`` names the optional sections (analyses, quantization) that could not run for this
    problem, with the reason; the report is still complete without them.
    """

    name: str
    settings: ReportSettings
    summary: SummarySection | None = None
    traces: TraceSection | None = None
    eigenvalues: EigenSection | None = None
    spectrum: SpectrumSection | None = None
    analyses: AnalysisSection | None = None
    quantization: QuantSection | None = None
    timings: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    provenance: Provenance | None = None

    def add(self, section: Section, seconds: float) -> None:
        """Store a finished section and its time."""
        key = SECTION_NAMES[type(section)]
        setattr(self, key, section)
        self.timings[key] = seconds

    @property
    def finished(self) -> list[str]:
        """Names of the sections computed."""
        return [k for k in self.settings.sections if getattr(self, k) is not None]

    @property
    def complete(self) -> bool:
        """Whether every requested section is in (or was skipped with a reason)."""
        return len(self.finished) + len(self.skipped) == len(self.settings.sections)


# ----------------------------------------------------------------------------- progress


@contextmanager
def _phase(label: str, progress: bool) -> Iterator[None]:
    """A status line on stderr around a phase (the command's progress, off in library use)."""
    start = time.perf_counter()
    if progress:
        print(f"[curvature] {label}...", file=sys.stderr, flush=True)
    yield
    if progress:
        print(f"[curvature] {label}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- estimates


def disagreements(named: dict[str, Any], *, threshold: float = ERROR_BAR_SE) -> list[str]:
    """Sentences for each pair of estimates of one quantity that differ by more than ``threshold``
    combined standard errors, with the likely reason.

    Examples:
        >>> a = TraceEstimate(10.0, 0.1, 100, "hutchinson", "rademacher")
        >>> b = TraceEstimate(12.0, 0.1, 100, "auto:xtrace", "sphere")
        >>> disagreements({"A": a, "B": b})[0][:40]
        'A = 10 ± 0.2 and B = 12 ± 0.2 differ by '
    """
    notes = []
    items = [(k, e) for k, e in named.items() if e is not None and math.isfinite(float(e.value))]
    for i, (na, a) in enumerate(items):
        for nb, b in items[i + 1:]:
            se = math.hypot(float(a.stderr), float(b.stderr))
            gap = abs(float(a.value) - float(b.value))
            if gap == 0 or (math.isfinite(se) and gap <= threshold * se):
                continue
            ratio = gap / se if se > 0 else math.inf
            reasons = []
            methods = {str(a.method), str(b.method)}
            if any("xtrace" in m for m in methods):
                reasons.append("XTrace's error estimate is known to be optimistic (Epperly, Tropp & Webber 2024)")
            if any(m in ("hutchinson", "slq") for m in methods):
                reasons.append("with few probes and a few dominant eigenvalues, vᵀHv is heavy-tailed and the "
                               "sample standard error itself is uncertain (use more --probes)")
            if not reasons:
                reasons.append("the standard errors are themselves estimates from few samples")
            notes.append(
                f"{na} = {float(a.value):.5g} ± {ERROR_BAR_SE * float(a.stderr):.2g} and {nb} = "
                f"{float(b.value):.5g} ± {ERROR_BAR_SE * float(b.stderr):.2g} differ by "
                f"{'more than' if not math.isfinite(ratio) else f'{ratio:.1f}'} combined s.e.: " + "; ".join(reasons)
            )
    return notes


def _exact_layer_traces(H: Hessian, *, progress: bool) -> tuple[dict[str, TraceEstimate], TraceEstimate]:
    """Exact per-module and total traces from the exact diagonal (``d`` products)."""
    diag = estimators.diagonal(H, method="exact", progress=progress)
    d = H.shape[0]
    per_module: dict[str, float] = {}
    for block in H.blocks:
        per_module[block.module] = per_module.get(block.module, 0.0) + float(diag.value[block.slice].sum())
    make = lambda v: TraceEstimate(v, 0.0, d, "exact", "unit")  # noqa: E731
    return {m: make(v) for m, v in per_module.items()}, make(float(diag.value.sum()))


def _true_residuals(H: Hessian, result: EigenResult) -> Tensor:
    """``‖H v − λ v‖ / |λ|`` for each pair, from one block product."""
    V = result.eigenvectors
    lam = result.eigenvalues.to(V.dtype)
    R = H @ V - V * lam
    return (R.double().norm(dim=0) / result.eigenvalues.abs().clamp_min(1e-300)).cpu()


def _metric_value(problem: Problem) -> float | None:
    """The problem's metric over all its data, by ``quant.evaluate_model``: accuracy is the fraction
    of predictions right (one per target entry, ``ignore_index`` targets left out, a causal LM's
    shift applied), a callable metric is averaged over samples."""
    if problem.metric is None:
        return None
    evaluation = quant.evaluate_model(problem.model, problem.loss_fn, problem.data, metric=problem.metric)
    return evaluation.accuracy if problem.metric == "accuracy" else evaluation.metric


def _summary(problem: Problem, H: Hessian, ggn_unavailable: str | None) -> SummarySection:
    total_loss, grad, weight = 0.0, None, 0.0
    # Batches weighted exactly as the operators weight them: by the loss's own normalizer
    # (valid tokens under ignore_index, summed class weights), not by the sample count.
    mean = H.loss_info.reduction == "mean"
    for batch in H.batch_source:
        if mean and batch.weight == 0:
            continue  # every target ignored: no part of the mean (its own loss is 0/0), as in the products
        with torch.enable_grad():
            loss = H.loss(batch.inputs, batch.targets, batch.index)
            g = torch.autograd.grad(loss, H.params, allow_unused=True, materialize_grads=True)
        w = batch.weight
        flat = torch.cat([t.reshape(-1) for t in g]) * w
        grad = flat if grad is None else grad + flat
        total_loss += loss.item() * w
        weight += w
    scale = weight if H.loss_info.reduction == "mean" else 1.0
    modules = {b.module for b in H.blocks}
    return SummarySection(
        name=problem.name, num_params=H.shape[0], num_layers=len(modules), num_samples=H.num_samples,
        num_batches=H.num_batches, loss=total_loss / scale, grad_norm=(grad / scale).norm().item(),
        metric_name=None if problem.metric is None else (
            problem.metric if isinstance(problem.metric, str) else getattr(problem.metric, "__name__", "metric")),
        metric=_metric_value(problem), info=dict(problem.info), dtype=str(H.dtype), device=str(H.device),
        ggn_unavailable=ggn_unavailable,
    )


def _traces(problem: Problem, H: Hessian, s: ReportSettings, gen: torch.Generator, progress: bool,
            ggn_unavailable: str | None) -> TraceSection:
    """Per-layer and total Hessian traces and the GGN trace: exact when ``d <= num_matvecs``."""
    d = H.shape[0]
    modules = dict(problem.model.named_modules())
    sizes: dict[str, int] = {}
    for block in H.blocks:
        sizes[block.module] = sizes.get(block.module, 0) + block.numel
    alternatives: dict[str, TraceEstimate] = {}
    if d <= s.num_matvecs:
        layer_est, best = _exact_layer_traces(H, progress=progress)
    else:
        per_layer = estimators.block_traces(H, num_matvecs=s.num_matvecs, group_by_module=True, generator=gen,
                                            progress=progress)
        layer_est = dict(per_layer)
        alternatives["Hutchinson (sum of the per-layer probes)"] = per_layer.total
        best = estimators.trace(H, num_matvecs=s.num_matvecs, method="auto", generator=gen, progress=progress)
        if per_layer.total.stderr < best.stderr:
            best, alternatives = per_layer.total, {f"trace ({best.method})": best}
    ggn = None
    if ggn_unavailable is None:
        with GGN(problem.model, problem.loss_fn, problem.data, graph_cache_bytes=s.graph_cache_bytes,
                 allow_train_mode=H.allow_train_mode, **DETERMINISTIC) as G:
            ggn = estimators.trace(G, num_matvecs=s.num_matvecs, method="auto", generator=gen, progress=progress)
    layers = tuple(
        LayerTrace(name, type(modules[name]).__name__ if name in modules else "?", sizes[name], est)
        for name, est in layer_est.items()
    )
    notes = disagreements({"tr(H)": best, **alternatives})
    return TraceSection(best, ggn, layers, alternatives, tuple(notes))


def _eigenvalues(H: Hessian, s: ReportSettings, gen: torch.Generator, progress: bool) -> EigenSection:
    d = H.shape[0]
    top = spectra.eigsh(H, k=min(s.top_k, d), which="LA", tol=s.tol, max_iter=max(s.eig_max_iter, s.top_k),
                        generator=gen, progress=progress)
    bottom = spectra.eigsh(H, k=1, which="SA", tol=s.tol, max_iter=s.eig_max_iter, generator=gen, progress=progress)
    section = EigenSection(top, bottom, _true_residuals(H, top), _true_residuals(H, bottom))
    pairs = (("λ{}", top, section.top_true_residuals), ("λ_min", bottom, section.bottom_true_residuals))
    for label, result, true in pairs:
        for i in range(result.k):
            if not bool(result.converged[i]):
                logger.warning("%s = %.6g did not converge to tol=%g (true relative residual %.2g)",
                               label.format(i + 1), float(result.eigenvalues[i]), s.tol, float(true[i]))
    return section


def noise_floor(density: SpectralDensity, *, lambda_max: float | None = None,
                dtype: torch.dtype = torch.float64) -> float:
    """The smallest ``|λ|`` the density resolves: ``max(√d · eps(dtype) · |λmax|, σ)``.

    ``√d · eps · |λmax|`` is the rounding error of the products (Higham & Mary 2019, "A new
    approach to probabilistic rounding error analysis": ``√d · eps`` for a ``d``-term sum with
    high probability, where the worst case ``d · eps`` is far too pessimistic at LM scale); ``σ``
    (:meth:`spectra.SpectralDensity.default_sigma`) the quadrature's resolution. ``lambda_max``
    defaults to the largest ``|node|``.

    Examples:
        >>> dens = SpectralDensity(torch.tensor([[-4e-7, 3e-7, 2.0]]), torch.tensor([[0.5, 0.4, 0.1]]), dim=1000)
        >>> noise_floor(dens) == max(1000**0.5 * torch.finfo(torch.float64).eps * 2.0, dens.default_sigma())
        True
    """
    scale = abs(lambda_max) if lambda_max is not None else float(density.nodes.abs().max())
    return max(math.sqrt(density.dim) * torch.finfo(dtype).eps * scale, density.default_sigma())


def below_floor_mass(density: SpectralDensity, floor: float) -> float:
    """Share of the spectral mass at ``|λ| < floor``."""
    w = density.weights
    return float((w * (density.nodes.abs() < floor)).sum() / w.sum())


def _spectrum(H: Hessian, s: ReportSettings, gen: torch.Generator, progress: bool,
              top: EigenResult | None) -> SpectrumSection:
    density = spectra.slq(H, num_probes=s.slq_probes, num_steps=min(s.slq_steps, H.shape[0]), generator=gen,
                          progress=progress)
    scale = abs(float(top.eigenvalues[0])) if top is not None else float(density.nodes.abs().max())
    nodes, weights = density.nodes, density.weights
    negative = float((weights * (nodes < -0.01 * scale)).sum() / weights.sum())
    floor = noise_floor(density, lambda_max=scale, dtype=H.dtype)
    return SpectrumSection(density, density.trace(), negative, floor, below_floor_mass(density, floor))


def _analyses(problem: Problem, H: Hessian, s: ReportSettings, gen: torch.Generator,
              report: CurvatureReport, ggn_unavailable: str | None, progress: bool) -> AnalysisSection:
    skipped: dict[str, str] = {}
    trace = report.traces.hessian if report.traces is not None else None
    k = min(s.outlier_window, H.shape[0])
    steps = min(max(3 * k, 60), H.shape[0])
    basis_bytes = steps * H.shape[0] * H.dtype.itemsize  # its Lanczos basis is kept for the Ritz vectors
    out = None
    if basis_bytes <= curvature.BASIS_BUDGET:
        out = analysis.outliers(H, num_classes=problem.num_classes, k=k, trace=trace, generator=gen,
                                num_steps=steps, max_steps=steps)
    else:
        budget = curvature.BASIS_BUDGET / 2**30
        skipped["outliers"] = (f"its {steps} Lanczos vectors would take {basis_bytes / 2**30:.1f} GiB "
                               f"(d = {H.shape[0]:,}), above curvature.BASIS_BUDGET ({budget:.0f} GiB)")
    dec = None
    if ggn_unavailable is None:
        dec = analysis.decompose(problem.model, problem.loss_fn, problem.data, k=s.decompose_k, tol=max(s.tol, 1e-4),
                                 max_iter=s.decompose_max_iter, trace_matvecs=s.decompose_trace_matvecs, generator=gen,
                                 allow_train_mode=H.allow_train_mode, graph_cache_bytes=s.graph_cache_bytes,
                                 progress=progress, **DETERMINISTIC)
    else:
        skipped["decomposition"] = ggn_unavailable
    hyper = None
    if report.spectrum is not None:
        hyper = analysis.suggest_hyperparameters(report.spectrum.density)
    else:
        skipped["hyperparameters"] = "needs the spectrum section"
    return AnalysisSection(out, dec, hyper, skipped)


def _quantization(problem: Problem, s: ReportSettings, gen: torch.Generator,
                  allow_train_mode: bool) -> QuantSection:
    sens = quant.sensitivity(problem.model, problem.loss_fn, problem.data, num_matvecs=s.quant_matvecs,
                             generator=gen, hessian_options={"allow_train_mode": allow_train_mode,
                                                             "graph_cache_bytes": s.graph_cache_bytes,
                                                             **DETERMINISTIC})
    uniform = {b: quant.make_plan(problem.model, sens, b) for b in s.bit_choices}
    budget = quant.make_plan(problem.model, sens, 4).size_bytes
    plan = quant.allocate_bits(problem.model, sens, bit_choices=s.bit_choices, max_size_bytes=budget)
    frontier = quant.pareto_frontier(problem.model, sens, bit_choices=s.bit_choices)
    return QuantSection(dict(sens), plan, uniform, tuple(frontier), budget)


def _section_generators(generator: torch.Generator | None, device: torch.device) -> dict[str, torch.Generator]:
    """One generator per section, seeded from one draw of ``generator`` and the section's name.

    A section's numbers then depend only on the seed, not on which other sections ran before it:
    ``curvature quantize`` and ``curvature report`` give the same sensitivities for one seed.
    """
    base = torch.Generator() if generator is None else generator
    if generator is None:
        base.seed()
    root = int(torch.randint(0, 2**62, (1,), generator=base, device=base.device))
    return {name: torch.Generator(device=device).manual_seed((root + zlib.crc32(name.encode())) % 2**63)
            for name in SECTIONS}


def compute_sections(
    problem: Problem,
    *,
    settings: ReportSettings | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    allow_train_mode: bool = False,
    report: CurvatureReport | None = None,
) -> Iterator[tuple[str, float]]:
    """Compute the sections of ``settings.sections`` into ``report``, yielding ``(name, seconds)`` after each.

    ``report`` (a fresh :class:`CurvatureReport` by default) holds the finished sections when the
    caller stops iterating or the run is interrupted.
    """
    s = settings or ReportSettings()
    report = report if report is not None else CurvatureReport(problem.name, s)
    checked = check_problem(problem, allow_train_mode=allow_train_mode)
    device = next(p for p in problem.model.parameters() if p.requires_grad).device
    gens = _section_generators(generator, device)
    H = Hessian(problem.model, problem.loss_fn, problem.data, graph_cache_bytes=s.graph_cache_bytes,
                allow_train_mode=allow_train_mode, **DETERMINISTIC)
    ggn_off = checked.ggn_unavailable
    steps: list[tuple[str, str, Callable[[], Section]]] = [
        ("summary", "loss, gradient and metric", lambda: _summary(problem, H, ggn_off)),
        ("traces", "traces (Hessian, GGN, per layer)",
         lambda: _traces(problem, H, s, gens["traces"], progress, ggn_off)),
        ("eigenvalues", f"top {s.top_k} and smallest eigenvalues (Lanczos)",
         lambda: _eigenvalues(H, s, gens["eigenvalues"], progress)),
        ("spectrum", "eigenvalue density (stochastic Lanczos quadrature)",
         lambda: _spectrum(H, s, gens["spectrum"], progress, report.eigenvalues.top if report.eigenvalues else None)),
        ("analyses", "spectral analyses (outliers, H = G + R, learning rate)",
         lambda: _analyses(problem, H, s, gens["analyses"], report, ggn_off, progress)),
        ("quantization", "HAWQ-V2 sensitivities and bit plan",
         lambda: _quantization(problem, s, gens["quantization"], allow_train_mode)),
    ]
    with H:
        for name, label, run in steps:
            if name not in s.sections:
                continue
            start = time.perf_counter()
            with _phase(label, progress):
                try:
                    section = run()
                except OPTIONAL_SECTION_ERRORS as exc:
                    if name not in OPTIONAL_SECTIONS:
                        raise
                    # the toolkit's higher layers may not support every model (e.g. tied weights in a
                    # bit plan); the core numbers stand without them, so say why and go on
                    report.skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    logger.warning("%s skipped: %s", name, report.skipped[name])
                    yield name, time.perf_counter() - start
                    continue
            seconds = time.perf_counter() - start
            report.add(section, seconds)
            yield name, seconds


def curvature_report(
    model: nn.Module | Problem,
    loss_fn: Callable[..., Tensor] | None = None,
    data: Any = None,
    *,
    name: str = "model",
    settings: ReportSettings | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    allow_train_mode: bool = False,
) -> CurvatureReport:
    """Compute every section of a :class:`CurvatureReport` of ``loss_fn(model(inputs), targets)`` over ``data``.

    Args:
        model: the model, or a whole :class:`~curvature.app.problem.Problem` (then omit ``loss_fn``/``data``).
        loss_fn, data: as for :class:`curvature.Hessian`.
        name: the model's name in the report.
        settings: budgets (:class:`ReportSettings`; ``ReportSettings.quick()`` for a fast look).
        generator: the only source of randomness (``None``: fresh OS-seeded).
        progress: status lines and tqdm bars on stderr.
        allow_train_mode: analyse a model in train mode anyway.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
        >>> data = (torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
        >>> r = curvature_report(model, nn.CrossEntropyLoss(), data, generator=g,
        ...                      settings=ReportSettings(num_matvecs=80, sections=("summary", "traces")))
        >>> [layer.label for layer in r.traces.layers], r.traces.hessian.method
        (['0 (Linear)', '2 (Linear)'], 'exact')
    """
    problem = model if isinstance(model, Problem) else Problem(model, loss_fn, data, name=name)
    s = settings or ReportSettings()
    report = CurvatureReport(problem.name, s)
    for _ in compute_sections(problem, settings=s, generator=generator, progress=progress,
                              allow_train_mode=allow_train_mode, report=report):
        pass
    return report
