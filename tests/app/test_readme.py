"""The README's quick start and command sections run verbatim (their Python blocks, in order)."""

from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")

from .conftest import ROOT  # noqa: E402

SECTIONS = ("## Quick start", "## The `curvature` command")


def _blocks(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index(section)
    end = text.find("\n## ", start + len(section))
    return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], re.S)


def test_readme_snippets_run_verbatim(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for section in SECTIONS:
        blocks = _blocks(section)
        assert blocks, f"no Python block under {section!r}"
        namespace: dict = {}
        for code in blocks:
            exec(compile(code, f"README {section}", "exec"), namespace)  # noqa: S102 - the README's own code
    assert (tmp_path / "density.png").is_file() and (tmp_path / "report.html").is_file()
    assert "tensor(" in capsys.readouterr().out
