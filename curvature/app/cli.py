"""The ``curvature`` command (also ``python -m curvature``).

Usage::

    curvature report                                   # built-in default: a CNN trained on sklearn digits
    curvature report --problem my_project.setup:build  # your problem, imported from the current folder
    curvature report --problem path/to/file.py:build --out reports/run1 --device cuda
    curvature spectrum | trace | eigs | quantize  [same options]

Errors are one line on stderr with an exit code per kind (``--debug`` shows the traceback):
2 usage, 3 problem not found, 4 builder returned no problem, 5 unusable ``--out``, 6 device
unavailable, 7 non-finite loss or product, 8 model in train mode, 9 empty data, 10 frozen
parameters, 11 data of the wrong form, 12 model or loss fails on the data, 13 part not available,
130 interrupted (finished parts are kept), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence

import torch

import curvature

from .output import prepare_output, summary_dict, to_markdown, write_report
from .problem import ProblemError, load_problem, load_target
from .report import CurvatureReport, ReportSettings, compute_sections

__all__ = ["EXIT_CODES", "DeviceError", "UnavailableError", "load_target", "main"]

#: Exit code of each kind of failure.
EXIT_CODES = {
    "usage": 2, "problem not found": 3, "not a problem": 4, "output": 5, "device": 6, "non-finite": 7,
    "train mode": 8, "empty data": 9, "frozen parameters": 10, "bad data": 11, "model call": 12,
    "unavailable": 13, "interrupted": 130, "internal": 1,
}


class DeviceError(ValueError):
    """The requested device does not exist on this machine (exit code 6)."""

    exit_code = 6


class UnavailableError(RuntimeError):
    """A part of the analysis cannot run for this problem or installation (exit code 13)."""

    exit_code = 13


#: Sections each subcommand computes.
SUBCOMMANDS = {
    "report": ("summary", "traces", "eigenvalues", "spectrum", "analyses", "quantization"),
    "spectrum": ("summary", "eigenvalues", "spectrum"),
    "trace": ("summary", "traces"),
    "eigs": ("summary", "eigenvalues"),
    "quantize": ("summary", "quantization"),
}

_HELP = {
    "report": "the full report: spectrum, eigenvalues, traces, per-layer traces, analyses and a bit plan",
    "spectrum": "the eigenvalue density (SLQ) with the top eigenvalues marked",
    "trace": "traces of the Hessian and the GGN, and per-layer Hessian traces, with error bars",
    "eigs": "top-k and smallest Hessian eigenvalues with true residuals",
    "quantize": "a HAWQ-V2 mixed-precision bit plan (bitplan.json) and its Pareto figure",
}

_PROBLEM_HELP = """\
--problem names a builder: MODULE:FUNCTION (imported from the current folder), FILE.py:FUNCTION
(its folder is importable, so it may import its neighbours), or a built-in: digits (default; a
small CNN trained on scikit-learn's digits) or synthetic. The builder may take seed=, device= and
quick= and returns

    curvature.app.Problem(model, loss_fn, data, name="...", metric="accuracy", num_classes=10)

(or the older (model, loss_fn, data) tuple or {"model", "loss_fn", "data"} dict), with data one
(inputs, targets) batch or a list/DataLoader of batches and the model in eval mode.

Exit codes: 2 usage, 3 problem not found, 4 builder returned no problem, 5 unusable --out,
6 device unavailable, 7 non-finite loss, 8 train mode, 9 empty data, 10 frozen parameters,
11 data of the wrong form, 12 model/loss fails on the data, 13 part unavailable, 130 interrupted.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curvature", description="Second-order curvature of PyTorch models.",
                                     epilog=_PROBLEM_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {curvature.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name in SUBCOMMANDS:
        p = sub.add_parser(name, help=_HELP[name], description=f"curvature {name}: {_HELP[name]}.",
                           epilog=_PROBLEM_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--problem", "--model", dest="problem", default="digits",
                       help="MODULE:FUNCTION, FILE.py:FUNCTION or a built-in name (default: %(default)s)")
        p.add_argument("--out", default="curvature-report", help="output folder (default: %(default)s)")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: where the model is)")
        p.add_argument("--seed", type=int, default=0, help="seed of the built-in training and all probes")
        p.add_argument("--budget-mb", type=float, default=1024.0,
                       help="memory for cached autodiff graphs across batches (default: %(default)g MB)")
        p.add_argument("--quick", action="store_true", help="small budgets: a rough look in seconds")
        p.add_argument("--json", action="store_true", help="print summary.json on stdout instead of the Markdown")
        p.add_argument("--probes", type=int, default=None, help="products per trace estimate (num_matvecs)")
        p.add_argument("--top-k", type=int, default=None, help="number of top eigenvalues")
        p.add_argument("--slq-probes", type=int, default=None, help="SLQ probes of the density")
        p.add_argument("--slq-steps", type=int, default=None, help="Lanczos steps per SLQ probe")
        p.add_argument("--allow-train-mode", action="store_true",
                       help="analyse a model left in train mode (Dropout/BatchNorm make it random)")
        p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
        p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
        p.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    return parser


def _check_device(name: str | None) -> torch.device | None:
    if name is None:
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise DeviceError(f"--device {name}: not a device name ({exc})") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {name}: MPS is not available on this machine")
    return device


def _settings(args: argparse.Namespace) -> ReportSettings:
    changes = {k: v for k, v in (("num_matvecs", args.probes), ("top_k", args.top_k), ("slq_probes", args.slq_probes),
                                 ("slq_steps", args.slq_steps)) if v is not None}
    changes["graph_cache_bytes"] = int(args.budget_mb * 2**20)
    changes["sections"] = SUBCOMMANDS[args.command]
    return ReportSettings.quick(**changes) if args.quick else ReportSettings(**changes)


def _classify(exc: BaseException) -> tuple[int, str]:
    """Exit code and one-line message of an exception."""
    code = getattr(exc, "exit_code", None)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(code, int):
        return code, text
    lowered = text.lower()
    if isinstance(exc, (ValueError, RuntimeError, FloatingPointError)) and ("nan" in lowered or "finite" in lowered):
        return EXIT_CODES["non-finite"], text
    if "train mode" in lowered:
        return EXIT_CODES["train mode"], text + " (or pass --allow-train-mode)"
    if isinstance(exc, ImportError):
        return EXIT_CODES["unavailable"], text
    return EXIT_CODES["internal"], f"{type(exc).__name__}: {text}"


def _run(args: argparse.Namespace) -> int:
    device = _check_device(args.device)
    out = prepare_output(args.out)
    progress = not args.no_progress
    settings = _settings(args)
    options = {"seed": args.seed, "quick": args.quick, "progress": progress}
    if device is not None:
        options["device"] = device
    if progress:
        print(f"[curvature] building the problem {args.problem!r}...", file=sys.stderr, flush=True)
    problem = load_problem(args.problem, **options)
    if device is not None:
        problem.model.to(device)
    param_device = next(problem.model.parameters()).device
    report = CurvatureReport(problem.name, settings)
    generator = torch.Generator(device=param_device).manual_seed(args.seed)
    if progress:
        print(f"[curvature] analysing {problem.name} on {param_device}; writing to {out}/", file=sys.stderr, flush=True)
    try:
        for _name, _seconds in compute_sections(problem, settings=settings, generator=generator, progress=progress,
                                                allow_train_mode=args.allow_train_mode, report=report):
            write_report(report, out, command=args.command, figures=False)
    except KeyboardInterrupt:
        paths = write_report(report, out, command=args.command)
        print(f"curvature: interrupted; the finished sections ({', '.join(report.finished) or 'none'}) are in "
              f"{out}/ ({os.path.basename(paths['summary'])}, {os.path.basename(paths['html'])})", file=sys.stderr)
        return EXIT_CODES["interrupted"]
    main_section = {"quantize": "quantization"}.get(args.command)
    if main_section in report.skipped:
        write_report(report, out, command=args.command)
        raise UnavailableError(f"the {main_section} cannot run for this problem: {report.skipped[main_section]}")
    if report.summary is not None and report.summary.ggn_unavailable and args.command == "trace":
        print(f"curvature: note: the GGN trace was skipped: {report.summary.ggn_unavailable}", file=sys.stderr)
    if progress:
        print("[curvature] drawing the figures and writing report.html...", file=sys.stderr, flush=True)
    paths = write_report(report, out, command=args.command)
    if args.json:
        files = {k: os.path.basename(v) for k, v in paths.items()}
        print(json.dumps(summary_dict(report, command=args.command, files=files), indent=2))
    else:
        print(to_markdown(report))
    if progress:
        print(f"[curvature] wrote {out}/: {', '.join(sorted(os.path.basename(p) for p in paths.values()))}",
              file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``curvature`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("curvature: interrupted before any section finished", file=sys.stderr)
        return EXIT_CODES["interrupted"]
    except (ProblemError, Exception) as exc:  # noqa: BLE001 - the command's one place that turns errors into codes
        code, message = _classify(exc)
        if args.debug:
            traceback.print_exc()
        print(f"curvature {args.command}: error: {message}" + ("" if args.debug else "  (--debug for the traceback)"),
              file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
