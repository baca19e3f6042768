"""Hessian eigenvalue spectrum of a trained network (Ghorbani et al. 2019 style figure).

Trains a small MLP on a synthetic 10-class problem for a few seconds on the CPU, then computes

* the top eigenvalues of the training-loss Hessian with ``spectra.eigsh`` (thick-restarted Lanczos),
* the eigenvalue density with stochastic Lanczos quadrature (``spectra.slq``),
* ``tr H`` and ``‖H‖_F²`` from the same quadrature,

and saves a two-panel figure: the density on a log y-axis with the top eigenvalues marked, and the
density of ``|λ|`` on log-log axes (positive and negative eigenvalues separately).

Run: ``python examples/spectrum_of_trained_model.py --out spectrum.png`` (about 10 s on a CPU).
"""

from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import spectra  # noqa: E402
from curvature import Hessian  # noqa: E402


def make_data(num_samples: int, num_features: int, num_classes: int, generator: torch.Generator):
    """Gaussian blobs around random class centres, with some label noise."""
    centres = 1.5 * torch.randn(num_classes, num_features, generator=generator)
    y = torch.randint(0, num_classes, (num_samples,), generator=generator)
    x = centres[y] + torch.randn(num_samples, num_features, generator=generator)
    flip = torch.rand(num_samples, generator=generator) < 0.05
    y = torch.where(flip, torch.randint(0, num_classes, (num_samples,), generator=generator), y)
    return x, y


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, generator: torch.Generator):
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(x.shape[0], generator=generator).split(128):
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        loss = loss_fn(model(x), y).item()
        acc = (model(x).argmax(1) == y).float().mean().item()
    return loss, acc


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="spectrum.png", help="where to save the figure (PNG)")
    parser.add_argument("--epochs", type=int, default=40, help="training epochs (about 0.1 s each)")
    parser.add_argument("--probes", type=int, default=4, help="SLQ probes")
    parser.add_argument("--steps", type=int, default=90, help="Lanczos steps per probe")
    parser.add_argument("--top-k", type=int, default=10, help="top eigenvalues to compute and mark")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # The model is tiny: its kernels are too small to gain from threads, and on a shared machine
    # idle-waiting OpenMP threads can slow every small op down many times over.
    torch.set_num_threads(1)

    g = torch.Generator().manual_seed(args.seed)
    x, y = make_data(2048, 20, 10, g)
    torch.manual_seed(args.seed)  # model initialization (application code may seed; the library never does)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    t0 = time.perf_counter()
    loss, acc = train(model, x, y, epochs=args.epochs, generator=g)
    d = sum(p.numel() for p in model.parameters())
    print(f"trained {args.epochs} epochs ({time.perf_counter() - t0:.1f} s): loss {loss:.3f}, "
          f"accuracy {acc:.1%}, {d:,} parameters")

    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    # One batch: the operator keeps the first-order graph, so each product is one double backward.
    with Hessian(model, loss_fn, (x, y)) as H:
        top = spectra.eigsh(H, k=args.top_k, generator=g)
        t1 = time.perf_counter()
        density = spectra.slq(H, num_probes=args.probes, num_steps=args.steps, generator=g, progress=True)
        t2 = time.perf_counter()
    print(f"eigsh: top-{args.top_k} in {top.num_matvecs} products ({t1 - t0:.1f} s), "
          f"all converged: {top.all_converged}")
    print("  λ =", ", ".join(f"{v:.4g}" for v in top.eigenvalues.tolist()))
    print(f"slq: {density.num_probes} probes × {density.num_steps} steps ({t2 - t1:.1f} s)")
    tr, fro = density.trace(), density.trace(lambda t: t**2)
    print(f"  tr H ≈ {tr.value:.4g} ± {tr.stderr:.2g},  ‖H‖_F² ≈ {fro.value:.4g} ± {fro.stderr:.2g}")
    # Shares of the spectrum by the quadrature weights; "flat" is relative to the top eigenvalue.
    cut = 1e-3 * float(top.eigenvalues[0])
    share = lambda mask: float((density.weights * mask).sum()) / density.num_probes  # noqa: E731
    print(f"  flat (|λ| < {cut:.1e}) ≈ {share(density.nodes.abs() < cut):.0%}, "
          f"negative (λ < −{cut:.1e}) ≈ {share(density.nodes < -cut):.0%}")

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    density.plot(left, top_eigenvalues=top, title="Hessian eigenvalue density (log scale)")
    density.plot(right, log_lambda=True, title="Density of |λ| (log-log): bulk spans decades")
    fig.suptitle(
        f"MLP 20-64-64-10 on synthetic data (d = {d:,}, train loss {loss:.3f}); "
        f"SLQ {density.num_probes} probes × {density.num_steps} steps",
        fontsize=11,
    )
    fig.savefig(args.out, dpi=150)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
