"""The real ``curvature`` command: artefacts of a ``--quick`` report, subcommands, problem loading, Ctrl-C."""

from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import pytest  # noqa: E402

import curvature  # noqa: E402
from curvature.app import SUMMARY_SCHEMA, validate  # noqa: E402
from curvature.app.cli import main  # noqa: E402

from .conftest import ROOT, command_env, run_command  # noqa: E402

PROBLEMS = ROOT / "tests" / "app" / "cli_problems.py"
FIGURES = ("spectrum.png", "layers.png", "analyses.png", "pareto.png")


def _not_blank(path) -> None:
    image = mpimg.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05, f"{path} looks blank"


def test_quick_report_writes_every_artefact(quick_report):
    out = quick_report.out
    summary = json.loads((out / "summary.json").read_text())
    assert validate(summary, SUMMARY_SCHEMA) == []
    assert summary["complete"] and summary["command"] == "report"
    assert summary["provenance"]["quick"] is True  # quick budgets on the same 512 samples as a full run
    assert json.loads(quick_report.proc.stdout)["traces"] == summary["traces"]  # --json prints the summary
    problem = summary["problem"]
    assert problem["num_params"] == 3658 and problem["num_samples"] == 512 and problem["num_batches"] == 4
    assert problem["metric"]["name"] == "accuracy" and problem["metric"]["value"] > 0.8
    assert problem["info"]["held-out accuracy"] > 0.8
    layers = summary["traces"]["layers"]
    assert [(layer["name"], layer["type"]) for layer in layers] == [
        ("conv1", "Conv2d"), ("conv2", "Conv2d"), ("fc1", "Linear"), ("fc2", "Linear")]
    assert all(layer["trace"]["stderr"] > 0 for layer in layers)
    top = summary["eigenvalues"]["top"]
    assert len(top) == 3 and all(0 < e["true_relative_residual"] < 1e-2 for e in top)
    assert top[0]["value"] >= top[1]["value"] >= top[2]["value"] > 0
    assert summary["spectrum"]["trace"]["stderr"] > 0  # every number has an error bar
    assert summary["analyses"]["outliers"] is not None and summary["analyses"]["hyperparameters"] is not None
    assert set(summary["quantization"]["plan"]["bits"]) == {"conv1", "conv2", "fc1", "fc2"}
    for name in FIGURES:
        _not_blank(out / name)
        assert summary["files"][name.replace(".png", "_figure")] == name
    for name in ("report.md", "report.html", "density.npz", "bitplan.json"):
        assert (out / name).is_file()
    markdown = (out / "report.md").read_text()
    for name in re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown):
        assert (out / name).is_file()
    assert "± 2" in markdown and "1 layers" not in markdown


def test_html_embeds_the_figures(quick_report):
    html = (quick_report.out / "report.html").read_text()
    embedded = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(embedded) == len(FIGURES)
    files = {(quick_report.out / name).read_bytes() for name in FIGURES}
    assert {base64.b64decode(data) for data in embedded} == files  # self-contained: the very PNGs
    assert "src='" not in re.sub(r"src='data:[^']*'", "", html)  # no external references
    assert html.count("<table>") >= 6


def test_version_and_help():
    proc = run_command("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"curvature {curvature.__version__}"
    proc = run_command("report", "--help")
    assert proc.returncode == 0 and "Problem(model, loss_fn, data" in proc.stdout and "--budget-mb" in proc.stdout


def test_importing_the_core_does_not_import_the_app():
    code = "import sys, curvature; print('curvature.app' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], env=command_env(), capture_output=True, text=True)
    assert proc.stdout.split() == ["False"]


@pytest.mark.parametrize("command, sections", [
    ("trace", {"summary", "traces"}), ("eigs", {"summary", "eigenvalues"}),
    ("spectrum", {"summary", "eigenvalues", "spectrum"}), ("quantize", {"summary", "quantization"}),
])
def test_subcommands(command, sections, tmp_path, capsys):
    code = main([command, "--problem", f"{PROBLEMS}:build_tiny", "--quick", "--json", "--no-progress",
                 "--probes", "60", "--out", str(tmp_path)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert validate(summary, SUMMARY_SCHEMA) == []
    assert set(summary["sections"]) == sections and summary["command"] == command
    assert all(summary[k] is None for k in ("traces", "eigenvalues", "spectrum", "analyses", "quantization")
               if k not in sections)
    if command == "trace":  # d = 45 <= the budget of 60 products: exact traces
        assert summary["traces"]["hessian"]["method"] == "exact" and summary["traces"]["hessian"]["stderr"] == 0
    if command == "quantize":
        plan = json.loads((tmp_path / "bitplan.json").read_text())
        assert plan["schema_version"] == 1 and set(plan["bits"]) == {"0", "2"}
        assert plan["provenance"]["seed"] == 0 and plan["provenance"]["quick"] is True


def test_problem_module_from_cwd_and_file_with_neighbour(tmp_path):
    (tmp_path / "helper.py").write_text(
        "import torch\nfrom torch import nn\nfrom curvature.app import Problem\n"
        "def parts():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x, y = torch.randn(6, 3, generator=g), torch.randn(6, 2, generator=g)\n"
        "    return Problem(nn.Linear(3, 2).eval(), nn.MSELoss(), (x, y))\n"
    )
    (tmp_path / "myproblem.py").write_text("import helper\ndef build():\n    return helper.parts()\n")
    proc = run_command("eigs", "--problem", "myproblem:build", "--quick", "--json", "--no-progress", "--out", "o1",
                       cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["problem"]["num_params"] == 8
    elsewhere = tmp_path / "run"
    elsewhere.mkdir()
    proc = run_command("eigs", "--problem", "../myproblem.py:build", "--quick", "--json", "--no-progress",
                       "--out", "o2", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["problem"]["name"] == "../myproblem.py:build"


def test_ctrl_c_keeps_the_finished_sections(tmp_path):
    out = tmp_path / "rep"
    # A slow forward (20 ms): the report lasts minutes, so the interrupt always lands mid-run. The
    # child gets Ctrl-C's default disposition, as in a terminal: a test run started in the
    # background (nohup, `cmd &`) ignores SIGINT, and Python then never raises KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, "-m", "curvature", "report", "--problem", f"{PROBLEMS}:build_slow",
                             "--quick", "--no-progress", "--out", str(out)], env=command_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120  # sections are written to a staging folder beside --out as they finish
    while not list(tmp_path.glob(".rep.partial-*/summary.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and str(out) in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False and "summary" in summary["sections"]
    assert validate(summary, SUMMARY_SCHEMA) == []
    assert (out / "report.html").is_file()


def test_console_script_entry_point_resolves(capsys):
    import configparser
    import importlib

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    scripts = {name.strip(): value.strip() for name, value in (line.split("=", 1) for line in lines)}
    target = scripts["curvature"]
    assert target == "curvature.app.cli:main"
    module, func = target.split(":")
    with pytest.raises(SystemExit) as info:
        getattr(importlib.import_module(module), func)(["--version"])
    assert info.value.code == 0 and curvature.__version__ in capsys.readouterr().out
