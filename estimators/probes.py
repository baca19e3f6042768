"""Probe blocks for the estimators: the default block size.  Probes themselves come from the
toolkit's one probe source, :mod:`curvature.probes` (re-exported here as ``draw_probes``)."""

from __future__ import annotations

from curvature.probes import DISTRIBUTIONS, draw_probes, make_generator

__all__ = ["DISTRIBUTIONS", "default_probe_batch_size", "draw_probes", "make_generator"]

#: Most probe columns per product without ``probe_batch_size``.  Wider blocks measured faster
#: (100 Hessian probes on the 407k-parameter bench MLP: one block of 100 took 0.6-0.9x the time of
#: blocks of 32, two of 50 in between), but a vmapped operator holds per-column activations for
#: the whole block unless it chunks (``Hessian(probe_batch_size=)``), so the default stays bounded.
DEFAULT_MAX_PROBE_BATCH = 64

#: Also cap one ``(d, k)`` probe block in the operator's dtype at this many bytes.
DEFAULT_BLOCK_BYTES = 2**30

#: Block size with ``rtol=``: the stopping rule is checked after each block.
DEFAULT_RTOL_PROBE_BATCH = 32


def default_probe_batch_size(dim: int, num: int, *, itemsize: int = 4, rtol: bool = False) -> int:
    """Columns per product when the caller gives none.

    ``min(num, 64)`` (32 with ``rtol=``), lowered so a ``(dim, k)`` block of ``itemsize``-byte
    entries stays within 1 GiB; at least 1.  Callers split the probes into equal blocks of at most
    this size (100 probes -> 2 x 50).

    Examples:
        >>> default_probe_batch_size(1000, 100), default_probe_batch_size(10**9, 100)
        (64, 1)
        >>> default_probe_batch_size(1000, 100, rtol=True)
        32
    """
    cap = max(1, min(DEFAULT_MAX_PROBE_BATCH, DEFAULT_BLOCK_BYTES // (itemsize * max(dim, 1))))
    if rtol:
        cap = min(cap, DEFAULT_RTOL_PROBE_BATCH)
    return max(1, min(num, cap))
