"""Smoke test of examples/optimizers_digits.py: --help and a short run that writes its figure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "optimizers_digits.py"


def test_help_and_short_run(tmp_path):
    help_text = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True)
    assert "--steps" in help_text.stdout
    out = tmp_path / "fig.png"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--steps", "12", "--every", "6", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("SGD", "AdamW", "Sophia-H", "Sophia-G", "AdaHessian", "Regularized Newton"):
        assert name in proc.stdout
