"""Smoke test of examples/hawq_bit_plan.py with a tiny configuration."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hawq_bit_plan.py"


def test_example_runs_and_writes_its_outputs(tmp_path):
    spec = importlib.util.spec_from_file_location("hawq_bit_plan", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", str(tmp_path), "--epochs", "3", "--probes", "8", "--random-plans", "12"])
    for name in ("sensitivity.png", "pareto.png", "rank_correlation.png", "bit_plan.json", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["rank_correlation"]) == {"bits_3_4_6_8", "bits_2_4_8"}
    from quant import BitPlan

    assert BitPlan.from_json(tmp_path / "bit_plan.json").size_bytes <= summary["comparisons"]["uniform4_size"][
        "budget_bytes"]
