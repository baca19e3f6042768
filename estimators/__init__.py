"""estimators: stochastic trace, diagonal, per-block trace and norm estimates of any square operator.

Everything here needs only ``op.shape`` and ``op @ V`` (curvature operators, dense tensors, SciPy
operators), applies probes in ``(d, k)`` blocks, takes randomness only from ``generator=``, and
returns frozen dataclasses with the estimate, its standard error and its cost in matvecs.
Guide: ``docs/concepts/trace-estimation.md``.

Estimators
==========
- :func:`trace` -- Hutchinson, Hutch++, XTrace or ``"auto"``; :data:`TRACE_METHODS`
- :func:`diagonal` -- Hutchinson-type, XDiag or exact; :data:`DIAGONAL_METHODS`
- :func:`block_traces` -- the trace of every parameter block from one set of probes
- :func:`frobenius_norm` -- ``‖A‖_F`` from products

Results
=======
- :class:`Estimate` -- value, standard error, cost, ``confidence_interval()``
- :class:`TraceEstimate`, :class:`DiagonalEstimate`, :class:`FrobeniusNormEstimate`,
  :class:`BlockTraceEstimates`

Probes
======
- :func:`draw_probes` -- Rademacher, normal or sphere probes from an explicit generator

Examples:
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
    "TRACE_METHODS",
    "diagonal",
    "DIAGONAL_METHODS",
    "block_traces",
    "frobenius_norm",
    "Estimate",
    "TraceEstimate",
    "DiagonalEstimate",
    "FrobeniusNormEstimate",
    "BlockTraceEstimates",
    "draw_probes",
]
