"""``curvature prune`` (curvature/app/prune_command.py) on the built-in digits CNN, tiny settings."""

from __future__ import annotations

import json

import pytest
import torch

import quant
from curvature.app import cli, prune_command


def _parse(argv):
    return cli._parser().parse_args(["prune", *argv])


@pytest.fixture(scope="module")
def split():
    return prune_command.digits_split(seed=0, steps=100)


def test_split_is_the_builtin_problems_split(split):
    x, y = split.train
    assert len(y) == 1437 and len(split.test[1]) == 360
    assert prune_command.accuracy(split.model, split.test) > 0.5


def test_prune_command_prints_each_step_and_saves_the_mask(tmp_path, capsys):
    path = tmp_path / "mask.pt"
    args = _parse(["--quick", "--sparsities", "0.5", "0.8", "--num-gradients", "8", "--recomputations", "2",
                   "--finetune-steps", "3", "--no-progress", "--save-mask", str(path), "--json"])
    assert prune_command.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [round(s["sparsity"], 2) for s in out["steps"]] == [0.5, 0.8]
    assert all(0 <= s["accuracy_finetuned"] <= 1 for s in out["steps"])
    mask = quant.PruneMask.load(path)
    assert mask.sparsity == pytest.approx(0.8, abs=1e-3)


def test_prune_command_pattern_and_text_output(capsys):
    args = _parse(["--quick", "--pattern", "2:4", "--method", "magnitude", "--finetune-steps", "2", "--no-progress"])
    assert prune_command.run(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("dense: held-out accuracy")
    assert lines[1].startswith("step 1: sparsity 0.500")


def test_prune_command_rejects_a_decreasing_schedule(capsys):
    assert prune_command.run(_parse(["--sparsities", "0.8", "0.5", "--no-progress"])) == 2
    assert "must increase" in capsys.readouterr().err


def test_finetuning_keeps_the_mask(split):
    model = split.model
    mask = quant.prune(model, sparsity=0.6, method="magnitude").mask
    prune_command.finetune(model, split.train, mask, steps=3, generator=torch.Generator().manual_seed(0))
    mask.check(model)
