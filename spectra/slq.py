"""Stochastic Lanczos quadrature: a spectral density from a few Lanczos runs, with checkpoints."""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

import torch
from torch import Tensor

from ._utils import as_square_operator, check_generator, check_positive_int, draw_seed
from .density import SpectralDensity
from .lanczos import lanczos

__all__ = ["slq"]

logger = logging.getLogger(__name__)

#: Memory the lockstep basis of one probe block may take by default (bytes).
BASIS_BUDGET = 1 << 30
#: Largest default probe block.
MAX_DEFAULT_BLOCK = 16
#: Run settings a checkpoint must share with the run that resumes it.
_IDENTITY = ("dim", "num_steps", "reorthogonalize", "seed", "dtype", "operator")


def _probe_block(
    d: int, first: int, count: int, seed: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Rademacher probes ``first .. first+count-1``; probe ``i`` depends only on ``(seed, i)``.

    Deriving each probe from its own index keeps a run reproducible whatever the block size and
    however often it was interrupted and resumed.
    """
    cols = []
    for i in range(first, first + count):
        g = torch.Generator().manual_seed(seed + i)
        cols.append(torch.randint(0, 2, (d,), generator=g, dtype=torch.int8))
    return torch.stack(cols, dim=1).to(dtype=dtype, device=device) * 2 - 1


def _load_checkpoint(path: str, config: dict, seed_from_user: bool) -> SpectralDensity | None:
    if not os.path.exists(path):
        return None
    try:
        done = SpectralDensity.load(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(
            f"checkpoint {path!r} exists but is not a readable SLQ checkpoint: {exc}"
        ) from exc
    saved = done.metadata
    for key in _IDENTITY:
        if key == "seed" and not seed_from_user:
            continue
        if saved.get(key) != config[key]:
            raise ValueError(
                f"checkpoint {path!r} was made with {key}={saved.get(key)!r}, but this run has "
                f"{key}={config[key]!r}; refusing to resume a different run (delete the file or "
                "pass another checkpoint path)"
            )
    return done


def slq(
    op: Any,
    *,
    num_probes: int = 1,
    num_steps: int = 100,
    generator: torch.Generator | None = None,
    progress: bool = False,
    checkpoint: str | os.PathLike | None = None,
    probe_batch_size: int | None = None,
    reorthogonalize: Literal["full", "none"] = "full",
) -> SpectralDensity:
    """Estimate the eigenvalue density of ``op`` by stochastic Lanczos quadrature.

    Each Rademacher probe ``v`` runs ``num_steps`` Lanczos steps; the Ritz values and squared
    first eigenvector components of the tridiagonal matrix are the nodes and weights of a Gauss
    quadrature for the probe's spectral measure (Ghorbani et al. 2019; Lin, Saad & Yang 2016).
    ``probe_batch_size`` probes run in lockstep (one ``op @ V`` per step for the whole block).

    Cost: ``num_probes · min(num_steps, d)`` products; memory: the lockstep basis,
    ``probe_batch_size · num_steps · d`` numbers in the operator's dtype.

    Checkpoints: with ``checkpoint=path`` the finished probes are written to ``path`` (an
    ``.npz`` readable by :meth:`SpectralDensity.load`) after every block, atomically. A rerun
    with the same path resumes from them and gives the same result as an uninterrupted run. The
    file records ``d``, ``num_steps``, ``reorthogonalize``, dtype, operator type and the seed drawn
    from ``generator``; resuming a run that differs in any of them raises ``ValueError``. With
    ``generator=None`` a resumed run adopts the checkpoint's seed. ``num_probes`` may differ: a
    larger value extends the checkpoint, a smaller one uses its first probes.

    Randomness: one seed is drawn from ``generator`` (or the global RNG, never reseeded) and
    probe ``i`` is derived from ``(seed, i)``, so results do not depend on ``probe_batch_size``.

    Args:
        op: symmetric ``(d, d)`` operator (``curvature.LinearOperator``, tensor, SciPy operator).
        num_probes: number of random start vectors ``n_v``.
        num_steps: Lanczos steps ``m`` per probe (capped at ``d``). A density of kernel width
            ``σ`` over a range ``R`` needs about ``(R/2σ)·√(ln(1/ε)/2)`` steps.
        generator: source of the seed.
        progress: show a tqdm progress bar (Lanczos steps).
        checkpoint: file to save finished probes to and resume from.
        probe_batch_size: probes per lockstep block; default as many as fit 1 GiB of basis, at
            most 16.
        reorthogonalize: ``"full"`` (default) or ``"none"`` (see :func:`spectra.lanczos`).

    Returns:
        A :class:`SpectralDensity`.

    Example:
        >>> A = torch.diag(torch.linspace(-1, 1, 50, dtype=torch.float64))
        >>> dens = slq(A, num_probes=4, num_steps=20, generator=torch.Generator().manual_seed(0))
        >>> dens.nodes.shape, round(dens.trace().value, 6), dens.num_matvecs
        (torch.Size([4, 20]), 0.0, 80)
    """
    A = as_square_operator(op)
    d = A.shape[0]
    num_probes = check_positive_int(num_probes, "num_probes")
    num_steps = check_positive_int(num_steps, "num_steps")
    check_generator(generator)
    if reorthogonalize not in ("full", "none"):
        raise ValueError(f"reorthogonalize must be 'full' or 'none', got {reorthogonalize!r}")
    m = min(num_steps, d)
    itemsize = torch.empty((), dtype=A.dtype).element_size()
    if probe_batch_size is None:
        probe_batch_size = max(
            1, min(num_probes, MAX_DEFAULT_BLOCK, BASIS_BUDGET // (m * d * itemsize))
        )
    else:
        probe_batch_size = check_positive_int(probe_batch_size, "probe_batch_size")

    seed = draw_seed(generator)
    config = {
        "dim": d,
        "num_steps": num_steps,
        "reorthogonalize": reorthogonalize,
        "seed": seed,
        "dtype": str(A.dtype),
        "operator": type(A).__name__,
    }
    parts: list[SpectralDensity] = []
    path = os.fspath(checkpoint) if checkpoint is not None else None
    if path is not None:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise ValueError(f"checkpoint {path!r}: directory {parent!r} does not exist")
        done = _load_checkpoint(path, config, seed_from_user=generator is not None)
        if done is not None:
            config["seed"] = seed = int(done.metadata["seed"])
            parts.append(
                done if done.num_probes <= num_probes else done.select(slice(0, num_probes))
            )
            logger.info(
                "slq: resuming from %s with %d of %d probes done",
                path,
                parts[0].num_probes,
                num_probes,
            )
    first = sum(p.num_probes for p in parts)

    bar = None
    if progress and first < num_probes:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_probes * m, initial=first * m, desc="SLQ", unit="step")
    try:
        while first < num_probes:
            count = min(probe_batch_size, num_probes - first)
            V = _probe_block(d, first, count, seed, A.dtype, A.device)
            restart_gen = torch.Generator(device=A.device).manual_seed(seed + 2**62 + first)
            res = lanczos(
                A,
                num_steps=num_steps,
                v0=V,
                reorthogonalize=reorthogonalize,
                generator=restart_gen,
                callback=(lambda _j, n=count: bar.update(n)) if bar is not None else None,
            )
            parts.append(SpectralDensity.from_lanczos(res, metadata=config))
            first += count
            if path is not None:
                SpectralDensity.concatenate(parts).save(path)
                logger.debug("slq: checkpointed %d probes to %s", first, path)
    finally:
        if bar is not None:
            bar.close()
    return SpectralDensity.concatenate(parts)
