"""Hessian spectrum of a digits classifier computed data-parallel over torch.distributed ranks.

Each rank trains the same small MLP on its shard of scikit-learn's digits with
``DistributedDataParallel`` (gloo on CPU), then wraps a ``curvature.Hessian`` over ITS shard
of the training set in ``curvature.DataParallelOperator``: every product is the Hessian of the
mean loss over all ranks' samples (the shards are uneven, and that is exact). ``spectra.eigsh``
and ``spectra.slq`` run unchanged on the wrapped operator, with the same generator seed on
every rank. Rank 0 prints the top eigenvalues and writes the figure (density on a log y-axis with
the top eigenvalues marked); ``--check`` also computes them in one process over all the data
and prints the difference.

Run: ``torchrun --nproc_per_node=2 examples/distributed_spectrum.py --out distributed_spectrum.png``
(about 20 s on a CPU); ``python examples/distributed_spectrum.py`` runs as a single rank.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import spectra  # noqa: E402
from curvature import DataParallelOperator, Hessian, unwrap_data_parallel  # noqa: E402


def digits_split(seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def make_model(seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    with torch.no_grad():  # the same initial weights on every rank, without the global RNG
        for p in model.parameters():
            p.uniform_(-0.3, 0.3, generator=g)
    return model


def init_group() -> None:
    """torchrun sets RANK/WORLD_SIZE/MASTER_ADDR; without it, a one-rank group on a file store."""
    timeout = datetime.timedelta(seconds=120)  # a rank that dies does not hang the others for long
    if "RANK" in os.environ:
        dist.init_process_group("gloo", timeout=timeout)
    else:
        store = "file://" + os.path.join(tempfile.mkdtemp(), "store")
        dist.init_process_group("gloo", init_method=store, rank=0, world_size=1, timeout=timeout)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="distributed_spectrum.png", help="where rank 0 saves the figure (PNG)")
    parser.add_argument("--epochs", type=int, default=30, help="DDP training epochs")
    parser.add_argument("--probes", type=int, default=4, help="SLQ probes")
    parser.add_argument("--steps", type=int, default=60, help="Lanczos steps per SLQ probe")
    parser.add_argument("--top-k", type=int, default=5, help="top eigenvalues to compute and mark")
    parser.add_argument("--check", action="store_true", help="rank 0 recomputes the eigenvalues in one process")
    parser.add_argument("--quick", action="store_true", help="few epochs, probes and steps (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.probes, args.steps = 3, 2, 20
    torch.set_num_threads(1)
    init_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    (x, y), (x_test, y_test) = digits_split(args.seed)
    # Uneven shards on purpose (1400 does not divide by 3); the curvature is still the global mean.
    xs, ys = torch.tensor_split(x, world)[rank], torch.tensor_split(y, world)[rank]

    model = make_model(args.seed)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    ce = nn.CrossEntropyLoss()
    steps_per_epoch = (len(y) // world) // 50  # the same on every rank, so DDP's collectives pair up
    g = torch.Generator().manual_seed(args.seed + 1 + rank)
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(len(ys), generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * 50 : (i + 1) * 50]
            opt.zero_grad()
            ce(ddp(xs[idx]), ys[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    train_s = time.perf_counter() - t0

    shard = [(xs[i : i + 200], ys[i : i + 200]) for i in range(0, len(ys), 200)]
    H = DataParallelOperator(Hessian(unwrap_data_parallel(ddp), ce, shard))
    t0 = time.perf_counter()
    top = spectra.eigsh(H, k=args.top_k, tol=1e-5, generator=torch.Generator().manual_seed(args.seed))
    density = spectra.slq(H, num_probes=args.probes, num_steps=args.steps,
                          generator=torch.Generator().manual_seed(args.seed + 1))
    curvature_s = time.perf_counter() - t0
    if rank == 0:
        sizes = ", ".join(str(len(t)) for t in torch.tensor_split(y, world))
        print(f"{world} rank(s), {H.num_samples} samples ({sizes} per rank), d={H.shape[0]}; trained in "
              f"{train_s:.1f} s, test accuracy {accuracy:.1%}")
        print(f"top {args.top_k} eigenvalues ({top.num_matvecs} products): "
              + ", ".join(f"{v:.5g}" for v in top.eigenvalues.tolist()))
        print(f"SLQ: {args.probes} probes x {args.steps} steps, trace estimate {density.trace().value:.4g}; "
              f"curvature in {curvature_s:.1f} s; all-reduce {H.bytes_per_column:,} bytes per column")
        if args.check:
            single = spectra.eigsh(Hessian(model, ce, (x, y)), k=args.top_k, tol=1e-5,
                                   generator=torch.Generator().manual_seed(args.seed))
            diff = (single.eigenvalues - top.eigenvalues).abs().max().item()
            print(f"one process over all {len(y)} samples: max |difference| of the top eigenvalues {diff:.2e}")
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        density.plot(ax=ax, top_eigenvalues=top.eigenvalues,
                     title=f"Hessian spectrum, digits MLP, {world} data-parallel rank(s)")
        ax.set_xlabel("eigenvalue λ")
        ax.set_ylabel("density φ(λ) (log scale)")
        fig.tight_layout()
        fig.savefig(args.out, dpi=120)
        print(f"wrote {args.out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
