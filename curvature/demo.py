"""Deprecated: the built-in problems moved to :mod:`curvature.app.builtin`."""

import warnings

from curvature.app.builtin import make_cnn, make_dataset, trained_cnn

warnings.warn("curvature.demo is deprecated; use curvature.app.builtin", DeprecationWarning, stacklevel=2)

__all__ = ["make_cnn", "make_dataset", "trained_cnn"]
