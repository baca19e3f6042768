"""Writing a report: ``summary.json``, ``report.md``, a self-contained ``report.html`` and the figures.

:class:`StagedOutput` checks the output folder before any work and moves a finished run into
place; :func:`write_report` (re)writes everything for the sections finished so far, so it can run
after each section.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from estimators import Estimate

from . import figures as plots
from .report import ERROR_BAR_SE, CurvatureReport
from .schema import SCHEMA_VERSION

__all__ = ["ARTEFACTS", "OutputError", "StagedOutput", "summary_dict", "to_markdown", "write_report"]


class OutputError(ValueError):
    """The output folder cannot be used (exit code 5)."""

    exit_code = 5


#: The files a run may write into its folder (a folder holding only these, plus any file its
#: ``summary.json`` lists, is an earlier run's output, which ``force=True`` may replace).
ARTEFACTS = ("summary.json", "report.md", "report.html", "spectrum.png", "layers.png", "analyses.png",
             "pareto.png", "density.npz", "bitplan.json")


def _listed_files(path: str) -> set[str]:
    try:
        with open(os.path.join(path, "summary.json")) as f:
            files = json.load(f).get("files", {})
        return {os.path.basename(str(v)) for v in files.values()} if isinstance(files, dict) else set()
    except (OSError, ValueError, AttributeError):
        return set()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class StagedOutput:
    """An output folder filled in a fresh staging folder beside it and moved into place at the end.

    Entering checks ``path`` before any work: it must be a folder that is absent or empty, or,
    with ``force=True``, one that holds only an earlier run's artefacts. Files go to
    :attr:`path` (the staging folder); :meth:`commit` replaces the target with it in two renames,
    so the target never holds a mix of two runs. Leaving without :meth:`commit` (an error) removes
    the staging folder and leaves the target as it was; :meth:`keep_partial` (an interrupt) moves
    the partial results into the target if it was empty, else keeps them beside it.

    Raises:
        OutputError: ``path`` is a file, cannot be written, holds other files, or holds an earlier
            run's results and ``force`` is false.

    Examples:
        >>> import tempfile
        >>> target = os.path.join(tempfile.mkdtemp(), "rep")
        >>> with StagedOutput(target) as staged:
        ...     _ = open(os.path.join(staged.path, "summary.json"), "w").write("{}")
        ...     staged.commit()
        >>> os.listdir(target)
        ['summary.json']
        >>> StagedOutput(target).__enter__()
        Traceback (most recent call last):
        ...
        curvature.app.output.OutputError: --out ...: holds the results of an earlier run (summary.json); ...
    """

    def __init__(self, target: str | os.PathLike, *, force: bool = False) -> None:
        self.target = os.path.abspath(os.fspath(target))
        self.shown = os.fspath(target)
        self.force = force
        self.path = ""
        self._done = False

    def _check_target(self) -> bool:
        """Whether the target exists (and may be replaced)."""
        if not os.path.lexists(self.target):
            return False
        if not os.path.isdir(self.target):
            raise OutputError(f"--out {self.shown}: exists and is not a folder; choose a folder name")
        entries = sorted(os.listdir(self.target))
        if not entries:
            return True
        ours = set(ARTEFACTS) | _listed_files(self.target)
        foreign = [e for e in entries if e not in ours]
        if foreign:
            raise OutputError(f"--out {self.shown}: holds files the command did not write ({', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}); choose an empty or new folder")
        if not self.force:
            raise OutputError(f"--out {self.shown}: holds the results of an earlier run ({', '.join(entries[:3])}"
                              f"{', ...' if len(entries) > 3 else ''}); pass --force to replace them or choose "
                              "another --out")
        return True

    def __enter__(self) -> StagedOutput:
        self._check_target()
        parent = os.path.dirname(self.target)
        try:
            os.makedirs(parent, exist_ok=True)
            self.path = tempfile.mkdtemp(prefix=f".{os.path.basename(self.target)}.partial-", dir=parent)
            os.chmod(self.path, 0o777 & ~_umask())  # mkdtemp's 0o700 would become the folder's mode
        except OSError as exc:
            raise OutputError(f"--out {self.shown}: cannot write there ({exc.strerror or exc})") from exc
        return self

    def commit(self) -> None:
        """Move the staging folder into place (replacing an earlier run's folder)."""
        exists = self._check_target()
        old = None
        if exists:
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(self.target)}.old-", dir=os.path.dirname(self.target))
            os.rename(self.target, os.path.join(old, "previous"))
        os.rename(self.path, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.path, self._done = self.target, True

    def keep_partial(self) -> str:
        """After an interrupt: the partial results go to the target if it was empty, else stay beside it."""
        if not os.path.lexists(self.target) or not os.listdir(self.target):
            self.commit()
            return self.shown
        self._done = True
        return self.path

    def __exit__(self, *exc_info: object) -> None:
        if not self._done and self.path:
            shutil.rmtree(self.path, ignore_errors=True)


def _clean(x: Any) -> Any:
    """JSON-ready: tensors and arrays to lists, non-finite floats to ``None``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().tolist()
    elif isinstance(x, np.ndarray):
        x = x.tolist()
    elif isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _est(e: Estimate | None) -> dict[str, Any] | None:
    if e is None:
        return None
    return _clean({"value": float(e.value), "stderr": float(e.stderr), "num_matvecs": int(e.num_matvecs),
                   "method": str(e.method)})


def _to_dict(obj: Any) -> dict[str, Any] | None:
    return None if obj is None else _clean(obj.to_dict())


def summary_dict(report: CurvatureReport, *, command: str = "report", files: dict[str, str] | None = None) -> dict:
    """The ``summary.json`` document (schema: :data:`curvature.app.schema.SUMMARY_SCHEMA`).

    Everything that differs between two runs with one seed (date, timings) is in ``"provenance"``;
    the rest is the same bytes.
    """
    s, t, e, sp, a, q = (report.summary, report.traces, report.eigenvalues, report.spectrum, report.analyses,
                         report.quantization)
    problem = None if s is None else _clean({
        "name": s.name, "num_params": s.num_params, "num_layers": s.num_layers, "num_samples": s.num_samples,
        "num_batches": s.num_batches, "loss": s.loss, "grad_norm": s.grad_norm,
        "metric": None if s.metric_name is None else {"name": s.metric_name, "value": s.metric},
        "info": s.info, "dtype": s.dtype, "device": s.device, "ggn_unavailable": s.ggn_unavailable,
    })
    traces = None if t is None else {
        "hessian": _est(t.hessian), "ggn": _est(t.ggn), "alternatives": {k: _est(v) for k, v in t.alternatives.items()},
        "layers": [{"name": layer.name, "type": layer.type, "numel": layer.numel, "trace": _est(layer.trace),
                    "trace_per_param": _clean(layer.trace.value / layer.numel)} for layer in t.layers],
        "notes": list(t.notes),
    }

    def pairs(result: Any, true: torch.Tensor) -> list[dict[str, Any]]:
        return [_clean({"value": float(v), "solver_residual": float(r), "true_relative_residual": float(tr),
                        "converged": bool(c)})
                for v, r, tr, c in zip(result.eigenvalues, result.residuals, true, result.converged)]

    eigen = None if e is None else {"top": pairs(e.top, e.top_true_residuals),
                                    "smallest": pairs(e.bottom, e.bottom_true_residuals)[0]}
    spectrum = None if sp is None else _clean({
        "num_probes": sp.density.num_probes, "num_steps": sp.density.num_steps, "support": list(sp.density.support()),
        "trace": _est(sp.trace), "negative_mass": sp.negative_mass, "noise_floor": sp.noise_floor,
        "below_noise_floor_mass": sp.below_floor_mass,
    })
    analyses = None if a is None else {
        "outliers": _to_dict(a.outliers), "decomposition": _to_dict(a.decomposition),
        "hyperparameters": _to_dict(a.hyperparameters), "skipped": dict(a.skipped),
    }
    quantization = None if q is None else _clean({
        "plan": q.plan.to_dict(), "budget_bytes": q.budget_bytes,
        "uniform": {str(b): {"size_bytes": p.size_bytes, "omega": p.omega} for b, p in q.uniform.items()},
        "layers": [{**v.to_dict(), "score_stderr": v.score_stderr} for v in q.sensitivities.values()],
    })
    return {
        "schema_version": SCHEMA_VERSION, "command": command, "complete": report.complete, "sections": report.finished,
        "problem": problem, "traces": traces, "eigenvalues": eigen, "spectrum": spectrum, "analyses": analyses,
        "quantization": quantization, "skipped": dict(report.skipped), "files": dict(files or {}),
        "provenance": provenance_dict(report),
    }


def provenance_dict(report: CurvatureReport) -> dict[str, Any] | None:
    """The run's :class:`~curvature.app.provenance.Provenance` with the sections' timings (``None`` if unknown)."""
    if report.provenance is None:
        return None
    return _clean(report.provenance.with_timings(report.timings).to_dict())


def _pm(e: Estimate) -> str:
    if e.stderr == 0:
        return f"{float(e.value):.6g} (exact)"
    if not math.isfinite(float(e.stderr)):
        return f"{float(e.value):.6g} (no error bar: one sample)"
    return f"{float(e.value):.6g} ± {ERROR_BAR_SE * float(e.stderr):.2g}"


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n:,} {word if n == 1 else plural or word + 's'}"


def _tables(report: CurvatureReport) -> list[tuple[str, list[str], list[list[str]], list[str]]]:
    """``(heading, columns, rows, paragraphs)`` of each finished part, shared by Markdown and HTML."""
    out = []
    s, t, e, sp, a, q = (report.summary, report.traces, report.eigenvalues, report.spectrum, report.analyses,
                         report.quantization)
    if s is not None:
        rows = [["parameters", f"{s.num_params:,} in {_plural(s.num_layers, 'layer')}"],
                ["samples", f"{s.num_samples:,} in {_plural(s.num_batches, 'batch', 'batches')}"],
                ["loss", f"{s.loss:.6g}"], ["gradient norm", f"{s.grad_norm:.4g}"]]
        if s.metric is not None:
            rows.append([f"{s.metric_name} (analysed samples)", f"{s.metric:.4f}"])
        rows += [[k, f"{v:.4g}"] for k, v in s.info.items()]
        rows.append(["dtype / device", f"{s.dtype} / {s.device}"])
        notes = [f"GGN parts skipped: {s.ggn_unavailable}."] if s.ggn_unavailable else []
        out.append(("Problem", ["quantity", "value"], rows, notes))
    if t is not None:
        rows = [["tr(H), Hessian", _pm(t.hessian), t.hessian.method, f"{t.hessian.num_matvecs:,}"]]
        rows += [[f"tr(H), {name}", _pm(est), est.method, f"{est.num_matvecs:,}"]
                 for name, est in t.alternatives.items()]
        if sp is not None:
            rows.append(["tr(H), SLQ quadrature", _pm(sp.trace), "slq", f"{sp.trace.num_matvecs:,}"])
        if t.ggn is not None:
            rows.append(["tr(G), Gauss-Newton", _pm(t.ggn), t.ggn.method, f"{t.ggn.num_matvecs:,}"])
        notes = [f"Error bars are ± {ERROR_BAR_SE:g} standard errors everywhere in this report."] + list(t.notes)
        if sp is not None:
            from .report import disagreements

            notes += disagreements({"the best trace": t.hessian, "the SLQ trace": sp.trace})
        out.append(("Traces", ["quantity", "estimate", "method", "products"], rows, notes))
        rows = [[layer.label, f"{layer.numel:,}", _pm(layer.trace), f"{layer.trace.value / layer.numel:.4g}"]
                for layer in t.layers]
        out.append(("Per-layer Hessian traces", ["layer", "parameters", "trace", "trace / parameter"], rows,
                    ["One shared set of probes for all layers; every parameter of a module (weights and biases) "
                     "counts. HAWQ-V2's sensitivity (weights only) is in the bit-plan table."]))
    if e is not None:
        rows = [[f"λ{i + 1}", f"{float(v):.6g}", f"{float(r):.2g}", f"{float(tr):.2g}", "yes" if bool(c) else "no"]
                for i, (v, r, tr, c) in enumerate(zip(e.top.eigenvalues, e.top.residuals, e.top_true_residuals,
                                                      e.top.converged))]
        rows.append(["λ_min", f"{float(e.bottom.eigenvalues[0]):.6g}", f"{float(e.bottom.residuals[0]):.2g}",
                     f"{float(e.bottom_true_residuals[0]):.2g}", "yes" if bool(e.bottom.converged[0]) else "no"])
        notes = ["True residual: ‖Hv − λv‖/|λ| from one extra product with the returned vectors (the solver's "
                 "own estimate can be far smaller than what float32 products reach)."]
        unconverged = [f"λ{i + 1}" for i, c in enumerate(e.top.converged) if not bool(c)]
        if not bool(e.bottom.converged[0]):
            unconverged.append("λ_min")
        if unconverged:
            notes.append(f"Not converged to the tolerance: {', '.join(unconverged)} (see the true residual; use a "
                         "larger budget without --quick to trust them).")
        out.append(("Extreme eigenvalues", ["", "eigenvalue", "solver residual", "true relative residual",
                                            "converged"], rows, notes))
    if sp is not None:
        lo, hi = sp.density.support()
        out.append(("Eigenvalue density", ["quantity", "value"], [
            ["probes × Lanczos steps", f"{sp.density.num_probes} × {sp.density.num_steps}"],
            ["support", f"[{lo:.4g}, {hi:.4g}]"],
            ["spectral mass below −1% of λ1", f"{100 * sp.negative_mass:.2f}%"],
            ["noise floor (the larger of √d·ε·λmax and the SLQ kernel width)",
             f"{sp.noise_floor:.3g}, with {100 * sp.below_floor_mass:.1f}% of the spectrum below it"],
        ], ["The right panel shows the fraction of eigenvalues per decade of |λ|, so equal areas mean "
            "equal counts; eigenvalues below the noise floor are not resolved (rounding or quadrature "
            "resolution) and are not drawn."]))
    if a is not None:
        rows, notes = [], []
        if a.outliers is not None:
            o = a.outliers
            vs = f" (C = {o.num_classes}: matches {o.matches})" if o.num_classes and o.matches else (
                f" (C = {o.num_classes})" if o.num_classes else "")
            rows.append(["outliers above the bulk", f"{o.count}{vs}{'' if o.conclusive else ', inconclusive'}"])
            if o.count > 0:
                rows.append(["bulk edge (largest bulk eigenvalue)", f"{o.bulk_edge:.4g}"])
                rows.append(["outliers' share of tr(H)", f"{100 * o.outlier_share:.1f}%"])
        if a.decomposition is not None:
            names = ("H", "G", "R")
            for name, term in zip(names, a.decomposition.terms):
                rows.append([f"{name}: top / bottom eigenvalue, trace",
                             f"{float(term.top[0]):.4g} / {float(term.bottom[0]):.4g}, "
                             f"{term.trace:.4g} ± {ERROR_BAR_SE * term.trace_stderr:.2g}"])
        if a.hyperparameters is not None:
            h = a.hyperparameters
            rows.append(["suggested SGD learning rate / momentum", f"{h.learning_rate:.3g} / {h.momentum:.3g}"])
            rows.append(["largest stable learning rate: plain SGD (2/λ_max) / with that momentum",
                         f"{h.max_learning_rate:.3g} / {h.max_learning_rate_momentum:.3g}"])
            notes += _learning_rate_caveats(report)
        notes += [f"{k} skipped: {v}" for k, v in a.skipped.items()]
        out.append(("Spectral analyses", ["quantity", "value"], rows, notes))
    if q is not None:
        rows = [[name, f"{bits}", _score(q.sensitivities[name]) if name in q.sensitivities else ""]
                for name, bits in q.plan.bits.items()]
        notes = [f"Budget: the size of uniform 4-bit weights, {q.budget_bytes:,.0f} B. Chosen plan: "
                 f"{q.plan.size_bytes:,.0f} B, Ω = {q.plan.omega:.4g} (uniform 4-bit: Ω = {q.uniform[4].omega:.4g})."
                 if 4 in q.uniform else f"Chosen plan: {q.plan.size_bytes:,.0f} B, Ω = {q.plan.omega:.4g}."]
        notes.append("Sensitivity: HAWQ-V2's Tr(H_ww)/n of each layer's weight (biases excluded), from "
                     "quant.sensitivity with shared Rademacher probes; the one estimate every table and bitplan.json "
                     f"use, ± {ERROR_BAR_SE:g} s.e.")
        negative = [s for s in q.sensitivities.values() if s.score + ERROR_BAR_SE * s.score_stderr < 0]
        if negative:
            # HAWQ's Ω predicts a loss increase only at a minimum, where every Tr(H_ii) >= 0.
            verb = "has" if len(negative) == 1 else "have"
            notes.append(f"{_plural(len(negative), 'layer')} of {len(q.sensitivities)} {verb} a sensitivity below zero "
                         f"by more than {ERROR_BAR_SE:g} s.e. (e.g. {negative[0].name}): the Hessian is indefinite "
                         "there, as away from a minimum (random initialisation, early training). HAWQ assumes "
                         "Tr(H_ii) ≥ 0, so Ω is not a loss-change prediction and this plan is not one to use.")
        out.append(("HAWQ-V2 bit plan", ["layer", "bits", "sensitivity Tr(H_ww)/n"], rows, notes))
    if report.skipped:
        out.append(("Skipped", ["section", "why"], [[k, v] for k, v in report.skipped.items()], []))
    if report.provenance is not None:
        out.append(("Provenance", ["", ""], [list(row) for row in report.provenance.rows()], []))
    return out


def _score(sens: Any) -> str:
    err = ERROR_BAR_SE * sens.score_stderr
    return f"{sens.score:.4g} ± {err:.2g}" if err > 0 else f"{sens.score:.4g} (exact)"


#: Below this λ_max (2/λ_max above 20) a minimum is nearly flat: the curvature bound on the step
#: size is far above what gradient noise allows, and the suggested rates get a caveat.
FLAT_LAMBDA_MAX = 0.1


def _learning_rate_caveats(report: CurvatureReport) -> list[str]:
    """Why the suggested learning rate may not be usable: an unconverged or tiny λ_max."""
    h = report.analyses.hyperparameters
    notes = []
    e = report.eigenvalues
    if e is not None and not bool(e.top.converged[0]):
        notes.append("Caveat: λ1 did not converge, so the learning rates above rest on an unreliable λ_max.")
    lam_max = float(h.lambda_max)
    if lam_max < FLAT_LAMBDA_MAX:
        notes.append(f"Caveat: λ_max ≈ {lam_max:.3g} is tiny (a nearly flat minimum), so 2/λ_max allows steps of "
                     f"{h.max_learning_rate:.3g}; curvature alone ignores gradient noise and the loss beyond the "
                     "quadratic model, so treat these rates as upper bounds, not as settings to use.")
    return notes


_FIGURES = {"spectrum": ("spectrum.png", "Hessian spectrum"), "layers": ("layers.png", "Per-layer curvature"),
            "analyses": ("analyses.png", "Spectral analyses"), "pareto": ("pareto.png", "Bit-plan Pareto frontier")}


def _figures(report: CurvatureReport) -> dict[str, Figure]:
    figs: dict[str, Figure] = {}
    if report.spectrum is not None:
        o = report.analyses.outliers if report.analyses else None
        edge = o.bulk_edge if o is not None and o.count > 0 else None
        figs["spectrum"] = plots.plot_spectrum(
            report.spectrum.density, floor=report.spectrum.noise_floor,
            top=report.eigenvalues.top if report.eigenvalues else None, name=report.name,
            bulk_edge=edge)
    if report.traces is not None:
        figs["layers"] = plots.plot_layers(report.traces, name=report.name)
    if report.analyses is not None:
        fig = plots.plot_analyses(report.analyses, name=report.name)
        if fig is not None:
            figs["analyses"] = fig
    if report.quantization is not None:
        figs["pareto"] = plots.plot_pareto(report.quantization, name=report.name)
    return figs


def to_markdown(report: CurvatureReport, figure_files: dict[str, str] | None = None) -> str:
    """The report as Markdown (figures referenced by file name)."""
    lines = [f"# Curvature report: {report.name}", ""]
    if not report.complete:
        lines += [f"*Incomplete: finished sections {', '.join(report.finished) or 'none'}.*", ""]
    for heading, columns, rows, notes in _tables(report):
        lines += [f"## {heading}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines += [""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    for key, path in (figure_files or {}).items():
        lines += [f"![{_FIGURES[key][1]}]({path})", ""]
    if report.timings:
        lines.append("Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report.timings.items()))
    return "\n".join(lines) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222;line-height:1.4}
table{border-collapse:collapse;margin:0.5em 0 1em}td,th{border:1px solid #bbb;padding:4px 10px;text-align:left}
th{background:#e8eef6}figure{margin:1em 0}img{max-width:100%;border:1px solid #ddd}
.note{color:#555;font-size:0.92em}.warn{background:#fff4d6;padding:6px 10px;border-left:4px solid #e0a800}"""


def to_html(report: CurvatureReport, images: dict[str, bytes]) -> str:
    """A self-contained HTML page: tables and the figures embedded as base64 PNG data URIs."""
    esc = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Curvature report: {esc(report.name)}</title>"
             f"<style>{_CSS}</style></head><body><h1>Curvature report: {esc(report.name)}</h1>"]
    if not report.complete:
        parts.append(f"<p class='warn'>Incomplete: finished sections {esc(', '.join(report.finished) or 'none')}.</p>")
    for heading, columns, rows, notes in _tables(report):
        parts.append(f"<h2>{esc(heading)}</h2><table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows]
        parts.append("</table>" + "".join(f"<p class='note'>{esc(n)}</p>" for n in notes))
    if images:
        parts.append("<h2>Figures</h2>")
    for key, png in images.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<figure><img alt='{esc(_FIGURES[key][1])}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{esc(_FIGURES[key][1])}</figcaption></figure>")
    if report.timings:
        parts.append("<p class='note'>Timings (s): " + esc(", ".join(f"{k} {v:.1f}" for k, v in report.timings.items()))
                     + "</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: CurvatureReport, out: str, *, command: str = "report", figures: bool = True) -> dict[str, str]:
    """Write every artefact of the finished sections into ``out``; return ``{kind: path}``.

    Files: ``summary.json``, ``report.md``, ``report.html`` (self-contained), the figures
    (``spectrum.png``, ``layers.png``, ``analyses.png``, ``pareto.png``), ``density.npz``
    (``spectra.SpectralDensity.load``) and ``bitplan.json`` (``quant.BitPlan``). With
    ``figures=False`` only the numbers (``summary.json``, ``report.md``, the density and the plan)
    are written, which is cheap enough to do after every section.
    """
    paths: dict[str, str] = {}
    images: dict[str, bytes] = {}
    for key, fig in (_figures(report) if figures else {}).items():
        path = os.path.join(out, _FIGURES[key][0])
        fig.savefig(path, dpi=120)
        plt.close(fig)
        with open(path, "rb") as f:
            images[key] = f.read()
        paths[key + "_figure"] = path
    if report.spectrum is not None:
        paths["density"] = os.path.join(out, "density.npz")
        report.spectrum.density.save(paths["density"])
    if report.quantization is not None:
        paths["bitplan"] = os.path.join(out, "bitplan.json")
        with open(paths["bitplan"], "w") as f:  # quant's schema plus the run's provenance
            json.dump({**report.quantization.plan.to_dict(), "provenance": provenance_dict(report)}, f, indent=2)
            f.write("\n")
    paths["markdown"] = os.path.join(out, "report.md")
    with open(paths["markdown"], "w") as f:
        f.write(to_markdown(report, {k: _FIGURES[k][0] for k in images}))
    if figures:
        paths["html"] = os.path.join(out, "report.html")
        with open(paths["html"], "w") as f:
            f.write(to_html(report, images))
    paths["summary"] = os.path.join(out, "summary.json")
    files = {k: os.path.basename(v) for k, v in paths.items()}
    with open(paths["summary"], "w") as f:
        json.dump(summary_dict(report, command=command, files=files), f, indent=2)
    return paths
