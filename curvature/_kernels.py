"""Thread-safe selection of the differentiable (reference) attention kernels.

The fused attention kernels (SDPA flash / memory-efficient / cuDNN, and the
``nn.MultiheadAttention`` inference fast path) have no forward-AD or double-backward formulas, so
curvature products switch them off. Those switches are process-global flags, so a plain
save-and-restore per product races between threads: thread A saves "on" and switches off, thread B
saves "off" (A's value), A restores "on", B restores "off" and the kernels stay off for the rest of
the process. Here the first product to enter saves the flags and the last one to leave restores
them, under a lock with a nesting count.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

__all__ = ["differentiable_kernels"]

_SDP_NAMES = ("flash", "mem_efficient", "cudnn", "math", "overrideable")

_lock = threading.Lock()
_depth = 0
_saved: tuple[bool, dict[str, bool]] | None = None


def _sdp_flags() -> dict[str, bool]:
    getters = {n: getattr(torch._C, f"_get_{n}_sdp_enabled", None) for n in _SDP_NAMES}
    return {n: bool(get()) for n, get in getters.items() if get is not None}


def _set_sdp_flags(flags: dict[str, bool]) -> None:
    for name, enabled in flags.items():
        getattr(torch._C, f"_set_sdp_use_{name}")(enabled)


@contextlib.contextmanager
def differentiable_kernels() -> Iterator[None]:
    """Run the block with only the reference (math) attention kernels and no MHA fast path.

    Re-entrant and safe from several threads: the flags are switched by the first block to enter
    and restored by the last to leave. While any block is active, attention in OTHER threads of
    the process also runs on the reference kernels (the flags are global).

    Examples:
        >>> before = torch.backends.mha.get_fastpath_enabled()
        >>> with differentiable_kernels():
        ...     torch.backends.mha.get_fastpath_enabled()
        False
        >>> torch.backends.mha.get_fastpath_enabled() == before
        True
    """
    global _depth, _saved
    with _lock:
        if _depth == 0:
            flags = _sdp_flags()
            _saved = (torch.backends.mha.get_fastpath_enabled(), flags)
            torch.backends.mha.set_fastpath_enabled(False)
            _set_sdp_flags({n: n == "math" for n in flags})
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved is not None:
                fastpath, flags = _saved
                torch.backends.mha.set_fastpath_enabled(fastpath)
                _set_sdp_flags(flags)
                _saved = None
