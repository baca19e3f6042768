"""The ``curvature`` command: ``curvature report`` writes a full curvature report of a model.

Usage::

    curvature report                                  # the built-in default (a small trained CNN)
    curvature report --model my_project.setup:build   # your model: build() -> dict or tuple
    curvature report --model path/to/file.py:build --out reports/run1 --probes 200 --device cuda

``--model`` names a function returning ``{"model", "loss_fn", "data"[, "name"]}`` or a tuple
``(model, loss_fn, data)``; ``data`` is one ``(inputs, targets)`` batch or an iterable of them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from typing import Any, Sequence

import torch

from .report import curvature_report

__all__ = ["main", "load_target"]


def load_target(spec: str, **kwargs: Any) -> dict[str, Any]:
    """Call the builder named by ``module:function`` or ``file.py:function`` and normalise its result.

    Example:
        >>> t = load_target("curvature.app.builtin:trained_cnn", steps=1, num_eval=8)
        >>> sorted(t)
        ['accuracy', 'data', 'loss_fn', 'model', 'name']
    """
    if ":" not in spec:
        raise ValueError(f"--model must look like 'module:function' or 'file.py:function', got {spec!r}")
    where, func_name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        if not os.path.exists(where):
            raise ValueError(f"--model: no such file {where!r}")
        module_spec = importlib.util.spec_from_file_location("_curvature_target", where)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise ImportError(f"--model: cannot import {where!r}: {exc}") from exc
    builder = getattr(module, func_name, None)
    if not callable(builder):
        raise ValueError(f"--model: {where!r} has no function {func_name!r}")
    result = builder(**kwargs)
    if isinstance(result, (tuple, list)):
        if len(result) != 3:
            raise ValueError("--model: the builder must return (model, loss_fn, data) or a dict with those keys")
        result = {"model": result[0], "loss_fn": result[1], "data": result[2]}
    missing = {"model", "loss_fn", "data"} - set(result)
    if missing:
        raise ValueError(f"--model: the builder's result lacks {sorted(missing)}")
    result.setdefault("name", spec)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curvature", description="Second-order curvature of PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser(
        "report",
        help="write a curvature report (traces, per-layer traces, top eigenvalues, spectral density)",
        description="Write a curvature report: Hessian and GGN traces with error bars, per-layer traces, top "
        "eigenvalues with residuals, and the eigenvalue density figure. Without --model it analyses a "
        "built-in small CNN trained for a few seconds on synthetic images.",
    )
    report.add_argument("--model", default=None, help="module:function or file.py:function building the target")
    report.add_argument("--out", default="curvature-report", help="output directory (default: %(default)s)")
    report.add_argument("--probes", type=int, default=100, help="Hutchinson probes for the traces")
    report.add_argument("--top-k", type=int, default=5, help="number of top eigenvalues")
    report.add_argument("--slq-probes", type=int, default=4, help="SLQ probes for the density")
    report.add_argument("--slq-steps", type=int, default=80, help="Lanczos steps per SLQ probe")
    report.add_argument("--seed", type=int, default=0, help="seed of all probes")
    report.add_argument("--device", default=None, help="move the model there (default: where it is)")
    report.add_argument("--no-progress", action="store_true", help="hide progress bars")
    report.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``curvature`` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.model is None:
        print("Training the built-in CNN on synthetic images (a few seconds)...", file=sys.stderr)
        target = load_target("curvature.app.builtin:trained_cnn", device=args.device or "cpu")
    else:
        target = load_target(args.model)
    model = target["model"]
    if args.device is not None:
        model = model.to(args.device)
    print(f"Analysing {target['name']}...", file=sys.stderr)
    report = curvature_report(
        model,
        target["loss_fn"],
        target["data"],
        name=target["name"],
        num_matvecs=args.probes,
        top_k=args.top_k,
        slq_probes=args.slq_probes,
        slq_steps=args.slq_steps,
        generator=torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed),
        progress=not args.no_progress,
    )
    paths = report.save(args.out)
    print(report.to_markdown())
    print(f"Wrote {', '.join(paths.values())}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise ValueError(main())
