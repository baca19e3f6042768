"""Spectral analyses of a digits classifier: bulk + outliers, H = G + R, batch size and learning rates.

On scikit-learn's bundled digits (1797 8x8 images, C = 10 classes) a 64-32-10 ReLU MLP is trained
by full-batch SGD, and the analyses of the literature are run with ``spectra.analysis``:

1. ``outliers``: the Hessian spectrum is a bulk near zero plus a few outliers (Sagun et al.),
   about one per class (Papyan); the count is detected by a robust gap rule and compared with C.
2. ``decompose``: ``H = G + R``; the Gauss-Newton term ``G`` carries the outliers, the residual
   ``R`` the negative eigenvalues.
3. ``batch_size_scaling``: mini-batch sharpness exceeds the full-data one and shrinks like
   ``λ_∞ + κ/B``; the largest stable SGD rate grows about linearly in B and Adam's about as √B
   (Granziol, Zohren & Roberts), with the exponents measured.
4. ``suggest_hyperparameters``: ``2/λ_max`` and Polyak's heavy-ball rate and momentum; SGD is then
   trained at a few multiples of the suggested largest rate. No claim is made that training
   diverges above it: sharpness adapts during training (it drops until the rate is stable).
5. The outlier count over training: it drifts (the count is a property of a checkpoint).

Writes ``outliers.png``, ``decomposition.png``, ``batch_scaling.png`` and ``training.png`` to
``--out-dir``. Run: ``python examples/spectral_analyses.py`` (about 30 s on one CPU core).
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from curvature import Hessian  # noqa: E402
from spectra import analysis  # noqa: E402

C = 10


def load_data():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return torch.tensor(X / 16.0, dtype=torch.float64), torch.tensor(y)


def make_model(generator: torch.Generator) -> nn.Module:
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, C)).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64) / p.shape[1] ** 0.5)
            else:
                p.zero_()
    return model


def train(model, X, y, *, steps: int, lr: float, momentum: float = 0.9):
    """Full-batch SGD; returns the loss after every step."""
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    losses = []
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def accuracy(model, X, y) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).double().mean())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="spectral-analyses", help="folder for the PNG figures")
    parser.add_argument("--steps", type=int, default=30, help="training steps before the analyses")
    parser.add_argument("--drift-steps", type=int, nargs="+", default=[10, 30, 100, 300],
                        help="checkpoints (steps) at which the outlier count is tracked")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    parser.add_argument("--num-batches", type=int, default=8, help="batches per batch size")
    parser.add_argument("--train-steps", type=int, default=150, help="SGD steps per learning-rate curve")
    parser.add_argument("--multiples", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0],
                        help="multiples of the suggested largest rate 2/λ_max to train at")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny kernels: threads only add overhead on a shared machine
    os.makedirs(args.out_dir, exist_ok=True)
    t_start = time.perf_counter()

    X, y = load_data()
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(args.seed)
    model = make_model(g)
    init = copy.deepcopy(model)
    train(model, X, y, steps=args.steps, lr=0.5)
    d = sum(p.numel() for p in model.parameters())
    print(f"MLP 64-32-10 (d = {d:,}) after {args.steps} full-batch SGD steps: "
          f"train accuracy {accuracy(model, X, y):.3f}")

    # 1. Bulk + outliers.
    H = Hessian(model, loss_fn, (X, y))
    rep = analysis.outliers(H, num_classes=C, generator=g)
    print(f"outliers: k̂ = {rep.count} (C = {C}, matches {rep.matches}), bulk edge {rep.bulk_edge:.4g}, "
          f"θ1/λ₊ = {rep.separation[0]:.1f}, outliers hold {rep.outlier_share:.1%} of tr H = {rep.trace:.4g}; "
          f"gap score {rep.cut_score:.0f}; {rep.num_converged} converged Ritz values "
          f"from {rep.num_steps} Lanczos steps")
    axes = rep.plot()
    axes[0].figure.suptitle(f"Digits MLP after {args.steps} steps: Hessian bulk + outliers", fontsize=11)
    axes[0].figure.savefig(os.path.join(args.out_dir, "outliers.png"), dpi=130)
    plt.close(axes[0].figure)

    # 2. H = G + R.
    dec = analysis.decompose(model, loss_fn, (X, y), k=max(rep.count, 3), tol=1e-5, max_iter=300, generator=g)
    for t in dec.terms:
        print(f"  {t.name}: top {t.top[:3].numpy().round(4).tolist()}, min {float(t.bottom[0]):.3g}, tr {t.trace:.4g}")
    print(f"decompose: G carries {float(dec.ggn_share_of_top.mean()):.1%} of the top eigenvalues of H; "
          f"negatives carried by {dec.negative_carrier}")
    axes = dec.plot()
    axes[0].figure.savefig(os.path.join(args.out_dir, "decomposition.png"), dpi=130)
    plt.close(axes[0].figure)

    # 3. Batch size.
    t0 = time.perf_counter()
    bs = analysis.batch_size_scaling(model, loss_fn, (X, y), batch_sizes=args.batch_sizes,
                                     num_batches=args.num_batches, generator=g)
    print(f"batch_size_scaling ({time.perf_counter() - t0:.1f} s, {bs.num_matvecs} products): "
          f"mean λ_max = {bs.mean_lambda_max.round(3).tolist()} vs full data {bs.lambda_full_max:.4g}")
    below = bs.exponents(max_batch_size=bs.fit.critical_batch_size)
    print(f"  fit λ_∞ + κ/B: λ_∞ = {bs.fit.lambda_inf:.4g}, κ = {bs.fit.kappa:.4g}, "
          f"B_crit = {bs.fit.critical_batch_size:.3g}; measured lr exponents over all B: SGD {bs.sgd_exponent:.2f}, "
          f"Adam {bs.adam_exponent:.2f}; over B <= B_crit: SGD {below[0]:.2f}, Adam {below[1]:.2f}")
    axes = bs.plot()
    axes[0].figure.savefig(os.path.join(args.out_dir, "batch_scaling.png"), dpi=130)
    plt.close(axes[0].figure)

    # 4. Learning-rate rule, and SGD at multiples of it (plain GD, from this checkpoint).
    sug = analysis.suggest_hyperparameters(H, generator=g)
    print(f"suggest_hyperparameters: 2/λ_max = {sug.max_learning_rate:.4g}; heavy ball α = {sug.learning_rate:.4g}, "
          f"ρ = {sug.momentum:.3f} (μ = {sug.mu:.3g} by {sug.mu_rule})")
    H.release()
    curves = {}
    for mult in args.multiples:
        m = copy.deepcopy(model)
        curves[mult] = train(m, X, y, steps=args.train_steps, lr=mult * sug.max_learning_rate, momentum=0.0)
        print(f"  SGD at {mult:g} × 2/λ_max: final loss {curves[mult][-1]:.4g}, accuracy {accuracy(m, X, y):.3f}")

    # 5. Count over training (a fresh run from the same initialization).
    drift = []
    m = copy.deepcopy(init)
    done = 0
    for step in sorted(args.drift_steps):
        train(m, X, y, steps=step - done, lr=0.5)
        done = step
        r = analysis.outliers(Hessian(m, loss_fn, (X, y)), num_classes=C, generator=g)
        drift.append((step, r.count, r.conclusive, float(r.eigenvalues[0])))
        print(f"  step {step}: k̂ = {r.count} (conclusive {r.conclusive}), λ_max = {float(r.eigenvalues[0]):.4g}")

    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for mult, losses in curves.items():
        lr = mult * sug.max_learning_rate
        ax_l.semilogy(range(1, len(losses) + 1), losses, label=f"{mult:g} × 2/λ_max (lr {lr:.3g})")
    ax_l.set_xlabel("full-batch SGD step (no momentum)")
    ax_l.set_ylabel("training loss (log scale)")
    ax_l.set_title("SGD at multiples of the suggested largest rate\n(sharpness adapts: no divergence claimed)",
                   fontsize=10)
    ax_l.legend(fontsize=8, frameon=False)
    steps, counts = [s for s, *_ in drift], [c for _, c, *_ in drift]
    ax_r.plot(steps, counts, "o-", label="k̂ (Hessian)")
    for s, c, ok, _ in drift:
        if not ok:
            ax_r.annotate("inconclusive", (s, c), fontsize=7)
    ax_r.axhline(C, color="green", linestyle="-", linewidth=0.8, label="C")
    ax_r.axhline(C - 1, color="green", linestyle="--", linewidth=0.8, label="C − 1")
    ax_r.set_xscale("log")
    ax_r.set_xlabel("training step (lr 0.5, momentum 0.9)")
    ax_r.set_ylabel("number of outliers")
    ax_r.set_title("The outlier count drifts over training", fontsize=10)
    ax_r.legend(fontsize=8, frameon=False)
    fig.savefig(os.path.join(args.out_dir, "training.png"), dpi=130)
    plt.close(fig)
    print(f"saved 4 figures to {args.out_dir}/ in {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
