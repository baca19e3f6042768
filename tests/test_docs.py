"""The documentation: the site builds strictly, and every Python block of the README and the docs
runs as written (the blocks of one page in order, in one namespace, in a fresh folder).

A block may be preceded by a directive in an HTML comment:
``<!-- docs-test: skip (reason) -->`` (it needs something CI lacks, e.g. ``torchrun``) or
``<!-- docs-test: file NAME -->`` (the block is written to ``NAME`` for the next blocks to import).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").rglob("*.md") if "api" not in p.parts)
BLOCK = re.compile(r"(?:<!-- docs-test: (?P<directive>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def blocks(page: Path) -> list[tuple[str, str]]:
    return [(m.group("directive") or "", m.group("code")) for m in BLOCK.finditer(page.read_text())]


def test_every_page_is_checked():
    assert len(PAGES) > 10 and all(p.is_file() for p in PAGES)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run_as_written(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict = {"__name__": "__docs__"}
    for i, (directive, code) in enumerate(blocks(page)):
        if directive.startswith("skip"):
            continue
        if directive.startswith("file "):
            (tmp_path / directive.split(None, 1)[1].strip()).write_text(code)
            continue
        exec(compile(code, f"{page.name} block {i + 1}", "exec"), namespace)  # noqa: S102 - the docs' own code
    plt.close("all")


@pytest.mark.skipif(shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists(),
                    reason="mkdocs is not installed (pip install -e '.[test]')")
def test_site_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").is_file()
