"""Free and used memory of a device, and the default memory budget of batched (vmapped) products.

CPU figures come from ``psutil`` when installed, else from ``/proc`` (Linux); CUDA figures from
``torch.cuda.mem_get_info`` and ``torch.cuda.memory_allocated``.
"""

from __future__ import annotations

import os

import torch

__all__ = ["BASIS_BUDGET", "free_memory", "used_memory", "default_memory_budget", "is_out_of_memory"]

#: Bytes that the parameter-sized vectors an algorithm keeps at once may take by default: the
#: Lanczos basis of :func:`spectra.eigsh` and of SLQ's full reorthogonalization, the test vectors
#: and basis of :func:`estimators.trace`'s ``"auto"`` XTrace, the outlier analysis of
#: ``curvature report``. Above it each shrinks its basis or switches to an O(d) method and says so.
#: At GPT-2 small (d = 124M, 498 MB a float32 vector) 4 GiB is 8 vectors. Read at every call, so a
#: machine with more memory may raise it once: ``curvature.BASIS_BUDGET = 16 << 30``.
BASIS_BUDGET = 4 << 30

#: Batched columns may add at most this fraction to the memory the process already uses (CPU):
#: 10%, so that with the allocator's run-to-run noise (about 5% of the peak resident set) a
#: Hessian trace's peak stays within 1.2x of a one-column-at-a-time implementation's on every run.
CPU_GROWTH = 0.10
#: ... but are always allowed this much (small models in a small process).
CPU_FLOOR = 64 << 20
#: Fraction of the free memory vmapped columns may take (either device).
FREE_FRACTION = 0.25


def _proc_kib(path: str, field: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def free_memory(device: torch.device | str) -> int | None:
    """Bytes available on ``device`` (``None`` when unknown).

    Examples:
        >>> isinstance(free_memory("cpu"), (int, type(None)))
        True
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return _proc_kib("/proc/meminfo", "MemAvailable")


def used_memory(device: torch.device | str) -> int | None:
    """Bytes this process holds on ``device``: resident set (CPU) or allocated tensors (CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except ImportError:
        return _proc_kib("/proc/self/status", "VmRSS")


def default_memory_budget(device: torch.device | str) -> int:
    """Bytes the columns of a vmapped product may take by default.

    CUDA: a quarter of the free memory. CPU: 10% of the process's resident memory (at least
    64 MiB), and at most a quarter of the available memory, so a Hessian trace's peak stays
    within 1.2x of a one-column-at-a-time implementation's (see :data:`CPU_GROWTH`).

    Examples:
        >>> default_memory_budget("cpu") >= 64 << 20
        True
    """
    device = torch.device(device)
    free = free_memory(device)
    if device.type == "cuda":
        return int(FREE_FRACTION * free) if free is not None else CPU_FLOOR
    used = used_memory(device) or 0
    budget = max(int(CPU_GROWTH * used), CPU_FLOOR)
    if free is not None:
        budget = min(budget, int(FREE_FRACTION * free))
    return budget


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator's out-of-memory error (CUDA or CPU)."""
    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
