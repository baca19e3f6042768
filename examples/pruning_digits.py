"""M-FAC (Optimal Brain Surgeon) pruning against magnitude pruning on the built-in digits CNN.

For each seed the digits CNN is trained as ``curvature report`` trains it, then, from the dense
model, pruned one-shot to 50%, 75% and 90% (global unstructured; M-FAC with ``m`` gradients of
32-image mini-batches and a few recomputations) and to the 2:4 pattern, and fine-tuned briefly
with the mask kept. Also: a joint plan (75% M-FAC sparsity, kept weights at 8 bits) against the
best pure-quantization HAWQ plan of the same size.

Writes ``pruning_digits.png`` (held-out accuracy against sparsity, mean and spread over seeds,
one-shot and fine-tuned) and ``pruning_digits.json``, and prints a Markdown table.
Run: ``python examples/pruning_digits.py --out docs/figures`` (a few minutes on one CPU core;
``--seeds 1 --quick --finetune-steps 5 --num-gradients 8`` for a smoke test).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import quant  # noqa: E402
from curvature.app.prune_command import accuracy, digits_split, finetune, gradient_batches  # noqa: E402

SPARSITIES = (0.5, 0.75, 0.9)
METHODS = ("mfac", "magnitude")


def prune_once(split, method, *, sparsity=None, pattern=None, args, gen):
    """A pruned, then fine-tuned copy of the dense model; returns (one-shot acc, fine-tuned acc, result)."""
    model = copy.deepcopy(split.model)
    data = gradient_batches(split.train, num_batches=args.num_gradients, batch_size=32, generator=gen)
    options = dict(method=method)
    if pattern:
        options["pattern"] = pattern
    else:
        options["sparsity"] = sparsity
        options["recomputations"] = args.recomputations if method == "mfac" else 1
    if method == "mfac":
        options.update(num_gradients=args.num_gradients, damping=args.damping)
    result = quant.prune(model, nn.CrossEntropyLoss(), data, **options)
    one_shot = accuracy(model, split.test)
    finetune(model, split.train, result.mask, steps=args.finetune_steps, generator=gen)
    return one_shot, accuracy(model, split.test), result, model


def joint_versus_quantization(split, args, gen):
    """75% M-FAC sparsity with 8-bit kept weights, against the best HAWQ bit plan of the same size."""
    dense = split.model
    loss_fn = nn.CrossEntropyLoss()
    calib = gradient_batches(split.train, num_batches=4, batch_size=128, generator=gen)
    pruned = copy.deepcopy(dense)
    data = gradient_batches(split.train, num_batches=args.num_gradients, batch_size=32, generator=gen)
    result = quant.prune(pruned, loss_fn, data, sparsity=0.75, num_gradients=args.num_gradients,
                         damping=args.damping, recomputations=args.recomputations)
    layers = list(result.mask.masks)
    plan = quant.CompressionPlan(dict.fromkeys(layers, 8), result.mask, method="joint")
    compressed = plan.apply(pruned)
    budget = plan.size_bytes(dense)
    pred = quant.predict_compression(dense, compressed, loss_fn, calib)
    measured = quant.evaluate_model(compressed, loss_fn, calib).loss - quant.evaluate_model(dense, loss_fn, calib).loss
    sens = quant.sensitivity(dense, loss_fn, calib, num_matvecs=args.probes, generator=gen, layers=layers)
    try:
        bit_plan = quant.allocate_bits(dense, sens, bit_choices=(1, 2, 3, 4, 6, 8), max_size_bytes=budget)
        quant_acc = accuracy(bit_plan.apply(dense), split.test)
        quant_bits = dict(bit_plan.bits)
    except quant.InfeasibleBudgetError:
        quant_acc, quant_bits = float("nan"), None
    return {
        "budget_bytes": budget,
        "joint_accuracy": accuracy(compressed, split.test),
        "joint_predicted_loss_change": pred.total,
        "joint_cross_layer_part": pred.cross_layer_quadratic,
        "joint_measured_loss_change": measured,
        "quantization_accuracy": quant_acc,
        "quantization_bits": quant_bits,
    }


def _mean_spread(values):
    values = [v for v in values if v == v]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="folder for pruning_digits.png and .json")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--num-gradients", type=int, default=64)
    parser.add_argument("--damping", type=float, default=1e-4)
    parser.add_argument("--recomputations", type=int, default=4)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--probes", type=int, default=32, help="Hutchinson probes of the HAWQ sensitivities")
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    parser.add_argument("--quick", action="store_true",
                        help="60 training steps of the CNN instead of 400 (smoke tests only, not for figures)")
    args = parser.parse_args(argv)
    sparsities = tuple(args.sparsities)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    runs = []
    for seed in range(args.seeds):
        split = digits_split(seed=seed, steps=60 if args.quick else 400)
        gen = torch.Generator().manual_seed(1000 + seed)
        run = {"seed": seed, "dense": accuracy(split.model, split.test), "oneshot": {}, "finetuned": {}}
        for method in METHODS:
            for s in sparsities:
                one, tuned, _, _ = prune_once(split, method, sparsity=s, args=args, gen=gen)
                run["oneshot"][f"{method}@{s}"], run["finetuned"][f"{method}@{s}"] = one, tuned
            one, tuned, _, _ = prune_once(split, method, pattern="2:4", args=args, gen=gen)
            run["oneshot"][f"{method}@2:4"], run["finetuned"][f"{method}@2:4"] = one, tuned
        run["joint"] = joint_versus_quantization(split, args, gen)
        runs.append(run)
        print(f"seed {seed}: dense {run['dense']:.3f}, " + ", ".join(
            f"{k} {v:.3f}/{run['finetuned'][k]:.3f}" for k, v in run["oneshot"].items()), flush=True)

    keys = [f"{m}@{s}" for s in (*sparsities, "2:4") for m in METHODS]
    table = {k: {stage: _mean_spread([r[stage][k] for r in runs]) for stage in ("oneshot", "finetuned")} for k in keys}
    margins = {}
    for s in (*sparsities, "2:4"):
        for stage in ("oneshot", "finetuned"):
            margins[f"{stage}@{s}"] = _mean_spread([r[stage][f"mfac@{s}"] - r[stage][f"magnitude@{s}"] for r in runs])
    dense = _mean_spread([r["dense"] for r in runs])
    joint = {k: _mean_spread([r["joint"][k] for r in runs]) for k in
             ("joint_accuracy", "quantization_accuracy", "joint_predicted_loss_change", "joint_measured_loss_change",
              "budget_bytes")}

    lines = [f"Dense held-out accuracy {dense[0]:.3f} ± {dense[1]:.3f} over {len(runs)} seeds.", "",
             "| sparsity | method | one-shot | fine-tuned |", "|---|---|---|---|"]
    for k in keys:
        method, s = k.split("@")
        lines.append(f"| {s} | {'M-FAC' if method == 'mfac' else 'magnitude'} | "
                     f"{table[k]['oneshot'][0]:.3f} ± {table[k]['oneshot'][1]:.3f} | "
                     f"{table[k]['finetuned'][0]:.3f} ± {table[k]['finetuned'][1]:.3f} |")
    lines += ["", "| sparsity | M-FAC margin one-shot | M-FAC margin fine-tuned |", "|---|---|---|"]
    for s in (*sparsities, "2:4"):
        a, b = margins[f"oneshot@{s}"], margins[f"finetuned@{s}"]
        lines.append(f"| {s} | {a[0]:+.3f} ± {a[1]:.3f} | {b[0]:+.3f} ± {b[1]:.3f} |")
    lines += ["", f"Joint plan (75% M-FAC + 8 bits, {joint['budget_bytes'][0]:.0f} B): held-out accuracy "
              f"{joint['joint_accuracy'][0]:.3f} ± {joint['joint_accuracy'][1]:.3f}; best HAWQ bit plan of that size: "
              f"{joint['quantization_accuracy'][0]:.3f} ± {joint['quantization_accuracy'][1]:.3f}. Predicted loss "
              f"change of the joint plan {joint['joint_predicted_loss_change'][0]:.4f}, measured "
              f"{joint['joint_measured_loss_change'][0]:.4f} (means over seeds)."]
    print("\n".join(lines))

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    titles = ("one-shot", f"after {args.finetune_steps} fine-tuning steps")
    for ax, stage, title in zip(axes, ("oneshot", "finetuned"), titles):
        styles = (("mfac", "C0", "M-FAC OBS", 0.008), ("magnitude", "C1", "magnitude", -0.008))
        for method, colour, label, shift in styles:
            mean = [table[f"{method}@{s}"][stage][0] for s in sparsities]
            spread = [table[f"{method}@{s}"][stage][1] for s in sparsities]
            ax.errorbar(sparsities, mean, yerr=spread, marker="o", capsize=3, color=colour, label=label)
            nm = table[f"{method}@2:4"][stage]
            ax.errorbar([0.5 + shift], [nm[0]], yerr=[nm[1]], marker="s", mfc="none", capsize=3, color=colour,
                        ls="none", label=f"{label} 2:4 (at 50%)")
        ax.axhline(dense[0], color="grey", ls="--", lw=1, label="dense")
        ax.set_xlabel("sparsity")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"held-out accuracy (mean ± sd, {len(runs)} seeds)")
    axes[1].legend(loc="lower left", fontsize=8)
    fig.suptitle("Pruning the digits CNN: M-FAC OBS vs magnitude")
    fig.tight_layout()
    fig.savefig(out / "pruning_digits.png", dpi=120)
    plt.close(fig)
    summary = {"args": vars(args), "runs": runs, "table": table, "margins": margins, "joint": joint,
               "markdown": "\n".join(lines)}
    (out / "pruning_digits.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()
