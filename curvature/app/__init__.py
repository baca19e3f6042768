"""curvature.app: the application layer — the ``curvature`` command, the report and built-in problems.

A consumer of the whole toolkit: it imports ``curvature``, ``estimators``, ``spectra`` and
``quant`` with ordinary imports; ``curvature/__init__`` never imports it. Guide: ``docs/command.md``.

Problems
========
- :class:`Problem`, :func:`problem_from`, :func:`check_problem`, :class:`ProblemError` -- what
  the command analyses (a model, a loss, data)
- :func:`load_problem` -- a ``--problem`` spec: ``MODULE:FUNCTION``, ``FILE.py:FUNCTION`` or a
  built-in (``digits``, ``synthetic``, ``charlm``)

Reports
=======
- :func:`curvature_report`, :func:`compute_sections`, :class:`CurvatureReport`,
  :class:`ReportSettings` -- the report, section by section
- :func:`write_report`, :class:`StagedOutput`, :func:`summary_dict`, :class:`Provenance` --
  the output folder (staged, then moved into place) and what each artefact records
- :data:`SUMMARY_SCHEMA`, :func:`validate` -- the schema of ``summary.json``

The command
===========
- :func:`main` -- ``curvature`` / ``python -m curvature``

Examples:
    >>> import torch
    >>> from torch import nn
    >>> from curvature.app import Problem, ReportSettings, curvature_report
    >>> g = torch.Generator().manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    >>> data = (torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
    >>> problem = Problem(model, nn.CrossEntropyLoss(), data, name="tiny MLP")
    >>> report = curvature_report(problem, settings=ReportSettings.quick(sections=("summary", "eigenvalues")),
    ...                           generator=g)
    >>> report.summary.num_params, report.eigenvalues.top.k
    (67, 3)
"""

from .cli import main
from .loader import load_problem
from .output import StagedOutput, summary_dict, write_report
from .problem import Problem, ProblemError, check_problem, problem_from
from .provenance import Provenance
from .report import CurvatureReport, ReportSettings, compute_sections, curvature_report
from .schema import SUMMARY_SCHEMA, validate

__all__ = [
    "CurvatureReport",
    "Problem",
    "ProblemError",
    "Provenance",
    "ReportSettings",
    "SUMMARY_SCHEMA",
    "StagedOutput",
    "check_problem",
    "compute_sections",
    "curvature_report",
    "load_problem",
    "main",
    "problem_from",
    "summary_dict",
    "validate",
    "write_report",
]
