"""The command over the shared case registry: its traces and eigenvalues against dense float64 truths
(the one-big-batch Hessian of padded, class-weighted, tied, called-twice, frozen and sum cases)."""

from __future__ import annotations

import json

import pytest
import torch

from curvature.app.cli import main
from tests import cases
from tests.curvature import reference as ref

from .conftest import ROOT
from .registry_problems import CASES, problem

PROBLEMS = ROOT / "tests" / "app" / "registry_problems.py"


def _dense(name: str) -> torch.Tensor:
    p = problem(name)
    names = [n for n, q in p.model.named_parameters() if q.requires_grad]
    data = [b for b in cases.problem(*CASES[name]).batches]
    return ref.dense_hessian(p.model, p.loss_fn, data, names)


@pytest.mark.parametrize("name", sorted(CASES))
def test_trace_and_top_eigenvalue_of_the_command_are_the_dense_ones(name, tmp_path, capsys):
    H = _dense(name)
    code = main(["eigs", "--problem", f"{PROBLEMS}:{name}", "--out", str(tmp_path / "eigs"), "--json",
                 "--no-progress", "--top-k", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    summary = json.loads(out)
    top = [e["value"] for e in summary["eigenvalues"]["top"]]
    dense = torch.linalg.eigvalsh(H).flip(0)[:2].tolist()
    assert top == pytest.approx(dense, rel=1e-6, abs=1e-9)

    code = main(["trace", "--problem", f"{PROBLEMS}:{name}", "--out", str(tmp_path / "trace"), "--json",
                 "--no-progress"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    hessian = summary["traces"]["hessian"]
    assert hessian["stderr"] == 0  # d <= the product budget: the exact trace
    assert hessian["value"] == pytest.approx(float(torch.trace(H)), rel=1e-9, abs=1e-12)
