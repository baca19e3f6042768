"""One real ``curvature report --quick`` run on the built-in problem, shared by the app tests."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def command_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_command(*args: str, cwd: Path | str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m curvature ARGS`` in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "curvature", *args], cwd=cwd, env=command_env(),
                          capture_output=True, text=True, timeout=timeout)


@dataclass
class QuickRun:
    out: Path
    proc: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def quick_report(tmp_path_factory) -> QuickRun:
    """``curvature report --quick --json`` on the built-in digits CNN (needs scikit-learn)."""
    pytest.importorskip("sklearn", reason="the built-in digits problem needs scikit-learn (the [app] extra)")
    out = tmp_path_factory.mktemp("quick") / "report"
    proc = run_command("report", "--quick", "--json", "--no-progress", "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return QuickRun(out, proc)
