"""The ``curvature`` command (also ``python -m curvature``).

Usage::

    curvature report                                   # built-in default: a CNN trained on sklearn digits
    curvature report --problem my_project.setup:build  # your problem, imported from the current folder
    curvature report --problem path/to/file.py:build --out reports/run1 --device cuda
    curvature spectrum | trace | eigs | quantize  [same options]

Options are checked before any work. The results are written to a fresh folder beside ``--out``
and moved into place only when the run finishes, so ``--out`` never mixes two runs; an ``--out``
that holds another run's files is refused unless ``--force``.

Errors are one line on stderr with an exit code per kind (``--debug`` shows the traceback): see
:data:`EXIT_CODES`. Subcommands are the entries of :data:`SUBCOMMANDS`; add one there.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch

import curvature

from . import prune_command
from .errors import DeviceError, UnavailableError
from .loader import load_problem
from .output import StagedOutput, summary_dict, to_markdown, write_report
from .problem import ProblemError
from .provenance import Provenance, command_line
from .report import CurvatureReport, ReportSettings, compute_sections

__all__ = ["EXIT_CODES", "SUBCOMMANDS", "DeviceError", "Subcommand", "UnavailableError", "main"]

#: Exit code of each kind of failure.
EXIT_CODES = {
    "usage": 2, "problem not found": 3, "not a problem": 4, "output": 5, "device": 6, "non-finite": 7,
    "train mode": 8, "empty data": 9, "frozen parameters": 10, "bad data": 11, "model call": 12,
    "unavailable": 13, "interrupted": 130, "internal": 1,
}


@dataclass(frozen=True)
class Subcommand:
    """One subcommand of ``curvature``.

    Attributes:
        help: one line for ``curvature --help``.
        sections: the report sections it computes (for report-style subcommands).
        required_section: a section whose absence makes the subcommand fail (exit code 13).
        add_arguments: adds the subcommand's own options to its parser (after the common ones).
        run: ``run(args) -> exit code`` for a subcommand that is not a report (then ``sections``
            is unused); it may raise any of the errors that carry an ``exit_code``.
    """

    help: str
    sections: tuple[str, ...] = ()
    required_section: str | None = None
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    run: Callable[[argparse.Namespace], int] | None = None


#: The subcommands, in ``--help`` order. To add one: ``SUBCOMMANDS["name"] = Subcommand(...)``.
SUBCOMMANDS: dict[str, Subcommand] = {
    "report": Subcommand("the full report: spectrum, eigenvalues, traces, per-layer traces, analyses and a bit plan",
                         ("summary", "traces", "eigenvalues", "spectrum", "analyses", "quantization")),
    "spectrum": Subcommand("the eigenvalue density (SLQ) with the top eigenvalues marked",
                           ("summary", "eigenvalues", "spectrum")),
    "trace": Subcommand("traces of the Hessian and the GGN, and per-layer Hessian traces, with error bars",
                        ("summary", "traces")),
    "eigs": Subcommand("top-k and smallest Hessian eigenvalues with true residuals", ("summary", "eigenvalues")),
    "quantize": Subcommand("a HAWQ-V2 mixed-precision bit plan (bitplan.json) and its Pareto figure",
                           ("summary", "quantization"), required_section="quantization"),
    "prune": Subcommand("gradual M-FAC (or magnitude) pruning of the built-in digits CNN, with fine-tuning",
                        add_arguments=prune_command.add_arguments, run=prune_command.run),
}

_PROBLEM_HELP = """\
--problem names a builder: MODULE:FUNCTION (imported from the current folder), FILE.py:FUNCTION
(its folder is importable, so it may import its neighbours), or a built-in: digits (default; a
small CNN trained on scikit-learn's digits) or synthetic. The builder may take seed=, device= and
progress= and returns

    curvature.app.Problem(model, loss_fn, data, name="...", metric="accuracy", num_classes=10)

with data one (inputs, targets) batch or a list/DataLoader of batches and the model in eval mode.
--quick keeps the problem (the same trained model) and uses smaller budgets.

Exit codes: 2 usage, 3 problem not found or fails to import, 4 builder returned no Problem,
5 unusable --out, 6 device unavailable, 7 non-finite loss, 8 train mode, 9 empty data,
10 frozen parameters, 11 data of the wrong form, 12 model/loss fails on the data,
13 part unavailable, 130 interrupted, 1 anything else (a bug: please report it).
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--problem", default="digits",
                   help="MODULE:FUNCTION, FILE.py:FUNCTION or a built-in name (default: %(default)s)")
    p.add_argument("--out", default="curvature-report", help="output folder (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace the results of an earlier run in --out")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: where the model is)")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in training and all probes")
    p.add_argument("--budget-mb", type=_positive_float, default=1024.0,
                   help="memory for cached autodiff graphs across batches (default: %(default)g MB)")
    p.add_argument("--quick", action="store_true",
                   help="smaller budgets (fewer probes and Lanczos steps) on the same problem: a rough look")
    p.add_argument("--json", action="store_true", help="print summary.json on stdout instead of the Markdown")
    p.add_argument("--probes", type=_positive_int, default=None, help="products per trace estimate")
    p.add_argument("--top-k", type=_positive_int, default=None, help="number of top eigenvalues")
    p.add_argument("--slq-probes", type=_positive_int, default=None, help="SLQ probes of the density")
    p.add_argument("--slq-steps", type=_positive_int, default=None, help="Lanczos steps per SLQ probe")
    p.add_argument("--allow-train-mode", action="store_true",
                   help="analyse a model left in train mode (Dropout/BatchNorm make it random)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curvature", description="Second-order curvature of PyTorch models.",
                                     epilog=_PROBLEM_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {curvature.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, spec in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=spec.help, description=f"curvature {name}: {spec.help}.",
                           epilog=_PROBLEM_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_common_arguments(p)
        if spec.add_arguments is not None:
            spec.add_arguments(p)
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


def settings_from(args: argparse.Namespace) -> ReportSettings:
    """The budgets the options ask for (``--quick``: :meth:`ReportSettings.quick`)."""
    changes = {k: v for k, v in (("num_matvecs", args.probes), ("top_k", args.top_k), ("slq_probes", args.slq_probes),
                                 ("slq_steps", args.slq_steps)) if v is not None}
    changes["graph_cache_bytes"] = int(args.budget_mb * 2**20)
    changes["sections"] = SUBCOMMANDS[args.command].sections
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


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"[curvature] {text}", file=sys.stderr, flush=True)


def _run_report(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    spec = SUBCOMMANDS[args.command]
    settings = settings_from(args)  # before any work: budgets are checked here
    device = _check_device(args.device)
    progress = not args.no_progress
    with StagedOutput(args.out, force=args.force) as staged:
        options = {"seed": args.seed, "progress": progress}
        if device is not None:
            options["device"] = device
        _say(progress, f"building the problem {args.problem!r}...")
        problem = load_problem(args.problem, **options)
        if device is not None:
            problem.model.to(device)
        param_device = next(problem.model.parameters()).device
        provenance = Provenance.create(command_line=command_line(argv), problem=args.problem, seed=args.seed,
                                       quick=args.quick, settings=settings.budgets(), device=str(param_device))
        report = CurvatureReport(problem.name, settings, provenance=provenance)
        generator = torch.Generator(device=param_device).manual_seed(args.seed)
        _say(progress, f"analysing {problem.name} on {param_device}; writing to {args.out}/")
        try:
            for _name, _seconds in compute_sections(problem, settings=settings, generator=generator,
                                                    progress=progress, allow_train_mode=args.allow_train_mode,
                                                    report=report):
                write_report(report, staged.path, command=args.command, figures=False)
        except KeyboardInterrupt:
            write_report(report, staged.path, command=args.command)
            where = staged.keep_partial()
            print(f"curvature: interrupted; the finished sections ({', '.join(report.finished) or 'none'}) are in "
                  f"{where}/ (summary.json, report.html; marked incomplete)", file=sys.stderr)
            return EXIT_CODES["interrupted"]
        if spec.required_section in report.skipped:
            raise UnavailableError(f"the {spec.required_section} cannot run for this problem: "
                                   f"{report.skipped[spec.required_section]}")
        if report.summary is not None and report.summary.ggn_unavailable and args.command == "trace":
            print(f"curvature: note: the GGN trace was skipped: {report.summary.ggn_unavailable}", file=sys.stderr)
        _say(progress, "drawing the figures and writing report.html...")
        paths = write_report(report, staged.path, command=args.command)
        staged.commit()
    if args.json:
        files = {k: os.path.basename(v) for k, v in paths.items()}
        print(json.dumps(summary_dict(report, command=args.command, files=files), indent=2))
    else:
        print(to_markdown(report))
    _say(progress, f"wrote {args.out}/: {', '.join(sorted(os.path.basename(p) for p in paths.values()))}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``curvature`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    spec = SUBCOMMANDS[args.command]
    try:
        return spec.run(args) if spec.run is not None else _run_report(args, argv)
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
