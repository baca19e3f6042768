"""mypy on a typed use of the public API (tests/typing/public_api.py), as a user's checker sees the
packages through ``py.typed``. The library's own modules are analysed silently: this checks the
public signatures, not every internal line."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("mypy") is None and not (Path(sys.executable).parent / "mypy").exists(),
                    reason="mypy is not installed (pip install -e '.[test]')")
def test_public_api_type_checks(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "--ignore-missing-imports",
         "--cache-dir", str(tmp_path / "cache"), "tests/typing/public_api.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_packages_ship_py_typed():
    for package in ("curvature", "estimators", "spectra", "quant"):
        assert (ROOT / package / "py.typed").is_file()
