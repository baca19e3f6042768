"""Finding and building the problem a ``--problem`` spec names: a built-in, ``module:function`` or ``file.py:function``.

Kept apart from :mod:`curvature.app.problem` (what a problem is and how it is checked) so that the
built-in problems, which build :class:`~curvature.app.problem.Problem` objects, and this loader,
which looks them up, import :mod:`~curvature.app.problem` without importing each other.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Mapping
from typing import Any, Callable

from .builtin import BUILTIN_PROBLEMS
from .problem import Problem, ProblemNotFoundError, problem_from

__all__ = ["BUILDER_OPTIONS", "load_problem"]

#: The keyword options the command offers a builder (each only if the builder declares it).
#: ``--quick`` is deliberately not among them: quick budgets analyse the same trained model.
BUILDER_OPTIONS = ("seed", "device", "progress")


def _import_module(where: str, spec: str) -> Any:
    if where.endswith(".py"):
        path = os.path.abspath(where)
        if not os.path.isfile(path):
            raise ProblemNotFoundError(f"--problem {spec}: no such file {where!r}")
        folder = os.path.dirname(path)
        if folder not in sys.path:  # the file may import the modules next to it
            sys.path.insert(0, folder)
        name = os.path.splitext(os.path.basename(path))[0]
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - a syntax error or a failing import in the user's file
            del sys.modules[name]
            raise ProblemNotFoundError(f"--problem {spec}: {where} failed to import: {_one_line(exc)}") from exc
        return module
    if "" not in sys.path and os.getcwd() not in sys.path:  # `python -c`/`-m` semantics: the cwd first
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        raise ProblemNotFoundError(f"--problem {spec}: cannot import {where!r} ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - the module exists but fails to import
        raise ProblemNotFoundError(f"--problem {spec}: {where} failed to import: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} ({os.path.basename(exc.filename or '?')}, line {exc.lineno})"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _call_builder(builder: Callable[..., Any], options: Mapping[str, Any]) -> Any:
    """Call ``builder`` with the options it declares (of :data:`BUILDER_OPTIONS`)."""
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return builder()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return builder(**options)
    return builder(**{k: v for k, v in options.items() if k in params})


def load_problem(spec: str, **options: Any) -> Problem:
    r"""Build the :class:`~curvature.app.problem.Problem` named by ``spec`` and validate its form.

    Args:
        spec: ``module:function``, ``path/to/file.py:function`` or a built-in name (a key of
            :data:`curvature.app.builtin.BUILTIN_PROBLEMS`, e.g. ``"digits"``, ``"synthetic"``).
        **options: passed to the builder when it declares them (``seed``, ``device``, ``progress``).

    Raises:
        ProblemNotFoundError: nothing importable under that name, or the file fails to import.
        BadProblemError: the builder returned something else than a ``Problem``.

    Examples:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "mine.py").write_text(
        ...     "import torch\nfrom torch import nn\nfrom curvature.app import Problem\n"
        ...     "def build(seed=0):\n"
        ...     "    return Problem(nn.Linear(2, 1).eval(), nn.MSELoss(), (torch.zeros(4, 2), torch.zeros(4, 1)))\n")
        >>> load_problem(f"{folder / 'mine.py'}:build", seed=1).name.endswith("mine.py:build")
        True
    """
    unknown = sorted(set(options) - set(BUILDER_OPTIONS))
    if unknown:
        raise TypeError(f"load_problem got unknown options {unknown}; builders take {list(BUILDER_OPTIONS)}")
    if ":" not in spec:
        if spec in BUILTIN_PROBLEMS:
            return problem_from(_call_builder(BUILTIN_PROBLEMS[spec], options), source=spec)
        raise ProblemNotFoundError(
            f"--problem must be MODULE:FUNCTION, FILE.py:FUNCTION or one of {sorted(BUILTIN_PROBLEMS)}, got {spec!r}"
        )
    where, func_name = spec.rsplit(":", 1)
    module = _import_module(where, spec)
    builder = getattr(module, func_name, None)
    if not callable(builder):
        raise ProblemNotFoundError(f"--problem {spec}: {where!r} has no function {func_name!r}")
    problem = problem_from(_call_builder(builder, options), source=spec)
    if problem.name == "model":
        problem.name = spec
    return problem
