"""estimators: stochastic trace, diagonal, per-block trace and norm estimates of any square operator.

Everything here needs only ``op.shape`` and ``op @ V`` (curvature operators, dense tensors, SciPy
operators), applies probes in ``(d, k)`` blocks, takes randomness only from ``generator=``, and
returns frozen dataclasses with the estimate, its standard error and its cost in matvecs.

Example:
    >>> import torch, estimators
    >>> A = torch.diag(torch.arange(1.0, 5.0))
    >>> estimators.trace(A, num_matvecs=4, generator=torch.Generator().manual_seed(0)).value
    10.0
"""

from .block_traces import block_traces
from .diagonal import DIAGONAL_METHODS, diagonal
from .norms import frobenius_norm
from .probes import draw_probes
from .results import BlockTraceEstimates, DiagonalEstimate, Estimate, FrobeniusNormEstimate, TraceEstimate
from .trace import TRACE_METHODS, trace

__all__ = [
    "trace",
    "block_traces",
    "diagonal",
    "frobenius_norm",
    "draw_probes",
    "Estimate",
    "TraceEstimate",
    "BlockTraceEstimates",
    "DiagonalEstimate",
    "FrobeniusNormEstimate",
    "TRACE_METHODS",
    "DIAGONAL_METHODS",
]
