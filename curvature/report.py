"""Deprecated: the report moved to :mod:`curvature.app` (``from curvature.app import curvature_report``)."""

import warnings

from curvature.app.report import CurvatureReport, curvature_report

warnings.warn(
    "curvature.report is deprecated; use curvature.app.curvature_report", DeprecationWarning, stacklevel=2
)

__all__ = ["CurvatureReport", "curvature_report"]
