"""Where a report's numbers came from: the command line, seed, budgets, versions, device and date.

Every artefact the command writes (``summary.json``, ``report.md``/``report.html``,
``bitplan.json``) carries the same :class:`Provenance`. It holds everything that varies between
two runs of one command with one seed (the date, the timings), so the rest of ``summary.json`` is
byte-identical between such runs and can be compared directly.
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import curvature

__all__ = ["DETERMINISTIC_PRODUCTS", "Provenance"]

#: How the report makes its products reproducible (the operators' public options it passes).
DETERMINISTIC_PRODUCTS = ("Hessian(deterministic=True): double backward, no timing-based strategy choice; "
                          "GGN and the output-space operators deterministic=True (backend 'loop')")


@dataclass(frozen=True)
class Provenance:
    """The circumstances of one report.

    Attributes:
        command_line: the command as typed (``None`` for library use).
        problem: the ``--problem`` spec (or the problem's name in library use).
        seed: the seed of every probe and start vector (``None``: OS-seeded, not reproducible).
        quick: whether the quick budgets were used (same problem and model, fewer products).
        settings: every budget of :class:`~curvature.app.report.ReportSettings`.
        versions: ``curvature``, ``torch``, ``numpy`` and ``python`` versions, and the platform.
        device: where the products ran.
        date: UTC time the run started (ISO 8601).
        deterministic: how the products were made reproducible.
        timings_s: seconds per section (filled in by the report).

    Examples:
        >>> p = Provenance.create(problem="tiny", seed=3, quick=True, settings={"top_k": 3}, device="cpu")
        >>> p.to_dict()["seed"], p.to_dict()["versions"]["curvature"] == curvature.__version__
        (3, True)
    """

    command_line: str | None
    problem: str
    seed: int | None
    quick: bool
    settings: dict[str, Any]
    versions: dict[str, str]
    device: str
    date: str
    deterministic: str = DETERMINISTIC_PRODUCTS
    timings_s: dict[str, float] = field(default_factory=dict)

    @classmethod
    def create(cls, *, problem: str, seed: int | None, quick: bool, settings: dict[str, Any], device: str,
               command_line: str | None = None) -> Provenance:
        """A record of this run, dated now, with the installed versions."""
        versions = {"curvature": curvature.__version__, "torch": torch.__version__, "numpy": np.__version__,
                    "python": platform.python_version(), "platform": platform.platform()}
        date = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
        return cls(command_line, problem, seed, quick, dict(settings), versions, device, date)

    def with_timings(self, timings: dict[str, float]) -> Provenance:
        """A copy with the sections' timings."""
        return dataclasses.replace(self, timings_s={k: round(float(v), 3) for k, v in timings.items()})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (tuples as lists)."""
        out = dataclasses.asdict(self)
        out["settings"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.settings.items()}
        return out

    def rows(self) -> list[tuple[str, str]]:
        """``(what, value)`` rows for the Markdown and HTML reports."""
        budgets = ", ".join(f"{k}={v}" for k, v in self.settings.items() if k != "sections")
        return [
            ("command", self.command_line or "(library call)"),
            ("problem", self.problem),
            ("seed", "none (OS-seeded; not reproducible)" if self.seed is None else str(self.seed)),
            ("quick budgets", "yes (same problem and model, fewer products)" if self.quick else "no"),
            ("budgets", budgets),
            ("versions", ", ".join(f"{k} {v}" for k, v in self.versions.items())),
            ("device", self.device),
            ("date (UTC)", self.date),
            ("reproducibility", self.deterministic),
        ]


def command_line(argv: list[str] | None) -> str:
    """The command as a user would retype it."""
    import shlex

    args = sys.argv[1:] if argv is None else list(argv)
    return "curvature " + " ".join(shlex.quote(a) for a in args)
