"""M-FAC benchmark: precomputation and inverse-Hessian-vector products against their floors.

For each gradient dimension d and window size m (float32 gradients), prints and records:

* ``pre_s``: building :class:`curvature.mfac.MFACInverse` (Gram matrix in float64, Cholesky,
  ``W = L⁻¹ G``), and ``pre/GGt``: its ratio to forming ``G Gᵀ`` in float32 (target <= 3);
* ``ihvp_s``: one ``F⁻¹ @ x``, and ``ihvp/floor``: its ratio to the O(dm) floor, one ``G @ x``
  plus one ``Gᵀ @ a`` (target <= 2);
* ``dense_pre_s``/``dense_ihvp_s``: the explicit route (form ``λI + GᵀG/m``, invert it, multiply
  by the d x d inverse), where d x d fits (tiny d only; "n/a" otherwise), and both routes'
  float32 errors against a float64 solve there;
* the block-diagonal variant (B = 128) for a few rows;
* the optimizer's step overhead over SGD for m = 64 and 1024 on the ~407k-parameter MLP.

Run: ``python -m bench.mfac [--device cuda] [--dims 1e5,1e6] [--grads 64,256,1024]``.
Each finished row is written to bench/results/mfac.json at once, so an interrupted sweep keeps
what it measured. On CUDA the default sweep adds d = 1e7 (target: IHVP for m = 1024 under
50 ms on an H100); gradients that would not fit twice are factored in place.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch
from torch import nn

from bench.models import make_mlp, mlp_data, num_params
from bench.timing import environment, median_time, print_table, sync, write_json
from curvature.mfac import MFACInverse
from curvature.optim import MFAC

DAMPING = 1e-4
DENSE_MAX = 4096  # a 4096 x 4096 float32 inverse is 64 MB; the d = 1e5 one would be 40 GB


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def random_gradients(m, d, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    # Correlated like real gradients (shared direction + noise), so the Gram matrix is not ~diagonal.
    G = torch.randn(m, d, generator=gen, device=device, dtype=torch.float32)
    G.add_(torch.randn(1, d, generator=gen, device=device, dtype=torch.float32), alpha=0.5)
    return G


def fits_twice(m, d, device):
    need = 2.2 * m * d * 4
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need < 0.9 * free
    return need < 0.7 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def bench_row(d, m, device, repeats, block_size=None):
    G = random_gradients(m, d, device)
    x = torch.randn(d, device=device)
    a = torch.randn(m, device=device)
    row = {"d": d, "m": m, "block": block_size or "-"}
    row["GGt_s"] = median_time(lambda: G @ G.T, repeats=1 if m * d > 1e8 else repeats, device=device)
    row["floor_s"] = median_time(lambda: (G @ x, G.T @ a), repeats=repeats, device=device)
    inplace = not fits_twice(m, d, device)
    if inplace:  # measure a copy-free build; G becomes W
        op, row["pre_s"] = timed(lambda: MFACInverse(G, damping=DAMPING, block_size=block_size, inplace=True), device)
    else:
        op, row["pre_s"] = timed(lambda: MFACInverse(G, damping=DAMPING, block_size=block_size), device)
    row["inplace"] = inplace
    row["ihvp_s"] = median_time(lambda: op @ x, repeats=repeats, device=device)
    row["pre/GGt"] = row["pre_s"] / row["GGt_s"]
    row["ihvp/floor"] = row["ihvp_s"] / row["floor_s"]
    if d <= DENSE_MAX and block_size is None:
        eye = torch.eye(d, device=device)
        Finv, row["dense_pre_s"] = timed(lambda: torch.linalg.inv(DAMPING * eye + G.T @ G / m), device)
        row["dense_ihvp_s"] = median_time(lambda: Finv @ x, repeats=repeats, device=device)
        if not inplace:  # accuracy against a float64 solve (the float32 explicit inverse is worse)
            G64 = G.double()
            ref = torch.linalg.solve(DAMPING * eye.double() + G64.T @ G64 / m, x.double())
            row["mfac_rel_err"] = float((op @ x).double().sub(ref).norm() / ref.norm())
            row["dense_rel_err"] = float((Finv @ x).double().sub(ref).norm() / ref.norm())
    else:
        row["dense_pre_s"] = row["dense_ihvp_s"] = "n/a"
    G = op = None  # free the m x d tensors before the next row
    gc.collect()
    return row


def bench_optimizer(num_grads, device, steps):
    model = make_mlp().to(device).train()
    x, y = mlp_data(num_samples=128)
    x, y = x.to(device), y.to(device)
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    for p, g in zip(params, torch.autograd.grad(loss_fn(model(x), y), params)):
        p.grad = g

    def step_time(opt):
        for _ in range(3):  # warm-up; the first steps allocate state
            opt.step()
        return median_time(opt.step, repeats=steps, warmup=0, device=device)

    sgd = step_time(torch.optim.SGD(params, lr=1e-9))
    forward_backward = median_time(lambda: loss_fn(model(x), y).backward(), repeats=steps, device=device)
    rows = []
    for m in num_grads:
        mfac = step_time(MFAC(params, lr=1e-9, num_grads=m, damping=1e-4))
        rows.append({
            "params": num_params(model), "m": m, "sgd_step_s": sgd, "mfac_step_s": mfac,
            "overhead_s": mfac - sgd, "fwd+bwd_s (128 samples)": forward_backward,
            "iteration_ratio": (forward_backward + mfac) / (forward_backward + sgd),
        })
        gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dims", default=None, help="comma-separated d values (default: 4096,1e5,1e6[,1e7 on cuda])")
    parser.add_argument("--grads", default="64,256,1024")
    parser.add_argument("--optimizer-grads", default="64,1024")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--out", default="bench/results/mfac.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dims = args.dims or ("4096,1e5,1e6,1e7" if device.type == "cuda" else "4096,1e5,1e6")
    dims = [int(float(v)) for v in dims.split(",")]
    grads = [int(v) for v in args.grads.split(",")]

    payload = {"environment": {**environment(), "device": str(device), "load": os.getloadavg()},
               "damping": DAMPING, "dtype": "float32", "scaling": [], "blocked": [], "optimizer": []}
    for d in dims:
        for m in grads:
            payload["scaling"].append(bench_row(d, m, device, args.repeats))
            write_json(args.out, payload)
    for m in (64, 256):
        payload["blocked"].append(bench_row(max(dims[:3]), m, device, args.repeats, block_size=128))
        write_json(args.out, payload)
    payload["optimizer"] = bench_optimizer([int(v) for v in args.optimizer_grads.split(",")], device, args.repeats)
    write_json(args.out, payload)

    columns = ["d", "m", "block", "GGt_s", "pre_s", "pre/GGt", "floor_s", "ihvp_s", "ihvp/floor",
               "dense_pre_s", "dense_ihvp_s", "mfac_rel_err", "dense_rel_err"]
    print(f"M-FAC on {device} (float32, damping {DAMPING:g}; times in seconds, medians)")
    print_table(payload["scaling"] + payload["blocked"], columns)
    print()
    print_table(payload["optimizer"], list(payload["optimizer"][0]))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
