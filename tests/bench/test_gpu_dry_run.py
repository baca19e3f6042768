"""The GPU benchmark's CPU dry run (``python -m bench.gpu --tiny``): every section runs and reports,
so the script is ready the day an accelerator is lent."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_benchmark_dry_run_writes_every_section(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--tiny", "--device", "cpu", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    from bench.gpu import SECTIONS

    assert set(results["sections"]) == set(SECTIONS)
    for name, section in results["sections"].items():
        assert "error" not in section, (name, section.get("error"))
        assert section["rows"], name
    table = (tmp_path / "results.md").read_text()
    assert all(f"## {name}" in table for name in SECTIONS)
    assert results["environment"]["torch"]
