"""Hessian eigenvalue spectrum of a CNN trained on scikit-learn's digits (Ghorbani et al. 2019 style).

Trains the built-in digits CNN of ``curvature report`` for a few seconds, then computes

* the top eigenvalues of the training-loss Hessian with ``spectra.eigsh`` (thick-restarted Lanczos),
  with their true residuals ``‖Hv − λv‖/|λ|``,
* the eigenvalue density with stochastic Lanczos quadrature (``spectra.slq``) and ``tr H`` from it,

and saves a two-panel figure: the density on a log y-axis with the top eigenvalues marked, and the
fraction of eigenvalues per decade of ``|λ|`` (positive and negative eigenvalues separately).

Run: ``python examples/spectrum_of_trained_model.py --out spectrum.png`` (about 15 s on one CPU core;
needs scikit-learn, ``pip install -e ".[app]"``).
"""

from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import spectra  # noqa: E402
from curvature import Hessian  # noqa: E402
from curvature.app.builtin import digits_cnn  # noqa: E402
from curvature.app.figures import plot_spectrum  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="spectrum.png", help="where to save the figure (PNG)")
    parser.add_argument("--probes", type=int, default=4, help="SLQ probes")
    parser.add_argument("--steps", type=int, default=80, help="Lanczos steps per probe")
    parser.add_argument("--top-k", type=int, default=10, help="top eigenvalues to compute and mark")
    parser.add_argument("--quick", action="store_true", help="shorter training and fewer samples (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # A tiny model: its kernels gain nothing from threads, and idle OpenMP threads slow a shared machine.
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    problem = digits_cnn(seed=args.seed, steps=150 if args.quick else 400)
    d = sum(p.numel() for p in problem.model.parameters())
    print(f"trained {problem.name} in {time.perf_counter() - t0:.1f} s: held-out accuracy "
          f"{problem.info['held-out accuracy']:.1%}, {d:,} parameters")

    g = torch.Generator().manual_seed(args.seed)
    with Hessian(problem.model, problem.loss_fn, problem.data) as H:
        t0 = time.perf_counter()
        top = spectra.eigsh(H, k=args.top_k, tol=1e-4, generator=g)
        V = top.eigenvectors
        true_residuals = (H @ V - V * top.eigenvalues.to(V.dtype)).double().norm(dim=0) / top.eigenvalues.abs()
        print(f"top {args.top_k} eigenvalues ({top.num_matvecs} products, {time.perf_counter() - t0:.1f} s): "
              + ", ".join(f"{v:.4g}" for v in top.eigenvalues.tolist()))
        print(f"largest true relative residual ‖Hv − λv‖/|λ|: {true_residuals.max().item():.1e}")
        t0 = time.perf_counter()
        density = spectra.slq(H, num_probes=args.probes, num_steps=args.steps, generator=g)
        tr = density.trace()
        print(f"SLQ density ({args.probes} × {args.steps} steps, {time.perf_counter() - t0:.1f} s): "
              f"tr H = {tr.value:.4g} ± {2 * tr.stderr:.2g} (2 s.e.)")

    fig = plot_spectrum(density, top=top, name=problem.name)
    fig.savefig(args.out, dpi=130)
    plt.close(fig)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
