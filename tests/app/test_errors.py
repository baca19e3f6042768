"""Every mistake a user can make gets a one-line message and its own exit code (``--debug``: traceback)."""

from __future__ import annotations

import pytest
import torch

from curvature.app import load_problem
from curvature.app.cli import EXIT_CODES, main
from curvature.app.problem import BadProblemError, ProblemNotFoundError

from .conftest import ROOT, run_command

PROBLEMS = ROOT / "tests" / "app" / "cli_problems.py"


def _run(capsys, *args: str) -> tuple[int, str]:
    code = main(["trace", "--quick", "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    return code, err


def _one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("curvature trace: error: ") and "Traceback" not in err
    return lines[0]


CASES = [
    ("no colon", ["--problem", "nocolon"], "problem not found", "MODULE:FUNCTION"),
    ("missing file", ["--problem", "missing.py:f"], "problem not found", "no such file"),
    ("missing function", ["--problem", f"{PROBLEMS}:nope"], "problem not found", "has no function 'nope'"),
    ("builder returns None", ["--problem", f"{PROBLEMS}:returns_none"], "not a problem", "returned None"),
    ("builder returns the model", ["--problem", f"{PROBLEMS}:returns_model"], "not a problem",
     "returned a Sequential (the model alone)"),
    ("swapped tuple", ["--problem", f"{PROBLEMS}:swapped"], "not a problem", "the model came as loss_fn"),
    ("NaN loss", ["--problem", f"{PROBLEMS}:nan_loss"], "non-finite", "the loss is nan"),
    ("train mode", ["--problem", f"{PROBLEMS}:train_mode"], "train mode",
     "module '1' (Dropout)"),
    ("empty data", ["--problem", f"{PROBLEMS}:empty_data"], "empty data", "data is empty"),
    ("frozen parameters", ["--problem", f"{PROBLEMS}:frozen"], "frozen parameters", "requires grad"),
    ("bare tensor", ["--problem", f"{PROBLEMS}:bare_tensor"], "bad data", "bare tensor of shape (8, 3)"),
    ("input-shape mismatch", ["--problem", f"{PROBLEMS}:shape_mismatch"], "model call", "inputs (8, 5)"),
    ("output/target shape mismatch", ["--problem", f"{PROBLEMS}:output_target_mismatch"], "bad data",
     "outputs (8, 3) and targets (8, 1)"),
    ("tuple form", ["--problem", f"{PROBLEMS}:build_tuple"], "not a problem", "expected curvature.app.Problem"),
    ("dict form", ["--problem", f"{PROBLEMS}:build_dict"], "not a problem", "returned a dict"),
]


@pytest.mark.parametrize("args, kind, text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_problem_errors(args, kind, text, capsys, tmp_path):
    code, err = _run(capsys, *args, "--out", str(tmp_path / "o"))
    assert code == EXIT_CODES[kind]
    assert text in _one_line(err)


def test_exit_codes_are_distinct():
    assert len(set(EXIT_CODES.values())) == len(EXIT_CODES)


def test_train_mode_flag_allows_it(capsys, tmp_path):
    with pytest.warns(UserWarning, match="allow_train_mode"):
        code, _ = _run(capsys, "--problem", f"{PROBLEMS}:train_mode", "--allow-train-mode", "--out", str(tmp_path))
    assert code == 0


def test_out_is_an_existing_file(capsys, tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    code, err = _run(capsys, "--problem", f"{PROBLEMS}:build_tiny", "--out", str(target))
    assert code == EXIT_CODES["output"] and "exists and is not a folder" in _one_line(err)


def test_out_not_writable_is_refused_before_any_work(capsys, monkeypatch):
    import curvature.app.cli as cli

    monkeypatch.setattr(cli, "load_problem", lambda *a, **k: pytest.fail("built the problem before checking --out"))
    code, err = _run(capsys, "--out", "/proc/curvature-report")
    assert code == EXIT_CODES["output"] and "cannot write there" in _one_line(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the message on a machine without CUDA")
def test_cuda_without_cuda_is_refused_before_any_work(capsys, monkeypatch, tmp_path):
    import curvature.app.cli as cli

    monkeypatch.setattr(cli, "load_problem", lambda *a, **k: pytest.fail("built the problem before checking --device"))
    code, err = _run(capsys, "--device", "cuda", "--out", str(tmp_path))
    assert code == EXIT_CODES["device"] and "CUDA is not available" in _one_line(err)


def test_debug_shows_the_traceback(capsys, tmp_path):
    code, err = _run(capsys, "--problem", f"{PROBLEMS}:bare_tensor", "--debug", "--out", str(tmp_path))
    assert code == EXIT_CODES["bad data"]
    assert "Traceback (most recent call last)" in err and err.splitlines()[-1].startswith("curvature trace: error:")


def test_usage_error_and_exit_code_of_the_process(tmp_path):
    proc = run_command("trace", "--no-progress", "--problem", "returns:nothing_here", "--out", str(tmp_path / "o"))
    assert proc.returncode == EXIT_CODES["problem not found"]
    assert proc.stderr.strip().count("\n") == 0 and "cannot import 'returns'" in proc.stderr
    proc = run_command("nosuchcommand")
    assert proc.returncode == EXIT_CODES["usage"]


def test_load_problem_raises_exceptions_not_system_exit():
    with pytest.raises(ProblemNotFoundError):
        load_problem("nocolon")
    with pytest.raises(BadProblemError, match=r"expected curvature.app.Problem\(model, loss_fn, data"):
        load_problem(f"{PROBLEMS}:returns_none")


def test_syntax_error_in_the_problem_file_is_problem_not_found(tmp_path, capsys):
    bad = tmp_path / "broken.py"
    bad.write_text("def build(:\n    pass\n")
    code, err = _run(capsys, "--problem", f"{bad}:build", "--out", str(tmp_path / "o"))
    assert code == EXIT_CODES["problem not found"]
    assert "SyntaxError" in _one_line(err) and "line 1" in err


@pytest.mark.parametrize("option", ["--probes", "--top-k", "--slq-probes", "--slq-steps", "--budget-mb"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_bad_budgets_are_usage_errors_before_any_work(option, value, capsys, tmp_path, monkeypatch):
    import curvature.app.cli as cli

    monkeypatch.setattr(cli, "load_problem", lambda *a, **k: pytest.fail("the problem was built"))
    with pytest.raises(SystemExit) as info:
        main(["report", "--quick", "--no-progress", option, value, "--out", str(tmp_path / "o")])
    assert info.value.code == EXIT_CODES["usage"]
    err = capsys.readouterr().err
    assert option in err and "num_matvecs" not in err
    assert not (tmp_path / "o").exists()
