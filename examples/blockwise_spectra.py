"""Blockwise Hessian spectra of a small trained transformer and a small trained CNN.

Zhang et al. 2024 ("Why Transformers Need Adam: A Hessian Perspective") find that the diagonal
blocks of a transformer's Hessian (embeddings, query, key, value, attention output, MLP,
LayerNorm) have very different spectra, while a CNN's blocks look alike, and measure this
heterogeneity by the Jensen-Shannon distance between the blocks' spectral densities. This script
checks the claim on the two built-in problems of the ``curvature`` command, both trained in
seconds on one CPU core:

* ``charlm``: a 2-layer character-level transformer (117k parameters) trained on CPython's
  reference documentation (``pydoc_data.topics``);
* ``digits``: a 2-conv + 2-linear CNN (3.7k parameters) trained on scikit-learn's 8x8 digits.

It writes ``docs/figures/blockwise_spectra_charlm.png`` and ``..._digits.png`` (per-block
densities and the JS-distance matrix) and prints each model's heterogeneity (mean JS distance
over pairs of parameter blocks).

Run:  python examples/blockwise_spectra.py [--quick] [--seed 0] [--out docs/figures]
"""

from __future__ import annotations

import argparse
import os
import time

import matplotlib
import torch

import spectra
from curvature import Hessian
from curvature.app.builtin import digits_cnn
from curvature.app.builtin_lm import char_transformer

matplotlib.use("Agg")


#: Kernel widths at which both models are compared (one absolute width, the same for both models;
#: 0.00316 is Zhang et al.'s).
COMMON_SIGMAS = (0.00316, 0.01, 0.03)


def analyse(problem, *, num_steps: int, num_probes: int, seed: int, title: str, path: str):
    H = Hessian(problem.model, problem.loss_fn, problem.data)
    t0 = time.perf_counter()
    res = spectra.block_spectra(H, groups="parameter", k=3, num_probes=num_probes, num_steps=num_steps,
                                generator=torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - t0
    torch.save({"result": res, "title": title, "d": H.shape[0], "seconds": seconds}, path[:-4] + ".pt")
    return report(res, title=title, d=H.shape[0], seconds=seconds, path=path)


def report(res, *, title: str, d: int, seconds: float, path: str):
    by_kind = {}
    for b in res.blocks:
        by_kind.setdefault(b.kind, []).append(b)
    print(f"\n{title}: {len(res.blocks)} parameter blocks, d = {d:,}, {seconds:.0f} s")
    print(f"  heterogeneity (mean JS distance over pairs of blocks): {res.heterogeneity:.4f} at the default "
          f"kernel σ = {res.sigma:.3g}; " + ", ".join(f"{res.with_sigma(s).heterogeneity:.3f} at σ = {s:g}"
                                                   for s in COMMON_SIGMAS))
    for kind, blocks in by_kind.items():
        tops = ", ".join(f"{float(b.eigenvalues[0]):.3g}" for b in blocks)
        print(f"  {kind:>17}: top eigenvalue per block {tops}")
    fig = res.plot(title=f"{title}: blockwise Hessian spectra (heterogeneity {res.heterogeneity:.3f})")
    fig.savefig(path, dpi=110)
    print(f"  figure: {path}")
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short training, fewer Lanczos steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), os.pardir, "docs", "figures"))
    parser.add_argument("--replot", action="store_true", help="redraw from the saved results (.pt) in --out")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.replot:
        for name in ("charlm", "digits"):
            path = os.path.join(args.out, f"blockwise_spectra_{name}.png")
            saved = torch.load(path[:-4] + ".pt", weights_only=False)
            report(saved["result"], title=saved["title"], d=saved["d"], seconds=saved["seconds"], path=path)
        return
    steps = 12 if args.quick else 24
    lm = char_transformer(seed=args.seed, steps=60 if args.quick else 300)
    cnn = digits_cnn(seed=args.seed, steps=60 if args.quick else 400)
    a = analyse(lm, num_steps=steps, num_probes=1, seed=args.seed, title="character transformer",
                path=os.path.join(args.out, "blockwise_spectra_charlm.png"))
    b = analyse(cnn, num_steps=steps, num_probes=1, seed=args.seed, title="digits CNN",
                path=os.path.join(args.out, "blockwise_spectra_digits.png"))
    for s in COMMON_SIGMAS:
        print(f"heterogeneity at σ = {s:g}: transformer {a.with_sigma(s).heterogeneity:.4f}, "
              f"CNN {b.with_sigma(s).heterogeneity:.4f}")


if __name__ == "__main__":
    main()
