"""curvature.app: the application layer (the ``curvature`` command, the report, built-in problems).

A consumer of the whole toolkit: it imports ``curvature``, ``estimators``, ``spectra`` (and
``quant``) with ordinary imports. ``curvature/__init__`` never imports it.
"""

from .cli import load_target, main
from .report import CurvatureReport, curvature_report

__all__ = ["CurvatureReport", "curvature_report", "load_target", "main"]
