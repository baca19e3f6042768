"""The ``curvature report`` command and the report it writes."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from curvature import Hessian  # noqa: E402
from curvature.app.cli import load_target, main  # noqa: E402
from curvature.app.report import curvature_report  # noqa: E402


def build_tiny():
    """A report target: small enough for exact checks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    return model, nn.CrossEntropyLoss(), list(zip(x.chunk(3), y.chunk(3)))


def test_report_numbers_against_exact():
    model, loss_fn, data = build_tiny()
    report = curvature_report(
        model, loss_fn, data, num_matvecs=400, top_k=3, slq_probes=3, slq_steps=20,
        generator=torch.Generator().manual_seed(0),
    )
    H = Hessian(model, loss_fn, data).to_dense()
    evals = torch.linalg.eigvalsh(H)
    assert torch.allclose(report.top_eigenpairs.eigenvalues, evals.flip(0)[:3], rtol=1e-8)
    assert abs(report.bottom_eigenvalue.eigenvalues[0].item() - evals[0].item()) < 1e-8
    exact = torch.trace(H).item()
    assert abs(report.hessian_trace.value - exact) < 4 * report.hessian_trace.stderr
    assert sum(e.value for e in report.layer_traces.values()) == pytest.approx(report.hessian_trace.value)
    assert report.layer_sizes == {"0": 24, "2": 21}
    assert report.summary["num_samples"] == 40 and report.summary["num_batches"] == 3
    assert report.layer_types == {"0": "Linear", "2": "Linear"}


def test_cli_writes_report(tmp_path, capsys):
    out = tmp_path / "rep"
    code = main([
        "report", "--model", f"{__file__}:build_tiny", "--out", str(out), "--probes", "20", "--top-k", "2",
        "--slq-probes", "2", "--slq-steps", "10", "--no-progress",
    ])
    assert code == 0
    data = json.loads((out / "report.json").read_text())
    assert len(data["top_eigenvalues"]) == 2 and all(data["top_eigenvalues_converged"])
    assert set(data["layers"]) == {"0", "2"}
    assert "# Curvature report" in capsys.readouterr().out
    for figure in ("density.png", "layers.png"):
        image = mpimg.imread(out / figure)
        assert image.std() > 0.01  # not blank
    assert (out / "density.npz").exists() and (out / "report.md").exists()


def test_load_target_errors(tmp_path):
    with pytest.raises((ValueError, ImportError), match="module:function"):
        load_target("nocolon")
    with pytest.raises((ValueError, ImportError), match="no such file"):
        load_target("missing.py:f")
    with pytest.raises((ValueError, ImportError), match="no function"):
        load_target("curvature.app.builtin:nope")
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    return (1, 2)\n")
    with pytest.raises((ValueError, ImportError), match=r"\(model, loss_fn, data\)"):
        load_target(f"{bad}:f")
