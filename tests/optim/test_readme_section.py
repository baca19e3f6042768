"""The README's "Second-order optimizers" snippet runs verbatim and every optimizer lowers the loss."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_optimizer_snippet_runs(capsys):
    text = README.read_text()
    start = text.index("## Second-order optimizers (`curvature.optim`)")
    end = text.find("\n## ", start + 10)
    (code,) = re.findall(r"```python\n(.*?)```", text[start:end], re.S)
    exec(compile(code, "README optim", "exec"), {})  # noqa: S102 - the README's own code
    losses = [float(v) for v in capsys.readouterr().out.split()]
    assert len(losses) == 4 and losses[-1] < losses[0] < 1.2
