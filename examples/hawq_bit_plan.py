"""Hessian-aware mixed-precision bit plans (HAWQ V1/V2/V3) for a CNN trained on scikit-learn's digits.

Steps (about 20 s on one CPU thread):

1. train a small CNN on the bundled 8x8 digits (1,200 training / 597 held-out images);
2. per-layer sensitivities on 512 calibration images: HAWQ-V2's average trace ``Tr(H_ii)/n_i``
   (all layers from one shared set of Hutchinson probes) and HAWQ-V1's top eigenvalue per block;
3. the exact (size, Ω) Pareto frontier over bit-widths {2, 4, 8} and the measured held-out
   accuracy of its plans and of random plans;
4. the HAWQ plan at the size of uniform 4-bit (and of uniform 3-bit, which no uniform plan with
   these choices has), compared with uniform 4-bit and with random plans of about the same size;
5. the rank correlation (Spearman) between measured loss changes of random plans and (a) the
   layer-wise Ω, (b) the inter-layer prediction ``gᵀΔw + ½ΔwᵀHΔw`` (Schaefer et al. 2023);
6. a bisection plan search for the smallest plan within a held-out accuracy-drop budget.

Writes ``sensitivity.png``, ``pareto.png``, ``rank_correlation.png``, ``bit_plan.json`` and
``summary.json`` into ``--out``.

Run: ``python examples/hawq_bit_plan.py --out hawq_out``
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from torch import nn  # noqa: E402

import quant  # noqa: E402

CHOICES = (2, 4, 8)


def load_digits_split(generator: torch.Generator):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=generator)
    x, y = x[perm], y[perm]
    return (x[:1200], y[:1200]), (x[1200:], y[1200:])


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def train(model: nn.Module, data, *, epochs: int, generator: torch.Generator) -> None:
    x, y = data
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=generator).split(64):
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="hawq_out", help="output directory for figures and JSON")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (about 0.15 s each)")
    parser.add_argument("--probes", type=int, default=100, help="Hutchinson probes shared by all layers")
    parser.add_argument("--random-plans", type=int, default=60, help="random plans sampled for the comparisons")
    parser.add_argument("--accuracy-drop", type=float, default=0.01,
                        help="held-out accuracy-drop budget of the plan search")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny kernels; threads only add overhead on a shared CPU
    os.makedirs(args.out, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    loss_fn = nn.CrossEntropyLoss()
    summary: dict = {}

    train_data, test_data = load_digits_split(g)
    torch.manual_seed(args.seed)  # model initialisation (application code may seed; the library never does)
    model = make_cnn()
    t0 = time.perf_counter()
    train(model, train_data, epochs=args.epochs, generator=g)
    base = quant.evaluate_model(model, loss_fn, test_data)
    print(f"trained in {time.perf_counter() - t0:.1f} s: held-out accuracy {base.accuracy:.2%}, loss {base.loss:.4f}")
    summary["float32"] = base.to_dict()
    calib = (train_data[0][:512], train_data[1][:512])

    # -- sensitivities ---------------------------------------------------------------------------
    t0 = time.perf_counter()
    sens = quant.sensitivity(model, loss_fn, calib, metric="trace", num_matvecs=args.probes, generator=g)
    t_trace = time.perf_counter() - t0
    t0 = time.perf_counter()
    sens_v1 = quant.sensitivity(model, loss_fn, calib, metric="eigenvalue", num_matvecs=200, generator=g)
    t_eig = time.perf_counter() - t0
    print(f"\nsensitivities: V2 traces {t_trace:.2f} s ({args.probes} shared products), "
          f"V1 eigenvalues {t_eig:.2f} s ({next(iter(sens_v1.values())).num_matvecs} products)")
    print(f"{'layer':6} {'type':7} {'weights':>7} {'Tr(H)/n':>10} {'± s.e.':>9} {'λ_max':>9}")
    for name, s in sens.items():
        print(f"{name:6} {s.kind:7} {s.num_params:7d} {s.score:10.3e} {s.score_stderr:9.1e} "
              f"{sens_v1[name].eigenvalue:9.3e}")
    summary["sensitivity"] = {n: {**s.to_dict(), "eigenvalue": sens_v1[n].eigenvalue} for n, s in sens.items()}

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    quant.plot_sensitivities(sens, ax=axes[0])
    quant.plot_sensitivities(sens_v1, ax=axes[1])
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "sensitivity.png"), dpi=120)
    plt.close(fig)

    # -- Pareto frontier and plans of the uniform-4-bit size --------------------------------------
    frontier = quant.pareto_frontier(model, sens, bit_choices=CHOICES)
    uniform = {b: quant.make_plan(model, sens, b) for b in (2, 3, 4, 8, 32)}
    rand_all = quant.sample_plans(model, sens, num_plans=args.random_plans, bit_choices=CHOICES, generator=g)

    def acc(plan: quant.BitPlan) -> float:
        return plan.evaluate(model, loss_fn, test_data).accuracy

    frontier_acc = [acc(p) for p in frontier]
    rand_acc = [acc(p) for p in rand_all]
    print(f"\nPareto frontier: {len(frontier)} plans from {frontier[0].size_bytes:.0f} to "
          f"{frontier[-1].size_bytes:.0f} bytes (the float32 model: {uniform[32].size_bytes:.0f} bytes)")
    comparisons = {}
    for ub in (4, 3):
        budget = uniform[ub].size_bytes
        plan = quant.allocate_bits(model, sens, bit_choices=CHOICES, max_size_bytes=budget, method="ilp")
        same = quant.sample_plans(model, sens, num_plans=args.random_plans // 2, bit_choices=CHOICES,
                                  max_size_bytes=budget, min_size_bytes=0.9 * budget, generator=g)
        same_acc = [acc(p) for p in same]
        row = {
            "budget_bytes": budget, "plan_bits": dict(plan.bits), "plan_size_bytes": plan.size_bytes,
            "plan_accuracy": acc(plan), "plan_loss": plan.evaluate(model, loss_fn, test_data).loss,
            "random_median_accuracy": statistics.median(same_acc), "random_best_accuracy": max(same_acc),
            "random_worst_accuracy": min(same_acc), "num_random": len(same),
        }
        if ub == 4:
            row["uniform4_accuracy"] = acc(uniform[4])
            plan.to_json(os.path.join(args.out, "bit_plan.json"))
        comparisons[f"uniform{ub}_size"] = row
        print(f"budget = uniform {ub}-bit size ({budget:.0f} B): HAWQ plan {dict(plan.bits)} "
              f"accuracy {row['plan_accuracy']:.2%}"
              + (f", uniform 4-bit {row['uniform4_accuracy']:.2%}" if ub == 4 else "")
              + f", {len(same)} random plans of 90-100% of the size: median {row['random_median_accuracy']:.2%} "
              f"(range {row['random_worst_accuracy']:.2%}-{row['random_best_accuracy']:.2%})")
    summary["comparisons"] = comparisons

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    quant.plot_pareto(frontier, ax=axes[0], others=rand_all,
                      highlight={f"uniform {b}-bit": uniform[b] for b in (2, 4, 8)})
    ax = axes[1]
    ax.scatter([p.size_bytes / 1024 for p in rand_all], rand_acc, s=8, color="0.6", label="random plans")
    ax.plot([p.size_bytes / 1024 for p in frontier], frontier_acc, "o-", ms=3, label="Pareto-frontier plans")
    for b in (2, 4, 8):
        ax.scatter([uniform[b].size_bytes / 1024], [acc(uniform[b])], s=40, label=f"uniform {b}-bit", zorder=3)
    ax.axhline(base.accuracy, color="k", lw=0.8, ls="--", label="float32")
    ax.set_xlabel("model size (KiB)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(max(0.0, min(rand_acc + frontier_acc) - 0.05), 1.0)
    ax.set_title("size vs measured accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "pareto.png"), dpi=120)
    plt.close(fig)

    # -- rank correlation: layer-wise Ω vs inter-layer prediction ---------------------------------
    # float64 copy, so measured loss changes of the mildest plans are not float32 rounding noise
    m64 = copy.deepcopy(model).double()
    calib64 = (calib[0].double(), calib[1])
    sens64 = quant.sensitivity(m64, loss_fn, calib64, num_matvecs=args.probes, generator=g)
    base64 = quant.evaluate_model(m64, loss_fn, calib64, metric=None).loss
    correlations = {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, choices in zip(axes, [(3, 4, 6, 8), CHOICES]):
        plans = quant.sample_plans(m64, sens64, num_plans=args.random_plans, bit_choices=choices, generator=g)
        t0 = time.perf_counter()
        with quant.LossChangePredictor(m64, loss_fn, calib64) as predictor:
            predicted = [predictor.predict(p).total for p in plans]
        t_pred = time.perf_counter() - t0
        measured = [p.evaluate(m64, loss_fn, calib64, metric=None).loss - base64 for p in plans]
        omega = [p.omega for p in plans]
        rho_pred, rho_omega = spearmanr(predicted, measured)[0], spearmanr(omega, measured)[0]
        key = "bits_" + "_".join(map(str, choices))
        correlations[key] = {"spearman_interlayer": rho_pred, "spearman_omega": rho_omega,
                             "num_plans": len(plans), "prediction_seconds": t_pred}
        print(f"\nrank correlation with the measured calibration-loss change, {len(plans)} random plans "
              f"over bits {choices}: inter-layer gᵀΔw + ½ΔwᵀHΔw ρ = {rho_pred:.3f}, layer-wise Ω ρ = "
              f"{rho_omega:.3f} (predictions {t_pred:.2f} s: one gradient + one HVP per plan)")
        ax.scatter(measured, predicted, s=10, label=f"inter-layer (ρ = {rho_pred:.2f})")
        ax.scatter(measured, omega, s=10, marker="x", label=f"layer-wise Ω (ρ = {rho_omega:.2f})")
        lo = min(min(measured), min(predicted))
        hi = max(max(measured), max(predicted))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
        ax.set_xscale("symlog", linthresh=1e-4)
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_xlabel("measured loss change")
        ax.set_ylabel("predicted loss change / Ω")
        ax.set_title(f"random plans over bits {choices}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "rank_correlation.png"), dpi=120)
    plt.close(fig)
    summary["rank_correlation"] = correlations

    # -- bisection plan search within an accuracy-drop budget ------------------------------------
    t0 = time.perf_counter()
    res = quant.search_plan(model, loss_fn, calib, sens, max_accuracy_drop=args.accuracy_drop,
                            bit_choices=CHOICES, eval_data=test_data)
    print(f"\nplan search (held-out accuracy drop <= {args.accuracy_drop:.1%}): {dict(res.plan.bits)}, "
          f"{res.plan.size_bytes:.0f} B ({res.plan.size_bytes / uniform[8].size_bytes:.0%} of all-8-bit), "
          f"accuracy {res.measured.accuracy:.2%} vs {res.baseline.accuracy:.2%}, "
          f"{len(res.evaluations)} bisection checks over {len(frontier)} frontier sizes, "
          f"{time.perf_counter() - t0:.2f} s")
    summary["search"] = {"bits": dict(res.plan.bits), "size_bytes": res.plan.size_bytes,
                         "accuracy": res.measured.accuracy, "baseline_accuracy": res.baseline.accuracy,
                         "evaluations": list(res.evaluations)}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\nwrote {args.out}/sensitivity.png, pareto.png, rank_correlation.png, bit_plan.json, summary.json")


if __name__ == "__main__":
    main()
