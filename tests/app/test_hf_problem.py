"""``curvature report`` on a Hugging Face causal LM problem (dict inputs, padded labels, ``.logits``)."""

from __future__ import annotations

import json

import pytest

from curvature.app import SUMMARY_SCHEMA, validate
from curvature.app.cli import main

from .cli_problems import import_transformers
from .conftest import ROOT

PROBLEMS = ROOT / "tests" / "app" / "cli_problems.py"


def test_report_on_a_tiny_gpt2(tmp_path, capsys):
    try:
        import_transformers()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"needs the optional 'hf' extra (pip install .[hf]): {exc}")
    code = main(["report", "--problem", f"{PROBLEMS}:tiny_gpt2", "--quick", "--json", "--no-progress",
                 "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert validate(summary, SUMMARY_SCHEMA) == [] and summary["complete"]
    assert {"summary", "traces", "eigenvalues", "spectrum", "analyses"} <= set(summary["sections"])
    assert summary["problem"]["ggn_unavailable"] is None and summary["traces"]["ggn"]["value"] > 0
    layers = {layer["name"]: layer["type"] for layer in summary["traces"]["layers"]}
    assert layers["transformer.h.0.attn.c_attn"] == "Conv1D" and layers["transformer.wte"] == "Embedding"
    # a section the model cannot support is named with its reason instead of failing the report
    assert set(summary["skipped"]) <= {"quantization"}
    assert (summary["quantization"] is None) == ("quantization" in summary["skipped"])


def test_quantize_says_when_the_plan_cannot_run(tmp_path, capsys):
    try:
        import_transformers()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"needs the optional 'hf' extra (pip install .[hf]): {exc}")
    code = main(["quantize", "--problem", f"{PROBLEMS}:tiny_gpt2", "--quick", "--no-progress", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    if code == 0:  # quant learnt tied weights: then the plan is written
        assert (tmp_path / "bitplan.json").is_file()
    else:
        assert code == 13 and err[-1].startswith("curvature quantize: error: the quantization cannot run")
        assert json.loads((tmp_path / "summary.json").read_text())["skipped"]["quantization"]
