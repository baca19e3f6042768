"""Finite-difference Hessian products (backend="finite_difference"): the operator contract (blocks,
data sets, batch weighting) against a dense float64 truth by autograd, a kernel without a double
backward, and the one forward path (compute dtype) shared with forward-over-reverse."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvature import GGN, Hessian
from curvature.finite_difference import NoDoubleBackwardError, central_difference_step
from tests.cases import full_batch_loss, problem, with_builtin_ops

f64 = torch.float64
#: Documented bound of the central differences in float64 on the tests' models (docs/finite_difference.md).
FD_TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def true_hvp(model: nn.Module, loss_fn, batches, V: torch.Tensor, params=None) -> torch.Tensor:
    """H V of the full-batch loss by reverse-over-reverse autograd (independent of the operators)."""
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    grads = torch.autograd.grad(full_batch_loss(model, loss_fn, batches), params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    cols = [torch.cat([r.reshape(-1) for r in torch.autograd.grad(flat, params, V[:, j], retain_graph=True)])
            for j in range(V.shape[1])]
    return torch.stack(cols, 1)


@pytest.mark.parametrize(
    "case",
    [("mlp", "ce", "uneven"), ("mlp", "ce_weighted", "shuffled"), ("mlp", "ce_ignore_index", "uneven"),
     ("tied_lm", "token_ce", "uneven"), ("called_twice", "mse_sum", "single_batch"), ("frozen", "ce", "uneven")],
    ids="-".join,
)
def test_finite_difference_matches_the_exact_products(case):
    p = problem(*case)
    H = Hessian(p.model, p.loss_fn, p.data, backend="finite_difference")
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=f64)
    truth = true_hvp(p.model, p.loss_fn, p.batches, V)
    assert rel_err(H @ V, truth) < FD_TOL
    assert rel_err(H @ V[:, 1], truth[:, 1]) < FD_TOL  # single columns too
    assert H.backend_choice(3).backend == "finite_difference"


def test_finite_difference_on_a_parameter_block():
    p = problem("mlp", "ce", "uneven")
    names = ["0.weight"]
    H = Hessian(p.model, p.loss_fn, p.data, backend="finite_difference", params=names)
    V = torch.randn(H.shape[0], 2, generator=torch.Generator().manual_seed(1), dtype=f64)
    truth = true_hvp(p.model, p.loss_fn, p.batches, V, params=[dict(p.model.named_parameters())["0.weight"]])
    assert rel_err(H @ V, truth) < FD_TOL
    assert torch.equal(H @ torch.zeros(H.shape[0], dtype=f64), torch.zeros(H.shape[0], dtype=f64))


def test_step_follows_the_coarsest_dtype():
    p32, p64 = torch.ones(3), torch.ones(3, dtype=f64)
    v = [torch.ones(3), torch.ones(3, dtype=f64)]
    mixed = central_difference_step([p32, p64], v)
    assert mixed == pytest.approx(central_difference_step([p32], v[:1]) * 2 ** -0.5)  # ‖v‖ of both, ε of float32
    assert central_difference_step([p64], v[1:]) < mixed / 100


def _fused_problem():
    p = problem("fused_kernel", "ce", "uneven")
    return p.model, with_builtin_ops(p.model), p  # the twin's torch.tanh has a double backward


def test_once_differentiable_kernel_needs_finite_differences():
    fused, plain, p = _fused_problem()
    H = Hessian(fused, p.loss_fn, p.batches, backend="finite_difference")
    V = torch.randn(H.shape[0], 4, generator=torch.Generator().manual_seed(2), dtype=f64)
    assert rel_err(H @ V, true_hvp(plain, p.loss_fn, p.batches, V)) < FD_TOL


@pytest.mark.parametrize("backend", ["loop", "vmap", "auto"])
def test_exact_backends_name_the_finite_difference_backend(backend):
    fused, _, p = _fused_problem()
    V = torch.randn(sum(t.numel() for t in fused.parameters()), 4, dtype=f64)
    with pytest.raises(NoDoubleBackwardError, match="finite_difference"):
        Hessian(fused, p.loss_fn, p.batches, backend=backend) @ V
    with pytest.raises(NoDoubleBackwardError, match="finite_difference"):
        GGN(fused, p.loss_fn, p.batches, backend="loop") @ V


def test_forward_over_reverse_goes_through_the_compute_dtype_cast():
    """forward-over-reverse called the model itself and skipped compute_dtype's input cast."""
    p = problem("mlp", "ce", "uneven")
    model = p.model.float()
    batches = [(x.float(), y) for x, y in p.batches]
    V = torch.randn(sum(t.numel() for t in model.parameters()), 3, generator=torch.Generator().manual_seed(3),
                    dtype=f64)
    exact = Hessian(model, p.loss_fn, batches, compute_dtype=f64, backend="loop") @ V
    for backend in ("forward_over_reverse", "finite_difference"):
        H = Hessian(model, p.loss_fn, batches, compute_dtype=f64, backend=backend)
        assert rel_err(H @ V, exact) < (1e-12 if backend == "forward_over_reverse" else FD_TOL)


def test_finite_difference_in_train_mode_restores_the_buffers():
    p = problem("batchnorm_train", "ce", "uneven")
    before = {k: v.clone() for k, v in p.model.state_dict().items()}
    V = torch.randn(sum(t.numel() for t in p.model.parameters()), 3, generator=torch.Generator().manual_seed(4),
                    dtype=f64)
    with pytest.warns(UserWarning, match="train mode"):
        fd = Hessian(p.model, p.loss_fn, p.batches, backend="finite_difference", allow_train_mode=True) @ V
        exact = Hessian(p.model, p.loss_fn, p.batches, backend="loop", allow_train_mode=True) @ V
    assert rel_err(fd, exact) < FD_TOL
    assert all(torch.equal(before[k], v) for k, v in p.model.state_dict().items())
