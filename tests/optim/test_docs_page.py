"""The optimizers page's all-four snippet (docs/optimizers.md) runs verbatim and every optimizer lowers the loss."""

from __future__ import annotations

import re
from pathlib import Path

PAGE = Path(__file__).resolve().parents[2] / "docs" / "optimizers.md"


def test_optimizer_page_snippet_runs(capsys):
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S) if "def train(" in b]
    exec(compile(code, "docs/optimizers.md", "exec"), {})  # noqa: S102 - the docs' own code
    losses = [float(v) for v in capsys.readouterr().out.split()]
    assert len(losses) == 4 and losses[-1] < losses[0] < 1.2
