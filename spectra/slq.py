"""Stochastic Lanczos quadrature: a spectral density from a few Lanczos runs, with checkpoints."""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Literal

import torch
from torch import Tensor

import curvature
from curvature import LinearOperator, as_operator
from curvature.checks import check_count
from curvature.probes import draw_probes, draw_seed, make_generator

from ._utils import LOCKSTEP_BUDGET
from .density import SpectralDensity
from .lanczos import lanczos

__all__ = ["operator_fingerprint", "slq"]

logger = logging.getLogger(__name__)

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
    cols = [
        draw_probes(d, 1, "rademacher", dtype=dtype, device=device, generator=torch.Generator().manual_seed(seed + i))
        for i in range(first, first + count)
    ]
    return torch.cat(cols, dim=1)


#: Seed of the fixed probe whose product identifies an operator in a checkpoint.
_FINGERPRINT_SEED = 0x5EED
#: Chunks of ``A v`` summed into the fingerprint (a change anywhere in the product shows).
_FINGERPRINT_CHUNKS = 16


def operator_fingerprint(A: LinearOperator) -> list[float]:
    """A short summary of ``A @ v`` for a fixed Rademacher ``v``: chunk sums and the squared norm.

    Two operators of the same size and class (a model's Hessian at epoch 0 and at epoch 1) give
    different fingerprints unless their products agree to rounding; it costs one product.
    """
    d = A.shape[0]
    v = draw_probes(d, 1, "rademacher", dtype=A.dtype, device=A.device,
                    generator=torch.Generator().manual_seed(_FINGERPRINT_SEED))
    w = (A @ v)[:, 0].double()
    sums = [float(c.sum()) for c in torch.tensor_split(w, min(_FINGERPRINT_CHUNKS, d))]
    return sums + [float(w.square().sum())]


def _same_fingerprint(saved: list[float], current: list[float], dtype: torch.dtype) -> bool:
    a = torch.tensor(saved, dtype=torch.float64)
    b = torch.tensor(current, dtype=torch.float64)
    if a.shape != b.shape:
        return False
    # Repeated products may differ in the last bits (summation order, backend choice); a
    # different operator differs far more than sqrt(eps) of the product's size.
    tol = math.sqrt(float(torch.finfo(dtype).eps)) if dtype.is_floating_point else 1e-8
    return bool((a - b).norm() <= tol * max(float(a.norm()), float(b.norm()), 1e-300))


def _load_checkpoint(
    path: str, config: dict, seed_from_user: bool, fingerprint: Callable[[], list[float]]
) -> SpectralDensity | None:
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
    saved_print = saved.get("fingerprint")
    if saved_print is None or not _same_fingerprint(saved_print, fingerprint(), getattr(torch, config["dtype"][6:])):
        raise ValueError(
            f"checkpoint {path!r} was made on a different operator (its product with a fixed probe "
            "differs: the model, its parameters or its data changed); refusing to resume it "
            "(delete the file or pass another checkpoint path, e.g. one per epoch)"
        )
    return done


def _resume(path: str, A: LinearOperator, config: dict, num_probes: int, seed_from_user: bool) -> list[SpectralDensity]:
    """The finished probes of a checkpoint at ``path`` that this run may reuse (none if absent).

    Records the operator's fingerprint in ``config`` and adopts the checkpoint's seed.
    """
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"checkpoint {path!r}: directory {parent!r} does not exist")
    fingerprint = operator_fingerprint(A)
    config["fingerprint"] = fingerprint
    done = _load_checkpoint(path, config, seed_from_user=seed_from_user, fingerprint=lambda: fingerprint)
    if done is None:
        return []
    config["seed"] = int(done.metadata["seed"])
    kept = done if done.num_probes <= num_probes else done.select(slice(0, num_probes))
    logger.info("slq: resuming from %s with %d of %d probes done", path, kept.num_probes, num_probes)
    return [kept]


def slq(
    op: Any,
    *,
    num_probes: int = 1,
    num_steps: int = 100,
    generator: torch.Generator | None = None,
    progress: bool = False,
    checkpoint: str | os.PathLike | None = None,
    probe_batch_size: int | None = None,
    reorthogonalize: Literal["auto", "full", "none"] = "auto",
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
    file records ``d``, ``num_steps``, ``reorthogonalize``, dtype, operator type, the seed drawn
    from ``generator`` and a fingerprint of the operator (its product with a fixed probe, one extra
    product per checkpointed run); resuming a run that differs in any of them (e.g. the same path
    reused for the next epoch's Hessian) raises ``ValueError``. With ``generator=None`` a resumed
    run adopts the checkpoint's seed. ``num_probes`` may differ: a
    larger value extends the checkpoint, a smaller one uses its first probes.

    Randomness: one seed is drawn from ``generator`` (default: a fresh OS-seeded one) and
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
        reorthogonalize: ``"full"``, ``"none"`` (see :func:`spectra.lanczos`) or ``"auto"``
            (default): full while one probe's basis, ``num_steps · d`` numbers, fits 4 GiB
            (:data:`curvature.BASIS_BUDGET`), else none (memory ``O(d)``; the density stays
            right in the weak sense but outliers get ghost copies, Spec 03 §2), with a warning.

    Returns:
        A :class:`SpectralDensity`.

    Examples:
        >>> A = torch.diag(torch.linspace(-1, 1, 50, dtype=torch.float64))
        >>> dens = slq(A, num_probes=4, num_steps=20, generator=torch.Generator().manual_seed(0))
        >>> dens.nodes.shape, round(dens.trace().value, 6), dens.num_matvecs
        (torch.Size([4, 20]), 0.0, 80)
    """
    A = as_operator(op)
    d = A.shape[0]
    num_probes = check_count(num_probes, name="num_probes")
    num_steps = check_count(num_steps, name="num_steps")
    seed_from_user = generator is not None
    generator = make_generator(generator, A.device)
    if reorthogonalize not in ("auto", "full", "none"):
        raise ValueError(f"reorthogonalize must be 'auto', 'full' or 'none', got {reorthogonalize!r}")
    m = min(num_steps, d)
    itemsize = torch.empty((), dtype=A.dtype).element_size()
    if reorthogonalize == "auto":
        reorthogonalize = "full" if m * d * itemsize <= curvature.BASIS_BUDGET else "none"
        if reorthogonalize == "none":
            logger.warning(
                "slq: the basis of one probe (%d steps x d=%d) would take %.1f GiB; running without "
                "reorthogonalization (O(d) memory). Pass reorthogonalize='full' to insist.",
                m, d, m * d * itemsize / 2**30,
            )
    if probe_batch_size is None:
        probe_batch_size = max(
            1, min(num_probes, MAX_DEFAULT_BLOCK, LOCKSTEP_BUDGET // (m * d * itemsize))
        )
    else:
        probe_batch_size = check_count(probe_batch_size, name="probe_batch_size")

    seed = draw_seed(generator)
    config = {
        "dim": d,
        "num_steps": num_steps,
        "reorthogonalize": reorthogonalize,
        "seed": seed,
        "dtype": str(A.dtype),
        "operator": type(A).__name__,
    }
    path = os.fspath(checkpoint) if checkpoint is not None else None
    parts = [] if path is None else _resume(path, A, config, num_probes, seed_from_user)
    seed = config["seed"]
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
