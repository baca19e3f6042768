"""Start ``world_size`` gloo processes on this machine from a test and collect what each wrote.

Processes are spawned with :mod:`torch.multiprocessing` and meet through a ``file://`` store in a
fresh directory (no port to pick). Every rank gets a short process-group timeout, and the launcher
kills (by pid) any process still alive after ``timeout`` seconds, so a hang fails the test instead
of stalling the suite.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass
class Run:
    results: list[dict[str, Any] | None]  # what each rank saved (None: nothing)
    exitcodes: list[int | None]  # None: still running when killed
    seconds: float


def _entry(rank: int, world_size: int, directory: str, worker: Callable[..., dict], pg_timeout: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method="file://" + os.path.join(directory, "store"), rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=pg_timeout),
    )
    out = os.path.join(directory, f"rank{rank}.pt")

    def save(results: dict[str, Any]) -> None:  # workers call it before anything that may kill them
        torch.save(results, out + ".tmp")
        os.replace(out + ".tmp", out)

    save(worker(rank, world_size, save))
    dist.destroy_process_group()


def run_ranks(worker: Callable[..., dict], world_size: int, *, timeout: float = 60.0, pg_timeout: float = 20.0) -> Run:
    """Run ``worker(rank, world_size, save)`` on ``world_size`` processes; ``worker`` returns a dict."""
    directory = tempfile.mkdtemp(prefix="curvature-dist-")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(r, world_size, directory, worker, pg_timeout)) for r in range(world_size)]
    start = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(0.0, timeout - (time.monotonic() - start)))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    seconds = time.monotonic() - start
    results = []
    for r in range(world_size):
        path = os.path.join(directory, f"rank{r}.pt")
        results.append(torch.load(path, weights_only=False) if os.path.exists(path) else None)
    return Run(results, [p.exitcode for p in procs], seconds)
