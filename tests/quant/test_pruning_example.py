"""Smoke test of examples/pruning_digits.py with tiny settings."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pruning_digits.py"


def test_example_runs_and_writes_its_outputs(tmp_path):
    spec = importlib.util.spec_from_file_location("pruning_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary = module.main(["--out", str(tmp_path), "--seeds", "1", "--quick", "--sparsities", "0.5",
                           "--finetune-steps", "2", "--num-gradients", "8", "--recomputations", "1", "--probes", "2"])
    assert (tmp_path / "pruning_digits.png").stat().st_size > 0
    saved = json.loads((tmp_path / "pruning_digits.json").read_text())
    assert set(saved["table"]) == {"mfac@0.5", "magnitude@0.5", "mfac@2:4", "magnitude@2:4"}
    assert 0 <= summary["joint"]["joint_accuracy"][0] <= 1
