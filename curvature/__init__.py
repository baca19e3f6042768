"""curvature: matrix-free second-order curvature of PyTorch models (the operator core).

Every operator is a square matrix that is only applied: ``op @ v`` for ``(d,)`` vectors and
``op @ V`` for ``(d, k)`` blocks (one autodiff pass per batch serves all ``k`` columns). Guides:
``docs/operators.md``, ``docs/concepts/curvature-matrices.md``.

Curvature operators of (model, loss, data)
==========================================
- :class:`Hessian`, :class:`GGN`, :class:`Fisher`, :class:`EmpiricalFisher` -- the curvature of
  the loss over all samples (batches weighted by the loss's own normalizer)
- :class:`ModelOperator` -- their common base (parameters, loss, data, graph cache)
- :class:`TokenCrossEntropyLoss` -- the causal-LM loss (shifted, ``-100`` padding)
- :mod:`curvature.backends`, :class:`NoDoubleBackwardError` -- how a block of products is
  computed (``loop``, ``vmap``, ``forward_over_reverse``, ``finite_difference``, ``auto``)

The operator contract
=====================
- :class:`LinearOperator`, :class:`DenseOperator`, :func:`as_operator` -- anything with
  ``shape``, ``dtype``, ``device`` and ``@`` (tensors, NumPy arrays, SciPy operators)
- :class:`Block`, :func:`make_blocks`, :func:`group_blocks_by_module` -- named parameter blocks
  of the flat vector

Inverses
========
- :func:`inverse`, :class:`CGInverse`, :class:`MINRESInverse`, :class:`CGInfo`,
  :class:`SolveProgress`, :class:`NegativeCurvatureError` -- damped inverses ``(A + λI)⁻¹``
- :class:`MFACInverse`, :class:`SlidingMFACInverse`, :func:`collect_gradients` -- M-FAC inverses
  of the empirical Fisher of ``m`` gradients

Data, parameters and model outputs (the shared plumbing)
========================================================
- :class:`BatchSource`, :class:`Batch`, :func:`batch_weight`, :class:`EmptyDataError` -- the one
  batch source and weighting
- :func:`call_model`, :func:`select_output`, :func:`map_tensors` -- calling a model on tensor,
  tuple or dict inputs; picking the loss's input from its output; walking nested batches
- :func:`select_parameters`, :func:`match_names` -- parameters by name, glob pattern, tensor or
  predicate
- :func:`working_dtype`, :func:`in_working_precision` -- precision of iterative methods on
  half-precision operators
- :data:`BASIS_BUDGET` -- the memory a kept basis of parameter-sized vectors may take by default
  (Lanczos, sketches); raise it on a machine with more memory

Several processes
=================
- :class:`DataParallelOperator`, :func:`unwrap_data_parallel`, :func:`assert_same_across_ranks`,
  :class:`DistributedCurvatureError` -- data-parallel products over ``torch.distributed``
  (FSDP: :mod:`curvature.fsdp`)

Also public: :mod:`curvature.checks` (argument checks), :mod:`curvature.probes` (randomness),
:mod:`curvature.losses`, :mod:`curvature.optim` (optimizers), :mod:`curvature.app` (the command).

Examples:
    >>> import torch
    >>> from torch import nn
    >>> from curvature import Hessian
    >>> model = nn.Linear(3, 2)
    >>> data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    >>> H = Hessian(model, nn.CrossEntropyLoss(), data)
    >>> H.shape, (H @ torch.ones(8)).shape
    ((8, 8), torch.Size([8]))
"""

from . import backends
from ._memory import BASIS_BUDGET
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
    "Hessian",
    "GGN",
    "Fisher",
    "EmpiricalFisher",
    "ModelOperator",
    "TokenCrossEntropyLoss",
    "backends",
    "NoDoubleBackwardError",
    "LinearOperator",
    "DenseOperator",
    "as_operator",
    "Block",
    "make_blocks",
    "group_blocks_by_module",
    "inverse",
    "CGInverse",
    "MINRESInverse",
    "CGInfo",
    "SolveProgress",
    "NegativeCurvatureError",
    "MFACInverse",
    "SlidingMFACInverse",
    "collect_gradients",
    "BatchSource",
    "Batch",
    "batch_weight",
    "EmptyDataError",
    "call_model",
    "select_output",
    "map_tensors",
    "select_parameters",
    "match_names",
    "working_dtype",
    "in_working_precision",
    "BASIS_BUDGET",
    "DataParallelOperator",
    "unwrap_data_parallel",
    "assert_same_across_ranks",
    "DistributedCurvatureError",
]
__version__ = "0.2.0"
