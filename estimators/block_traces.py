"""Traces of all diagonal blocks (per parameter or per module) from one shared set of products."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from curvature import Block, as_operator, group_blocks_by_module
from curvature.checks import check_rtol
from curvature.probes import make_generator

from ._products import ProductRunner, SampleStream, column_dots, itemsize, mean_and_stderr, run_blocks
from ._validation import check_distribution, check_num_matvecs, check_probe_batch_size
from .probes import default_probe_batch_size
from .results import BlockTraceEstimates, TraceEstimate

__all__ = ["block_traces"]


def block_traces(
    op: Any,
    *,
    num_matvecs: int,
    group_by_module: bool = False,
    blocks: Sequence[Block] | None = None,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    probe_batch_size: int | None = None,
    rtol: float | None = None,
    progress: bool = False,
) -> BlockTraceEstimates:
    """Hutchinson estimates of the trace of every diagonal block ``A_bb``, all from the same probes.

    Each probe ``v`` gives one sample ``v_bᵀ(Av)_b`` for every block ``b`` at once, so the whole
    report costs ``num_matvecs`` products, the same as one :func:`trace` (each entry's
    ``num_matvecs`` is that shared cost, not a per-block one).  With the same generator state and
    ``probe_batch_size``, the block samples add up to :func:`trace`'s Hutchinson samples.

    Args:
        op: a square operator (see :func:`estimators.trace`); its ``blocks`` (one per parameter for
            curvature operators; a single ``"all"`` block for a plain matrix) define the blocks.
        num_matvecs: number of probes (with ``rtol=``, the maximum).
        group_by_module: merge the blocks of one module (``fc.weight`` + ``fc.bias`` -> ``"fc"``),
            as in HAWQ-style per-layer sensitivities.
        blocks: use these :class:`curvature.Block` slices instead of ``op.blocks``.
        distribution, generator, probe_batch_size, progress: as in :func:`estimators.trace`.
        rtol: stop once the standard error of the sum over all blocks is below ``rtol`` times its
            absolute value (per-block errors are reported but not targeted).

    Returns:
        A :class:`BlockTraceEstimates`: ``{name: TraceEstimate}`` in block order (module names
        with ``group_by_module=True``), with ``.total``, the trace of all the blocks together from
        the same probes.

    Examples:
        >>> from curvature import make_blocks
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
        >>> bl = make_blocks(["fc.weight", "fc.bias"], [(2,), (1,)])
        >>> res = block_traces(A, num_matvecs=4, blocks=bl, generator=torch.Generator().manual_seed(0))
        >>> {name: est.value for name, est in res.items()}
        {'fc.weight': 3.0, 'fc.bias': 3.0}
        >>> res.total.value
        6.0
    """
    A = as_operator(op)
    num_matvecs = check_num_matvecs(num_matvecs, method="hutchinson")
    distribution = check_distribution(distribution)
    batch = check_probe_batch_size(probe_batch_size)
    rtol = check_rtol(rtol)
    d = A.shape[0]
    chosen = _check_blocks(A.blocks if blocks is None else blocks, d)
    if group_by_module:
        groups = {name: tuple(members) for name, members in group_blocks_by_module(chosen).items()}
    else:
        groups = {}
        for b in chosen:
            if b.name in groups:
                raise ValueError(f"blocks: duplicate block name {b.name!r}")
            groups[b.name] = (b,)
    gen = make_generator(generator, A.device)
    batch = batch or default_probe_batch_size(d, num_matvecs, itemsize=itemsize(A.dtype), rtol=rtol is not None)

    streams = {name: SampleStream() for name in groups}
    total = SampleStream()
    with ProductRunner(A, total=num_matvecs, progress=progress, desc="block traces") as run:

        def step(size: int) -> None:
            V = run.probes(size, distribution, gen)
            AV = run(V)
            block_sum = None
            for name, members in groups.items():
                x = column_dots(V[members[0].slice], AV[members[0].slice])
                for b in members[1:]:
                    x += column_dots(V[b.slice], AV[b.slice])
                streams[name].add(x)
                block_sum = x.clone() if block_sum is None else block_sum + x
            total.add(block_sum)

        met = run_blocks(num_matvecs, batch, step, rtol=rtol, status=total.status, what="block traces")
        used = run.num_matvecs

    def estimate(stream: SampleStream) -> TraceEstimate:
        value, stderr = mean_and_stderr(stream.samples)
        return TraceEstimate(value, stderr, used, "hutchinson", distribution, met, stream.samples)

    return BlockTraceEstimates({name: estimate(s) for name, s in streams.items()}, total=estimate(total))


def _check_blocks(blocks: Any, dim: int) -> tuple[Block, ...]:
    try:
        blocks = tuple(blocks)
    except TypeError:
        raise TypeError(f"blocks must be a sequence of curvature.Block, got {type(blocks).__name__}") from None
    if not blocks:
        raise ValueError("blocks must not be empty")
    for b in blocks:
        if not isinstance(b, Block):
            raise TypeError(f"blocks must contain curvature.Block objects, got {type(b).__name__}")
        s = b.slice
        if s.step not in (None, 1) or s.start is None or s.stop is None or not 0 <= s.start <= s.stop <= dim:
            raise ValueError(f"blocks: block {b.name!r} has slice {s}, outside the operator's range [0, {dim})")
    return blocks
