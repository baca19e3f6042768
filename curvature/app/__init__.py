"""curvature.app: the application layer — the ``curvature`` command, the report and built-in problems.

A consumer of the whole toolkit: it imports ``curvature``, ``estimators``, ``spectra`` and
``quant`` with ordinary imports; ``curvature/__init__`` never imports it.

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
