"""Deprecated: the command moved to :mod:`curvature.app.cli` (console script ``curvature``)."""

import warnings

from curvature.app.cli import load_target, main

warnings.warn("curvature.cli is deprecated; use curvature.app.cli", DeprecationWarning, stacklevel=2)

__all__ = ["load_target", "main"]
