"""Problems of the shared case registry (tests/cases.py) as builders for ``curvature --problem``."""

from __future__ import annotations

from curvature.app import Problem
from tests import cases

#: (model case, loss case, layout) served by :func:`build` under ``--problem FILE:NAME``.
CASES = {
    "mlp_weighted_uneven": ("mlp", "ce_weighted", "uneven"),
    "mlp_padded_fully": ("mlp", "ce_ignore_index", "fully_padded"),
    "tied_lm_padded": ("tied_lm", "token_ce", "uneven"),
    "called_twice_sum": ("called_twice", "ce_sum", "shuffled"),
    "frozen_mse": ("frozen", "mse", "uneven"),
}


def problem(name: str) -> Problem:
    p = cases.problem(*CASES[name])
    model = p.model.eval()
    classes = None if cases.LOSSES[p.loss_case].targets == "regression" else 3 if p.model_case != "tied_lm" else 7
    metric = "accuracy" if classes and p.model_case != "tied_lm" else None
    return Problem(model, p.loss_fn, p.data, name=name, metric=metric, num_classes=classes)


def _builder(name):
    def build() -> Problem:
        return problem(name)

    return build


for _name in CASES:
    globals()[_name] = _builder(_name)
