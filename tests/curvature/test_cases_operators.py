"""Every model operator over the shared case registry (tests/cases.py) against dense float64 truths.

The truth is always the curvature of the loss of ALL batches concatenated into one (what a correctly
weighted aggregation over batches gives): uneven, fully padded and shuffled layouts, tied and
twice-called layers, frozen parameters, class weights and sum losses.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from curvature import GGN, EmpiricalFisher, Fisher, Hessian
from curvature.data import EmptyDataError
from tests import cases
from tests.curvature.reference import dense_ggn, dense_hessian

TOL = 1e-10
LIKELIHOOD = {"ce", "ce_sum", "ce_ignore_index", "mse", "mse_sum"}  # exact Fisher = GGN for these
MODELS = ["mlp", "tied_lm", "called_twice", "frozen", "no_grad_part", "custom_function"]
PROBLEMS = cases.problems(models=MODELS)


def _dim(model):
    return sum(q.numel() for q in model.parameters())


def _names(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _unit_losses(p, x, y):
    """The loss's unit losses (sample, token or row; ignored targets 0) with reduction='none'."""
    out = p.model(x)
    if p.loss_case.startswith("token"):  # a lambda: its unit is a row of the outputs (a sequence)
        logits, labels = out.reshape(-1, out.shape[-1]), y.reshape(-1)
        flat = F.cross_entropy(logits, labels, ignore_index=cases.IGNORE, reduction="none")
        return flat.reshape(y.shape).sum(1)
    loss = copy.copy(p.loss_fn)
    loss.reduction = "none"
    unit = loss(out, y)
    return unit.reshape(unit.shape[0], -1).sum(1)


def dense_empirical_fisher(p):
    """``(1/Z) sum_u g_u g_u^T`` (``Z = 1`` for a sum loss): per-unit gradients by autograd."""
    x, y = cases.concatenated(p.batches)
    params = [q for q in p.model.parameters() if q.requires_grad]
    unit = _unit_losses(p, x, y)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(u, params, retain_graph=True)]) for u in unit]
    G = torch.stack(rows)
    full = cases.full_batch_loss(p.model, p.loss_fn, p.batches)
    Z = 1.0 if cases.LOSSES[p.loss_case].reduction == "sum" else float(unit.sum().detach() / full.detach())
    return G.T @ G / Z


def _truth(kind, p):
    names, model = _names(p.model), cases.with_builtin_ops(p.model)  # torch.func needs built-in ops
    if kind == "hessian":
        return dense_hessian(model, p.loss_fn, p.batches, names)
    if kind in ("ggn", "fisher"):
        return dense_ggn(model, p.loss_fn, p.batches, names)
    return dense_empirical_fisher(p)


OPERATORS = {"hessian": Hessian, "ggn": GGN, "fisher": Fisher, "empirical_fisher": EmpiricalFisher}


def _cases(kind):
    out = []
    for p in PROBLEMS:
        if kind == "fisher" and p.loss_case not in LIKELIHOOD:
            continue
        out.append(pytest.param(p, id=str(p)))
    return out


@pytest.mark.parametrize("kind", list(OPERATORS))
def test_products_equal_the_concatenated_batch_truth(kind, request):
    for param in _cases(kind):
        p = param.values[0]
        op = OPERATORS[kind](p.model, p.loss_fn, p.data)
        truth = _truth(kind, p)
        V = torch.randn(op.shape[0], 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        got = op @ V
        want = truth @ V
        err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()
        assert err < TOL, f"{kind} {p}: relative error {err:.3g}"
        again = op @ V  # the cached graphs (or a new shuffled order) give the same product
        assert torch.allclose(again, got, rtol=1e-12, atol=1e-14), f"{kind} {p}: second product differs"


@pytest.mark.parametrize("kind", list(OPERATORS))
def test_a_fully_padded_first_batch_contributes_zero(kind):
    """The zero-weight batch first: nothing may be read off it (normalizer 0, loss NaN)."""
    p = cases.problem("tied_lm", "token_ce", "fully_padded")
    reordered = [p.batches[1], p.batches[0], p.batches[2]]
    p_first = cases.Problem(p.model_case, p.loss_case, p.layout, p.model, p.loss_fn, reordered, None)
    data = p_first.batches
    if kind == "fisher":
        p = cases.problem("mlp", "ce_ignore_index", "fully_padded")
        data = [p.batches[1], p.batches[0], p.batches[2]]
        p_first = p
    op = OPERATORS[kind](p_first.model, p_first.loss_fn, data)
    V = torch.randn(op.shape[0], 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    truth = _truth(kind, p_first)
    assert torch.allclose(op @ V, truth @ V, rtol=1e-10, atol=1e-12)


def test_only_fully_padded_batches_is_a_named_error():
    p = cases.problem("mlp", "ce_ignore_index", "fully_padded")
    padded = [p.batches[1], p.batches[1]]
    for Op in OPERATORS.values():
        with pytest.raises(EmptyDataError, match="weight"):
            Op(p.model, p.loss_fn, padded) @ torch.ones(_dim(p.model), dtype=torch.float64)


@pytest.mark.parametrize(
    "loss_fn",
    [
        torch.nn.CrossEntropyLoss(),
        lambda o, t: F.cross_entropy(o, t),
        __import__("functools").partial(F.cross_entropy, reduction="sum"),
    ],
    ids=["module", "lambda", "partial"],
)
def test_empty_data_is_a_named_error_not_stop_iteration(loss_fn):
    model = cases.MODELS["mlp"].build()
    for Op in (Hessian, GGN, EmpiricalFisher):
        with pytest.raises(EmptyDataError, match="empty"):
            Op(model, loss_fn, []) @ torch.ones(_dim(model), dtype=torch.float64)


@pytest.mark.parametrize("model_case", ["batchnorm_train", "dropout_train"])
def test_train_mode_cases_are_refused_unless_allowed(model_case):
    p = cases.problem(model_case, "ce", "uneven")
    for Op in OPERATORS.values():
        with pytest.raises(RuntimeError, match="train mode"):
            Op(p.model, p.loss_fn, p.data)
    with pytest.warns(UserWarning, match="allow_train_mode"):
        Hessian(p.model, p.loss_fn, p.data, allow_train_mode=True)


def test_mixed_parameter_dtypes_are_refused_by_name():
    p = cases.problem("mixed_dtype", "ce", "uneven")
    for Op in OPERATORS.values():
        with pytest.raises(TypeError, match="mixed dtypes"):
            Op(p.model, p.loss_fn, p.data)
