"""Train a small MLP on scikit-learn's digits with SGD, AdamW, Sophia-H, Sophia-G, AdaHessian and
the gradient-regularized Newton method (``curvature.optim``), and plot loss and accuracy.

Every optimizer sees the same mini-batches (64 images of 8x8 pixels, 10 classes) and uses the
standard closure ``opt.zero_grad(); loss.backward(); return loss`` (no ``create_graph``):

* Sophia-H and AdaHessian difference the closure's gradients on curvature-refresh steps;
* Sophia-G gets its Gauss-Newton-Bartlett estimate from ``opt.update_curvature(model, X)``;
* the regularized Newton method gets the mini-batch GGN, ``opt.step(closure, curvature=GGN(...))``.

Writes a two-panel PNG (test loss and test accuracy against the step) and prints a table.
Run: ``python examples/optimizers_digits.py --out optimizers_digits.png`` (about 20-40 s on CPU;
``--steps 20`` for a smoke test).
"""

from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402

import curvature  # noqa: E402
from curvature.optim import AdaHessian, GradientRegularizedNewton, Sophia  # noqa: E402

BATCH = 64


def load(seed: int = 0):
    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    n_train = 1400
    return (X[:n_train], y[:n_train]), (X[n_train:], y[n_train:])


def make_model(seed: int = 1) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


OPTIMIZERS = {
    "SGD (lr 0.3, momentum 0.9)": lambda m: torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9),
    "AdamW (lr 3e-3)": lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=1e-4),
    "Sophia-H (lr 3e-3, k=10)": lambda m: Sophia(m.parameters(), lr=3e-3, rho=0.04, weight_decay=1e-4,
                                                  generator=gen()),
    "Sophia-G (lr 3e-3, k=10)": lambda m: Sophia(m.parameters(), lr=3e-3, rho=0.04, weight_decay=1e-4,
                                                  estimator="gnb", generator=gen()),
    "AdaHessian (lr 0.15)": lambda m: AdaHessian(m.parameters(), lr=0.15, generator=gen()),
    "Regularized Newton (GGN)": lambda m: GradientRegularizedNewton(m.parameters(), cg_max_iter=20),
}


def train(name, make_opt, train_data, test_data, steps, every):
    model = make_model()
    opt = make_opt(model)
    loss_fn = nn.CrossEntropyLoss()
    X_all, y_all = train_data
    order = torch.Generator().manual_seed(2)
    history = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(y_all), (BATCH,), generator=order)
        X, y = X_all[idx], y_all[idx]

        def closure(X=X, y=y):
            opt.zero_grad()
            loss = loss_fn(model(X), y)
            loss.backward()
            return loss

        if isinstance(opt, Sophia) and opt.estimator == "gnb" and opt.curvature_due:
            opt.update_curvature(model, X)  # labels sampled from the model, times B = 64
        if isinstance(opt, GradientRegularizedNewton):
            opt.step(closure, curvature=curvature.GGN(model, loss_fn, (X, y)))
        else:
            opt.step(closure)
        if step % every == 0 or step == 1:
            with torch.no_grad():
                out = model(test_data[0])
                history.append((step, float(loss_fn(out, test_data[1])),
                                float((out.argmax(1) == test_data[1]).float().mean())))
    return history, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per method (default 300)")
    parser.add_argument("--every", type=int, default=10, help="steps between test evaluations")
    parser.add_argument("--out", default="optimizers_digits.png", help="output PNG path")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    train_data, test_data = load()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    print(f"{'optimizer':32s} {'test loss':>9s} {'test acc':>9s} {'time s':>7s}")
    for name, make_opt in OPTIMIZERS.items():
        history, seconds = train(name, make_opt, train_data, test_data, args.steps, args.every)
        steps, losses, accs = zip(*history)
        ax_loss.plot(steps, losses, label=name)
        ax_acc.plot(steps, accs, label=name)
        print(f"{name:32s} {losses[-1]:9.4f} {accs[-1]:9.3f} {seconds:7.1f}")
    ax_loss.set(xlabel="step (mini-batch of 64)", ylabel="test cross-entropy", yscale="log",
                title="digits MLP 64-64-10: test loss")
    ax_acc.set(xlabel="step (mini-batch of 64)", ylabel="test accuracy", ylim=(0.5, 1.0),
               title="test accuracy (397 held-out images)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
