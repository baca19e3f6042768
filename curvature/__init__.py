"""curvature: matrix-free second-order curvature operators for PyTorch models."""

from .blocks import Block
from .linear_operator import DenseOperator, LinearOperator, as_operator

__all__ = ["Block", "DenseOperator", "LinearOperator", "as_operator"]
__version__ = "0.1.0"
