"""What one run of the command leaves behind: one folder per run, its provenance, same seed same bytes."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import curvature  # noqa: E402
from curvature.app import ReportSettings, curvature_report  # noqa: E402
from curvature.app.builtin import BUILTIN_PROBLEMS  # noqa: E402
from curvature.app.cli import EXIT_CODES, main  # noqa: E402
from curvature.app.figures import density_per_decade, plot_spectrum  # noqa: E402
from curvature.app.output import to_markdown  # noqa: E402
from quant import BitPlan  # noqa: E402
from spectra import SpectralDensity  # noqa: E402

from .cli_problems import build_tiny  # noqa: E402
from .conftest import ROOT  # noqa: E402

PROBLEMS = ROOT / "tests" / "app" / "cli_problems.py"
TINY = f"{PROBLEMS}:build_tiny"


def _run(capsys, command: str, out, *args: str) -> int:
    code = main([command, "--problem", TINY, "--quick", "--no-progress", "--out", str(out), *args])
    capsys.readouterr()
    return code


def _snapshot(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def _numbers(folder) -> str:
    summary = json.loads((folder / "summary.json").read_text())
    summary.pop("provenance")
    return json.dumps(summary, sort_keys=True)


# ------------------------------------------------------------------ one folder, one run


def test_a_second_run_into_a_used_folder_is_refused_without_force(tmp_path, capsys):
    out = tmp_path / "rep"
    assert _run(capsys, "report", out) == 0
    before = _snapshot(out)
    code = main(["eigs", "--problem", TINY, "--quick", "--no-progress", "--out", str(out)])
    assert code == EXIT_CODES["output"] and "--force" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_force_replaces_the_whole_folder(tmp_path, capsys):
    out = tmp_path / "rep"
    assert _run(capsys, "report", out) == 0
    assert {"spectrum.png", "pareto.png", "bitplan.json"} <= set(os.listdir(out))
    assert _run(capsys, "eigs", out, "--force") == 0
    summary = json.loads((out / "summary.json").read_text())
    # no figure or plan of the earlier report is left beside the eigenvalues
    assert sorted(os.listdir(out)) == sorted(summary["files"].values())
    assert "spectrum.png" not in os.listdir(out) and summary["command"] == "eigs"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".rep.")]  # no staging folders left


def test_a_failed_run_leaves_the_earlier_report_untouched(tmp_path, capsys, monkeypatch):
    import curvature.app.cli as cli

    out = tmp_path / "rep"
    assert _run(capsys, "report", out) == 0
    before = _snapshot(out)
    real = cli.compute_sections

    def fails_after_two_sections(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            yield item
            if i == 1:
                raise RuntimeError("something broke in the middle")

    monkeypatch.setattr(cli, "compute_sections", fails_after_two_sections)
    assert _run(capsys, "report", out, "--force") == EXIT_CODES["internal"]
    assert _snapshot(out) == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".rep.")]


def test_a_folder_with_other_files_is_refused_even_with_force(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code = main(["eigs", "--problem", TINY, "--quick", "--no-progress", "--out", str(out), "--force"])
    assert code == EXIT_CODES["output"] and "notes.txt" in capsys.readouterr().err
    assert os.listdir(out) == ["notes.txt"]


# ------------------------------------------------------------------ provenance


def test_every_artefact_records_its_provenance(tmp_path, capsys):
    out = tmp_path / "rep"
    assert _run(capsys, "report", out, "--seed", "5", "--probes", "40") == 0
    prov = json.loads((out / "summary.json").read_text())["provenance"]
    assert prov["seed"] == 5 and prov["quick"] is True and prov["problem"] == TINY
    assert "--probes 40" in prov["command_line"] and prov["settings"]["num_matvecs"] == 40
    assert prov["versions"]["curvature"] == curvature.__version__ and prov["versions"]["torch"] == torch.__version__
    assert prov["device"] == "cpu" and prov["date"].startswith("20") and "deterministic" in prov["deterministic"]
    assert set(prov["timings_s"]) == {"summary", "traces", "eigenvalues", "spectrum", "analyses", "quantization"}
    plan = json.loads((out / "bitplan.json").read_text())
    assert plan["provenance"] == prov
    assert BitPlan.from_json(out / "bitplan.json").bits == BitPlan.from_dict(plan).bits
    for name in ("report.md", "report.html"):
        text = (out / name).read_text()
        assert "Provenance" in text and "--probes 40" in text and torch.__version__ in text


# ------------------------------------------------------------------ same seed, same numbers


def test_same_seed_same_bytes(tmp_path, capsys):
    for name in ("a", "b"):
        assert _run(capsys, "report", tmp_path / name, "--seed", "3") == 0
    assert _numbers(tmp_path / "a") == _numbers(tmp_path / "b")


def test_one_sensitivity_whichever_subcommand_computes_it(tmp_path, capsys):
    assert _run(capsys, "report", tmp_path / "r") == 0
    assert _run(capsys, "quantize", tmp_path / "q") == 0
    report, quantize = (json.loads((tmp_path / n / "summary.json").read_text())["quantization"] for n in "rq")
    assert report["layers"] == quantize["layers"] and report["plan"] == quantize["plan"]
    layer = report["layers"][0]
    assert layer["score_stderr"] > 0  # shown with its error bar
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert f"{layer['score']:.4g} ± " in markdown
    assert "HAWQ-V2's sensitivity (weights only) is in the bit-plan table" in markdown


# ------------------------------------------------------------------ --quick


def test_quick_analyses_the_same_problem(tmp_path, capsys):
    code = main(["eigs", "--problem", f"{PROBLEMS}:quick_aware", "--quick", "--json", "--no-progress",
                 "--out", str(tmp_path / "o")])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["problem"]["name"] == "quick=False"  # the builder never sees --quick
    assert summary["provenance"]["quick"] is True
    for name, builder in BUILTIN_PROBLEMS.items():
        assert "quick" not in inspect.signature(builder).parameters, name


# ------------------------------------------------------------------ the spectrum panel and the notes


def test_noise_is_not_drawn_as_signal():
    # a flat minimum's spectrum: most mass in +-4e-7 rounding noise around 0, a few real eigenvalues
    nodes = torch.tensor([[-4e-7, 3e-7, 0.05, 0.4, 2.0]], dtype=torch.float64)
    weights = torch.tensor([[0.55, 0.4, 0.03, 0.015, 0.005]], dtype=torch.float64)
    density = SpectralDensity(nodes, weights, dim=1000)
    floor = 1000 * torch.finfo(torch.float32).eps * 2.0
    lam, per_decade = density_per_decade(density, "negative", floor=floor)
    assert len(lam) == 0  # the only negative node is noise
    lam, per_decade = density_per_decade(density, "positive", floor=floor)
    assert float(lam.min()) >= floor
    area = float(torch.trapezoid(per_decade, lam.log10()))
    assert area == pytest.approx(0.05, rel=1e-6)  # the share of real positive eigenvalues
    fig = plot_spectrum(density, top=None, name="flat", floor=floor)
    right = fig.axes[1]
    assert [line.get_label() for line in right.get_lines()] == ["λ > 0"]
    assert min(line.get_xdata().min() for line in right.get_lines()) >= floor
    assert any("noise floor" in t.get_text() for t in right.texts)
    plt.close(fig)


@pytest.fixture(scope="module")
def tiny_report():
    settings = ReportSettings.quick(sections=("summary", "eigenvalues", "spectrum", "analyses"))
    return curvature_report(build_tiny(), settings=settings, generator=torch.Generator().manual_seed(0))


def test_unconverged_eigenvalues_are_named(tiny_report):
    e = tiny_report.eigenvalues
    top = dataclasses.replace(e.top, converged=torch.tensor([True, False, True]))
    report = dataclasses.replace(tiny_report, eigenvalues=dataclasses.replace(e, top=top))
    assert "Not converged to the tolerance: λ2 " in to_markdown(report)


def test_learning_rate_on_a_flat_minimum_has_a_caveat(tiny_report):
    a = tiny_report.analyses
    assert "Caveat" not in to_markdown(tiny_report)
    flat = dataclasses.replace(a.hyperparameters, lambda_max=0.025, learning_rate=79.0, max_learning_rate=80.0)
    report = dataclasses.replace(tiny_report, analyses=dataclasses.replace(a, hyperparameters=flat))
    assert "Caveat: λ_max ≈ 0.025 is tiny" in to_markdown(report)


def test_the_non_convergence_warning_names_the_eigenvalue(caplog, monkeypatch):
    import spectra

    real = spectra.eigsh

    def second_pair_unconverged(*args, **kwargs):
        result = real(*args, **kwargs)
        return dataclasses.replace(result, converged=torch.arange(result.k) != 1)

    monkeypatch.setattr(spectra, "eigsh", second_pair_unconverged)
    settings = ReportSettings.quick(top_k=3, sections=("summary", "eigenvalues"))
    with caplog.at_level("WARNING", logger="curvature.app.report"):
        report = curvature_report(build_tiny(), settings=settings, generator=torch.Generator().manual_seed(0))
    named = [r.getMessage() for r in caplog.records if r.name == "curvature.app.report"]
    value = float(report.eigenvalues.top.eigenvalues[1])
    assert len(named) == 1 and named[0].startswith(f"λ2 = {value:.6g} did not converge"), named
    assert "Not converged to the tolerance: λ2 " in to_markdown(report)
