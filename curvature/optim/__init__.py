"""Optimizers built on the curvature operators (the application layer)."""

from .mfac import MFAC

__all__ = ["MFAC"]
