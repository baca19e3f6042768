"""Data-parallel curvature over gloo on CPU: strong scaling of ``H @ V``, communication per product,
and the Lanczos memory / ghost-eigenvalue trade-off of the basis.

1. ``scaling``: the bench CNN (~25k parameters) and a FIXED data set of 512 images (3x32x32) in
   batches of 128; ``curvature.DataParallelOperator(Hessian(model, CE, shard))`` over 1 and 2
   gloo processes (one thread each; the shard of rank r is its half of the batches). Per
   process and per column count ``k``: the wrapped product and the local product alone
   (round-robin in the same process, medians of ``--repeats``), so the difference is what the
   fingerprint and the two all-reduces cost. Launches alternate (1, 2, 1, 2, ...). Graph caching
   is on (the default), so repeated products pay the second backward only, as in Lanczos.
   Communication per product: ``k d`` numbers in ONE all-reduce (ring: each rank sends and
   receives ``2 (n-1)/n`` of it) plus a control all-reduce of ``2n + 5`` float64 numbers.
2. ``lanczos``: a diagonal float64 operator (``d = 20000``; 5 outliers 50..250, bulk uniform on
   [0, 1]) and ``spectra.lanczos`` with ``reorthogonalize="full"`` and ``"none"`` for 50/100/200
   steps, each run in a fresh subprocess that reports its peak RSS above the operator's: the
   basis memory; and the ghosts: Ritz values beyond the bulk minus the 5 true outliers (copies of
   converged outliers that the plain recurrence produces once orthogonality is lost).
3. ``memory``: peak RSS against model size (MLP 256-w-w-10, w = 128/512/1024, 512 samples): one
   ``H @ v`` (graphs cached) and a 30-step SLQ probe with ``"none"`` and ``"full"``
   reorthogonalization, one fresh process per job (CPU RSS; GPU peaks need a GPU).

The machine is shared (2 cores, several other jobs): scaling ratios are noisy and a 2-process
speed-up cannot exceed the free cores. Run: ``python -m bench.distributed [--repeats 7]``; JSON
goes to bench/results/distributed.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bench.timing import environment, print_table, write_json

NUM_SAMPLES, BATCH = 512, 128
COLUMNS = (1, 8)


def _shard(rank: int, world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from bench.models import cnn_data

    x, y = cnn_data(num_samples=NUM_SAMPLES)
    batches = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, NUM_SAMPLES, BATCH)]
    return batches[rank::world_size]


def _scaling_worker(rank: int, world_size: int, store: str, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    from bench.models import make_cnn
    from curvature import DataParallelOperator, Hessian

    model = make_cnn().eval()
    H = DataParallelOperator(Hessian(model, nn.CrossEntropyLoss(), _shard(rank, world_size)))
    rows = []
    for k in COLUMNS:
        V = torch.randn(H.shape[0], k, generator=torch.Generator().manual_seed(k))
        H @ V  # builds and caches the graphs
        H.local @ V
        wrapped, local = [], []
        for _ in range(repeats):  # round-robin: wrapped, local, wrapped, local, ...
            dist.barrier()
            start = time.perf_counter()
            H @ V
            wrapped.append(time.perf_counter() - start)
            dist.barrier()
            start = time.perf_counter()
            H.local @ V
            local.append(time.perf_counter() - start)
        rows.append({"k": k, "wrapped": wrapped, "local": local, "d": H.shape[0],
                     "bytes_per_product": k * H.bytes_per_column, "control_bytes": (2 * world_size + 5) * 8})
    torch.save(rows, f"{out}.{rank}")
    dist.destroy_process_group()


def run_scaling(repeats: int, rounds: int) -> list[dict[str, Any]]:
    samples: dict[tuple[int, int], dict[str, list[float]]] = {}
    meta: dict[int, dict[str, Any]] = {}
    for _ in range(rounds):
        for world_size in (1, 2):
            directory = tempfile.mkdtemp(prefix="bench-dist-")
            out = os.path.join(directory, "rows")
            mp.start_processes(_scaling_worker, args=(world_size, os.path.join(directory, "store"), repeats, out),
                               nprocs=world_size, start_method="spawn")
            per_rank = [torch.load(f"{out}.{r}") for r in range(world_size)]
            for i, row in enumerate(per_rank[0]):
                # A collective product ends together on all ranks: take the slowest rank per repeat.
                wrapped = [max(r[i]["wrapped"][j] for r in per_rank) for j in range(repeats)]
                local = [max(r[i]["local"][j] for r in per_rank) for j in range(repeats)]
                entry = samples.setdefault((world_size, row["k"]), {"wrapped": [], "local": []})
                entry["wrapped"] += wrapped
                entry["local"] += local
                meta[row["k"]] = row
    rows = []
    for (world_size, k), entry in sorted(samples.items()):
        wrapped, local = statistics.median(entry["wrapped"]), statistics.median(entry["local"])
        rows.append({
            "processes": world_size, "k": k, "d": meta[k]["d"], "samples_per_rank": NUM_SAMPLES // world_size,
            "product_s": wrapped, "local_product_s": local, "overhead_s": wrapped - local,
            "allreduce_bytes": meta[k]["bytes_per_product"] if world_size > 1 else 0,
            "ring_bytes_sent_per_rank": int(2 * (world_size - 1) / world_size * meta[k]["bytes_per_product"]),
            "control_bytes": (2 * world_size + 5) * 8, "n": len(entry["wrapped"]),
        })
    for row in rows:
        one = next(r for r in rows if r["processes"] == 1 and r["k"] == row["k"])
        row["speedup_vs_1"] = one["product_s"] / row["product_s"]
    return rows


# -- Lanczos: basis memory against ghost eigenvalues ----------------------------------------------
D, OUTLIERS = 20_000, (50.0, 100.0, 150.0, 200.0, 250.0)


class _Diagonal:
    """A diagonal operator without a dense matrix (the operator contract: shape, dtype, device, @)."""

    def __init__(self, values: torch.Tensor):
        self.values, self.shape, self.dtype, self.device = values, (len(values),) * 2, values.dtype, values.device

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        return self.values[:, None] * V if V.ndim == 2 else self.values * V


def _spectrum() -> torch.Tensor:
    bulk = torch.rand(D - len(OUTLIERS), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return torch.cat([bulk, torch.tensor(OUTLIERS, dtype=torch.float64)])


def lanczos_job(mode: str, steps: int) -> dict[str, Any]:
    import spectra

    torch.set_num_threads(1)
    op = _Diagonal(_spectrum())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    res = spectra.lanczos(op, num_steps=steps, reorthogonalize=mode, generator=torch.Generator().manual_seed(1))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ritz = res.ritz()[0][0]
    beyond_bulk = int((ritz > 1.0 + 1e-6).sum())
    return {"reorthogonalize": mode, "steps": steps, "peak_extra_bytes": max(0, peak - before),
            "basis_bytes_on_paper": (steps + 1) * D * 8 if mode == "full" else 3 * D * 8,
            "ritz_beyond_bulk": beyond_bulk, "ghosts": beyond_bulk - len(OUTLIERS),
            "top_ritz": [round(float(t), 6) for t in ritz[-7:].flip(0)], "seconds": seconds}


def run_lanczos() -> list[dict[str, Any]]:
    rows = []
    for steps in (50, 100, 200):
        for mode in ("full", "none"):
            code = ("import json, sys; from bench.distributed import lanczos_job; "
                    f"print(json.dumps(lanczos_job({mode!r}, {steps})))")
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            import json

            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


# -- peak memory against model size ----------------------------------------------------------------
WIDTHS = (128, 512, 1024)


def memory_job(width: int, job: str) -> dict[str, Any]:
    """Peak RSS above the model and data of one job on an MLP 256-w-w-10 over 512 samples (one process)."""
    import spectra
    from curvature import Hessian

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(256, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                          nn.Linear(width, 10)).eval()
    x, y = torch.randn(512, 256, generator=g), torch.randint(0, 10, (512,), generator=g)
    d = sum(p.numel() for p in model.parameters())
    data = [(x[i : i + 128], y[i : i + 128]) for i in range(0, 512, 128)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    H = Hessian(model, nn.CrossEntropyLoss(), data)
    if job == "hvp":
        H @ torch.randn(d, 1, generator=g)
    elif job.startswith("slq"):
        spectra.slq(H, num_probes=1, num_steps=30, generator=g, reorthogonalize=job.split("_")[1])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"width": width, "d": d, "job": job, "peak_extra_bytes": max(0, peak - before),
            "params_bytes": 4 * d, "cached_graph_bytes": H.cached_graph_bytes}


def run_memory() -> list[dict[str, Any]]:
    import json

    rows = []
    for width in WIDTHS:
        for job in ("hvp", "slq_none", "slq_full"):
            code = ("import json; from bench.distributed import memory_job; "
                    f"print(json.dumps(memory_job({width}, {job!r})))")
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["peak_over_params"] = row["peak_extra_bytes"] / row["params_bytes"]
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed products per launch and column count")
    parser.add_argument("--rounds", type=int, default=2, help="alternating launches of 1 and 2 processes")
    parser.add_argument("--skip-lanczos", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--out", default="bench/results/distributed.json")
    args = parser.parse_args(argv)
    scaling = [] if args.skip_scaling else run_scaling(args.repeats, args.rounds)
    if scaling:
        print("H @ V over gloo processes (CPU, 1 thread each; medians; shared machine)")
        print_table(scaling, ["processes", "k", "d", "samples_per_rank", "product_s", "local_product_s",
                              "overhead_s", "speedup_vs_1", "allreduce_bytes", "ring_bytes_sent_per_rank",
                              "control_bytes", "n"])
    lanczos = [] if args.skip_lanczos else run_lanczos()
    if lanczos:
        print("\nLanczos on a diagonal operator, d=20000, 5 outliers (one process per run)")
        print_table(lanczos, ["reorthogonalize", "steps", "peak_extra_bytes", "basis_bytes_on_paper",
                              "ritz_beyond_bulk", "ghosts", "seconds"])
    memory = [] if args.skip_memory else run_memory()
    if memory:
        print("\nPeak RSS above model and data (MLP 256-w-w-10, 512 samples in 4 batches, one process per job)")
        print_table(memory, ["width", "d", "job", "peak_extra_bytes", "params_bytes", "peak_over_params",
                             "cached_graph_bytes"])
    write_json(args.out, {"environment": environment(), "scaling": scaling, "lanczos": lanczos, "memory": memory,
                          "note": "shared 2-core machine; other jobs running"})


if __name__ == "__main__":
    main()
