"""The report's numbers against exact dense references, and its figures."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from curvature import GGN, Hessian  # noqa: E402
from curvature.app import ReportSettings, curvature_report, summary_dict, validate  # noqa: E402
from curvature.app.figures import plot_analyses, plot_layers, plot_spectrum  # noqa: E402
from curvature.app.report import disagreements  # noqa: E402
from estimators import TraceEstimate  # noqa: E402
from spectra import SpectralDensity  # noqa: E402

from .cli_problems import build_tiny  # noqa: E402


def _dense_layer_traces(problem):
    H = Hessian(problem.model, problem.loss_fn, problem.data)
    dense = H.to_dense()
    per_layer: dict[str, float] = {}
    for block in H.blocks:  # independent of the report: block traces of the dense matrix
        per_layer[block.module] = per_layer.get(block.module, 0.0) + torch.diagonal(dense)[block.slice].sum().item()
    return dense, per_layer


@pytest.fixture(scope="module")
def exact_report():
    problem = build_tiny()
    settings = ReportSettings.quick(num_matvecs=60, top_k=3, slq_probes=3, slq_steps=30, tol=1e-10,
                                    sections=("summary", "traces", "eigenvalues", "spectrum"))
    return problem, curvature_report(problem, settings=settings, generator=torch.Generator().manual_seed(0))


def test_exact_path_when_the_budget_covers_d(exact_report):
    problem, report = exact_report
    dense, per_layer = _dense_layer_traces(problem)
    t = report.traces
    assert t.hessian.method == "exact" and t.hessian.stderr == 0
    assert t.hessian.value == pytest.approx(torch.trace(dense).item(), rel=1e-10, abs=1e-12)
    assert {layer.name: layer.trace.value for layer in t.layers} == pytest.approx(per_layer, rel=1e-10, abs=1e-12)
    assert [(layer.name, layer.type, layer.numel) for layer in t.layers] == [("0", "Linear", 24), ("2", "Linear", 21)]
    G = GGN(problem.model, problem.loss_fn, problem.data).to_dense()
    assert t.ggn.value == pytest.approx(torch.trace(G).item(), rel=1e-10)


def test_eigenvalues_and_true_residuals(exact_report):
    problem, report = exact_report
    dense, _ = _dense_layer_traces(problem)
    evals = torch.linalg.eigvalsh(dense)
    e = report.eigenvalues
    assert torch.allclose(e.top.eigenvalues, evals.flip(0)[:3], rtol=1e-8)
    assert e.bottom.eigenvalues[0].item() == pytest.approx(evals[0].item(), abs=1e-8)
    # the true residual is recomputed from the vectors: check it against the dense matrix
    V, lam = e.top.eigenvectors, e.top.eigenvalues
    expected = (dense @ V - V * lam).norm(dim=0) / lam.abs()
    assert torch.allclose(e.top_true_residuals, expected, rtol=1e-6, atol=1e-14)
    assert (e.top_true_residuals < 1e-8).all()


def test_summary_counts_and_metric(exact_report):
    problem, report = exact_report
    s = report.summary
    assert (s.num_params, s.num_layers, s.num_samples, s.num_batches) == (45, 2, 24, 2)
    correct = sum((problem.model(x).argmax(1) == y).sum().item() for x, y in problem.data)
    assert s.metric_name == "accuracy" and s.metric == pytest.approx(correct / 24)
    summary = summary_dict(report)
    assert validate(summary) == [] and summary["complete"] is True


def test_stochastic_layer_traces_against_independent_dense_blocks():
    problem = build_tiny()
    _, per_layer = _dense_layer_traces(problem)
    settings = ReportSettings(num_matvecs=40, sections=("summary", "traces"))  # 40 < d = 45: Hutchinson
    report = curvature_report(problem, settings=settings, generator=torch.Generator().manual_seed(3))
    for layer in report.traces.layers:
        assert layer.trace.method == "hutchinson" and layer.trace.stderr > 0
        assert abs(layer.trace.value - per_layer[layer.name]) < 4 * layer.trace.stderr
    total = sum(per_layer.values())
    assert abs(report.traces.hessian.value - total) < 4 * report.traces.hessian.stderr + 1e-9


def test_disagreement_notes():
    a = TraceEstimate(10.0, 0.1, 100, "hutchinson", "rademacher")
    b = TraceEstimate(10.25, 0.1, 100, "hutchinson", "rademacher")
    c = TraceEstimate(12.0, 0.1, 90, "auto:xtrace", "sphere")
    assert disagreements({"a": a, "b": b}) == []  # 1.8 combined s.e. apart: consistent
    notes = disagreements({"a": a, "c": c})
    assert len(notes) == 1 and "XTrace" in notes[0] and "14.1 combined s.e." in notes[0]


def test_figures_have_the_expected_axes(exact_report):
    _, report = exact_report
    fig = plot_spectrum(report.spectrum.density, top=report.eigenvalues.top, name="tiny MLP")
    left, right = fig.axes[:2]
    assert right.get_xscale() == "log" and "per decade" in right.get_ylabel()
    assert left.get_yscale() == "log" and "tiny MLP" in fig._suptitle.get_text()
    assert len(fig.legends) == 1 and left.get_legend() is None  # one legend, below the panels
    plt.close(fig)
    fig = plot_layers(report.traces, name="tiny MLP")
    assert "exact" in fig.axes[0].get_xlabel() and fig._suptitle.get_text() == "Per-layer curvature: tiny MLP"
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["0 (Linear), 24 params", "2 (Linear), 21 params"]
    plt.close(fig)


def test_layer_figure_keeps_long_labels_and_titles_inside():
    """75 GPT-2-style layers: every label, the title and the axis label lie inside the figure."""
    from curvature.app.report import LayerTrace, TraceSection

    est = TraceEstimate(1.0, 0.5, 30, "hutchinson", "rademacher")
    layers = tuple(LayerTrace(f"transformer.h.{i // 6}.mlp.c_proj", "Conv1D", 2_360_064, est) for i in range(75))
    fig = plot_layers(TraceSection(est, None, layers, {}, ()), name="GPT-2 small (random init)")
    fig.canvas.draw()
    box = fig.bbox
    texts = [fig._suptitle, fig.axes[0].xaxis.label, *fig.axes[0].get_yticklabels()]
    for t in texts:
        ext = t.get_window_extent()
        assert ext.x0 >= box.x0 - 1 and ext.x1 <= box.x1 + 1 and ext.y0 >= box.y0 - 1 and ext.y1 <= box.y1 + 1, t
    title = fig._suptitle.get_window_extent()
    assert not any(title.overlaps(t.get_window_extent()) for t in fig.axes[0].get_yticklabels())
    plt.close(fig)


def test_outliers_skipped_with_the_reason_when_their_basis_would_not_fit(monkeypatch, tmp_path):
    """GPT-2 small's 60 Lanczos vectors would take 30 GB: the report skips the outlier analysis,
    says why, and still writes every page and figure."""
    import curvature
    from curvature.app.output import write_report

    monkeypatch.setattr(curvature, "BASIS_BUDGET", 100)
    problem = build_tiny()
    settings = ReportSettings.quick(sections=("summary", "analyses"), decompose_k=1, decompose_max_iter=10)
    report = curvature_report(problem, settings=settings, generator=torch.Generator().manual_seed(0))
    assert report.analyses.outliers is None
    assert "Lanczos vectors" in report.analyses.skipped["outliers"]
    assert report.analyses.decomposition is not None
    fig = plot_analyses(report.analyses, name="tiny")  # one panel, not an empty half beside it
    assert [ax.get_title() for ax in fig.axes] == ["H = G + R on the top eigenvectors"]
    assert fig.axes[0].get_position().x0 < 0.3  # it was drawn in the right half of a 2-panel figure
    plt.close(fig)
    write_report(report, str(tmp_path))
    assert "Lanczos vectors" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "analyses.png").stat().st_size > 0
    assert "Lanczos vectors" in (tmp_path / "report.html").read_text()
    assert summary_dict(report)["analyses"]["outliers"] is None


def test_eigensolves_are_bounded_by_eig_max_iter():
    """At GPT-2 scale an eigensolve to tol=1e-5 could take hours: the section spends at most
    ``eig_max_iter`` products per solve and reports what did not converge."""
    problem = build_tiny()
    settings = ReportSettings(top_k=3, tol=1e-14, eig_max_iter=6, sections=("summary", "eigenvalues"))
    report = curvature_report(problem, settings=settings, generator=torch.Generator().manual_seed(0))
    assert report.eigenvalues.top.num_matvecs <= 6 and report.eigenvalues.bottom.num_matvecs <= 6
    assert not bool(report.eigenvalues.top.converged.all())
    with pytest.raises(ValueError, match="eig_max_iter"):
        ReportSettings(eig_max_iter=0)


def test_noise_floor_stays_below_the_top_eigenvalue_at_lm_scale():
    """GPT-2 small in float32 (d = 124M): the worst-case d·ε·λmax (2.5e4) exceeded λmax = 1659
    itself, so the report called the whole spectrum, converged top eigenvalues included,
    unresolved; √d·ε·λmax is 2.2 and the quadrature's σ sets the floor."""
    from curvature.app.report import noise_floor

    nodes = torch.tensor([[-40.0, 0.0, 40.0, 1659.0]], dtype=torch.float64)
    dens = SpectralDensity(nodes, torch.tensor([[0.3, 0.4, 0.3 - 1e-5, 1e-5]], dtype=torch.float64), dim=124_439_808)
    floor = noise_floor(dens, lambda_max=1659.0, dtype=torch.float32)
    assert floor == max(124_439_808**0.5 * torch.finfo(torch.float32).eps * 1659.0, dens.default_sigma())
    assert floor < 1659.0


def test_bit_plan_warns_when_sensitivities_are_significantly_negative():
    """At GPT-2's random initialisation many Tr(H_ii) < 0 and HAWQ's Ω came out negative with no
    word that the plan's premise (a minimum) does not hold."""
    import dataclasses

    from curvature.app.output import to_markdown

    settings = ReportSettings.quick(sections=("summary", "quantization"))
    report = curvature_report(build_tiny(), settings=settings, generator=torch.Generator().manual_seed(0))
    assert "not a loss-change prediction" not in to_markdown(report)
    q = report.quantization
    name, s = next(iter(q.sensitivities.items()))
    flipped = dataclasses.replace(s, trace=-abs(s.trace) - 10 * s.trace_stderr)
    report.quantization = dataclasses.replace(q, sensitivities={**q.sensitivities, name: flipped})
    text = to_markdown(report)
    assert "1 layer of" in text and " has a sensitivity" in text and f"(e.g. {name})" in text
    assert "not a loss-change prediction" in text
