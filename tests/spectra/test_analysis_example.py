"""Smoke test of examples/spectral_analyses.py with a tiny configuration."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "spectral_analyses.py"


def test_example_runs_and_writes_its_figures(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("spectral_analyses_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main([
        "--out-dir", str(tmp_path), "--steps", "30", "--drift-steps", "30",
        "--batch-sizes", "32", "64", "128", "--num-batches", "2", "--train-steps", "3", "--multiples", "1",
    ])
    for name in ("outliers.png", "decomposition.png", "batch_scaling.png", "training.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "k̂ = 9 (C = 10, matches C-1)" in out
    assert "negatives carried by R" in out
