"""Smoke test of examples/distributed_spectrum.py as one rank (torchrun with 2 ranks is in the docs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_example_runs_and_writes_the_figure(tmp_path):
    out = tmp_path / "spectrum.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "distributed_spectrum.py"), "--quick", "--check",
                           "--out", str(out)], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 rank(s), 1400 samples" in proc.stdout
    assert out.stat().st_size > 10_000
    diff = float(proc.stdout.split("top eigenvalues ")[-1].split()[0])
    assert diff < 1e-5  # float32 model: one rank through the wrapper equals the plain operator
