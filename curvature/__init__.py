"""curvature: matrix-free second-order curvature operators for PyTorch models.

Operators (``Hessian``, ``GGN``, ``Fisher``, ``EmpiricalFisher``) act on flat parameter-space
vectors ``(d,)`` or blocks ``(d, k)`` with ``@``; see :class:`LinearOperator`.
"""

from . import backends
from .blocks import Block, group_blocks_by_module, make_blocks
from .data import Batch, BatchSource, EmptyDataError, batch_weight, call_model, map_tensors
from .distributed import (
    DataParallelOperator,
    DistributedCurvatureError,
    assert_same_across_ranks,
    unwrap_data_parallel,
)
from .empirical_fisher import EmpiricalFisher
from .finite_difference import NoDoubleBackwardError
from .fisher import Fisher
from .ggn import GGN
from .hessian import Hessian
from .inverse import CGInfo, CGInverse, MINRESInverse, NegativeCurvatureError, SolveProgress, inverse
from .linear_operator import DenseOperator, LinearOperator, as_operator
from .losses import TokenCrossEntropyLoss
from .mfac import MFACInverse, collect_gradients
from .model_operator import ModelOperator
from .outputs import select_output
from .params import match_names, select_parameters
from .precision import in_working_precision, working_dtype
from .sliding_mfac import SlidingMFACInverse

__all__ = [
    "DataParallelOperator",
    "DistributedCurvatureError",
    "assert_same_across_ranks",
    "unwrap_data_parallel",
    "Block",
    "Batch",
    "BatchSource",
    "batch_weight",
    "EmptyDataError",
    "call_model",
    "map_tensors",
    "select_output",
    "ModelOperator",
    "group_blocks_by_module",
    "make_blocks",
    "match_names",
    "select_parameters",
    "CGInfo",
    "CGInverse",
    "MINRESInverse",
    "NegativeCurvatureError",
    "SolveProgress",
    "NoDoubleBackwardError",
    "backends",
    "MFACInverse",
    "SlidingMFACInverse",
    "collect_gradients",
    "inverse",
    "DenseOperator",
    "EmpiricalFisher",
    "Fisher",
    "GGN",
    "Hessian",
    "LinearOperator",
    "as_operator",
    "in_working_precision",
    "working_dtype",
    "TokenCrossEntropyLoss",
]
__version__ = "0.2.0"
