"""The optimizers under the usage patterns of the case registry (issue 21): closures that zero
gradients in place, mixed parameter dtypes, parameters that get a gradient late, train-mode
BatchNorm without ``model=``, complex parameters, float64 Sophia-G, a converged Newton run.

Truths are independent of the library: autograd gradients and Hessian-vector products on the
same tensors, and the update rules written out by hand in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import curvature
from curvature.optim import AdaHessian, GradientRegularizedNewton, NonFiniteError, Sophia
from curvature.optim._hessian_diagonal import draw_param_probes, fd_products
from tests.cases import CLOSURES, make_closure, problem
from tests.matrices import rel

f64 = torch.float64


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _grad_and_hvp(model, loss_fn, batch, params, probes):
    """Autograd gradient and exact ``H u`` at the current parameters (double backward)."""
    x, y = batch
    with torch.enable_grad():
        g = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
        hu = torch.autograd.grad(sum((gi * u.to(gi.dtype)).sum() for gi, u in zip(g, probes)), params)
    return [gi.detach() for gi in g], list(hu)


def _probes_of(opt, params):
    """The probe the optimizer's next refresh draws (a copy of its generator)."""
    gen = torch.Generator().set_state(opt.generator.get_state())
    return draw_param_probes(params, gen)


# ------------------------------------------------------------------------ item 1: in-place zeroing
@pytest.mark.parametrize("zeroing", list(CLOSURES))
@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_adahessian_first_step_is_the_hand_written_update(zeroing, scheme):
    # θ1 = θ0 − lr · g / (|u ⊙ Hu| + eps) (m̂ = g, v̂ = D², no spatial averaging below 3-D).
    # Before the fix, forward differences with in-place zeroing gave Hu = 0: a step of 189 vs 2.22.
    case = problem("mlp", "ce", "single_batch")
    model, batch = case.model, case.batches[0]
    params = list(model.parameters())
    lr, eps = 0.15, 1e-4
    opt = AdaHessian(params, lr=lr, eps=eps, fd_scheme=scheme, generator=torch.Generator().manual_seed(0))
    probes = _probes_of(opt, params)
    g, hu = _grad_and_hvp(model, case.loss_fn, batch, params, probes)
    theta0 = [p.detach().clone() for p in params]
    expected = [t - lr * gi / ((u * h).abs() + eps) for t, gi, u, h in zip(theta0, g, probes, hu)]
    opt.step(make_closure(opt, model, case.loss_fn, batch, zeroing))
    step = _flat(theta0) - _flat(params)
    assert rel(_flat(params), _flat(expected)) <= 1e-6
    assert rel(step, _flat(theta0) - _flat(expected)) <= 1e-6
    assert rel(_flat([p.grad for p in params]), _flat(g)) <= 1e-12  # the user's .grad is g(θ0)


@pytest.mark.parametrize("zeroing", list(CLOSURES))
@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_sophia_momentum_and_grad_are_the_gradient_at_theta(zeroing, scheme):
    # Before the fix, central differences with in-place zeroing left g(θ − εu) in m and .grad.
    case = problem("mlp", "ce", "single_batch")
    model, batch = case.model, case.batches[0]
    params = list(model.parameters())
    lr, b1, b2, rho = 0.01, 0.9, 0.99, 0.05
    opt = Sophia(params, lr=lr, betas=(b1, b2), rho=rho, weight_decay=0.0, fd_scheme=scheme,
                 generator=torch.Generator().manual_seed(0))
    probes = _probes_of(opt, params)
    g, hu = _grad_and_hvp(model, case.loss_fn, batch, params, probes)
    theta0 = [p.detach().clone() for p in params]
    opt.step(make_closure(opt, model, case.loss_fn, batch, zeroing))
    for p, t0, gi, u, h in zip(params, theta0, g, probes, hu):
        m = (1 - b1) * gi
        assert rel(opt.state[p]["exp_avg"], m) <= 1e-12
        assert rel(p.grad, gi) <= 1e-12
        hess = (1 - b2) * u * h
        assert rel(opt.state[p]["hessian"], hess) <= 1e-5
        expected = t0 - lr * (m / (rho * hess).clamp_min(1e-15)).clamp(-1, 1)
        assert (p.detach() - expected).abs().max() <= 1e-9 * lr + 1e-12 or rel(p.detach(), expected) <= 1e-6


@pytest.mark.parametrize("zeroing", list(CLOSURES))
def test_newton_restores_the_gradient_of_theta_after_rejected_trials(zeroing):
    # A curvature 1000x too small overshoots: the only trial is rejected and θ stays. The user's
    # .grad must be g(θ), not the trial's (off by 4.0 relative before the fix).
    case = problem("mlp", "ce", "single_batch")
    model, batch = case.model, case.batches[0]
    params = list(model.parameters())
    opt = GradientRegularizedNewton(params, gamma=1e6, max_trials=1)
    g, _ = _grad_and_hvp(model, case.loss_fn, batch, params, [torch.zeros_like(p) for p in params])
    theta0 = _flat([p.detach().clone() for p in params])
    wrong = curvature.GGN(model, lambda out, y: 1e-3 * case.loss_fn(out, y), batch)
    opt.step(make_closure(opt, model, case.loss_fn, batch, zeroing), curvature=wrong)
    assert not opt.last_step_info.accepted
    assert torch.equal(_flat(params).detach(), theta0)
    assert rel(_flat([p.grad for p in params]), _flat(g)) <= 1e-14


# --------------------------------------------------------------- item 2: one ε for mixed dtypes
@pytest.mark.parametrize("order", ["float32_first", "float64_first"])
@pytest.mark.parametrize("scheme, tol", [("forward", 2e-2), ("central", 2e-3)])
def test_finite_differences_on_mixed_dtypes(order, scheme, tol):
    # Before: the step came from the first parameter's dtype; float64 first gave a relative
    # error of u ⊙ Hu of 5.21 on the float32 body (7.8e-4 when all dtypes agree).
    case = problem("mixed_dtype", "ce", "single_batch")
    model, batch = case.model, case.batches[0]
    params = list(model.parameters())
    if order == "float64_first":
        params = params[::-1]
    probes = draw_param_probes(params, torch.Generator().manual_seed(0))
    _, hu = _grad_and_hvp(model, case.loss_fn, batch, params, probes)
    exact = _flat([(u.double() * h.double()) for u, h in zip(probes, hu)])
    closure = make_closure(None, model, case.loss_fn, batch, "manual_in_place")
    closure()
    fd = fd_products(params, closure, probes, scheme=scheme)
    err = rel(_flat([(u.double() * h.double()) for u, h in zip(probes, fd)]), exact)
    assert err <= tol, err


# --------------------------------------------------- item 3: per-parameter bias correction
@pytest.mark.parametrize("zeroing", list(CLOSURES))
def test_adahessian_parameter_with_a_late_first_gradient_takes_a_first_step(zeroing):
    # b gets its first gradient at step 21: its step must be the first step of the per-parameter
    # rule (torch.optim.Adam's state['step'], the official AdaHessian): b − lr·g/(|h| + eps).
    # Before: optimizer-wide counters gave 0.508x that step.
    a = nn.Parameter(torch.tensor([1.0, -2.0], dtype=f64))
    b = nn.Parameter(torch.tensor([3.0, 0.5], dtype=f64))
    ha, hb = torch.tensor([2.0, 0.5], dtype=f64), torch.tensor([4.0, 1.0], dtype=f64)
    holder = nn.Module()
    holder.a, holder.b = a, b
    lr, eps = 0.1, 1e-4
    opt = AdaHessian([a, b], lr=lr, eps=eps, generator=torch.Generator().manual_seed(0))
    zero = CLOSURES[zeroing]
    use_b = False

    def closure():
        zero(opt, holder)
        loss = 0.5 * (ha * a**2).sum() + (0.5 * (hb * b**2).sum() if use_b else 0.0)
        loss.backward()
        return loss

    for _ in range(20):
        opt.step(closure)
    assert b.grad is None
    use_b = True
    b0 = b.detach().clone()
    opt.step(closure)
    expected = b0 - lr * (hb * b0) / (hb + eps)  # a diagonal H: u ⊙ Hu = h exactly
    ratio = float((b0 - b.detach()).norm() / (b0 - expected).norm())
    assert rel(b.detach(), expected) <= 1e-7, ratio
    assert opt.state[b]["step"] == 1 and opt.state[a]["step"] == 21


def test_adahessian_late_parameter_between_scheduled_refreshes_gets_an_estimate():
    # update_period=5: b's first gradient comes at step 3, not a scheduled refresh. Without an
    # estimate its denominator would be eps (θ jumping by ~1e4 here): the step refreshes instead.
    a = nn.Parameter(torch.tensor([1.0, -2.0], dtype=f64))
    b = nn.Parameter(torch.tensor([3.0, 0.5], dtype=f64))
    hb = torch.tensor([4.0, 1.0], dtype=f64)
    opt = AdaHessian([a, b], lr=0.1, eps=1e-4, update_period=5, generator=torch.Generator().manual_seed(0))
    use_b = False

    def closure():
        opt.zero_grad(set_to_none=False)
        loss = 0.5 * (a**2).sum() + (0.5 * (hb * b**2).sum() if use_b else 0.0)
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    use_b = True
    b0 = b.detach().clone()
    opt.step(closure)
    assert rel(b.detach(), b0 - 0.1 * (hb * b0) / (hb + 1e-4)) <= 1e-7
    assert opt.state[b]["hessian_step"] == 1 and opt.state[a]["hessian_step"] == 2


# ------------------------------------------------------------- item 9: Sophia-G in float64
def test_sophia_g_float64_logits_are_not_rounded_to_float32():
    # Before: logits.float() gave 2.9e-6 relative error in float64.
    case = problem("mlp", "ce", "single_batch")
    model, (x, _) = case.model, case.batches[0]
    params = list(model.parameters())
    opt = Sophia(params, lr=0.01, estimator="gnb", generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().set_state(opt.generator.get_state())
    logits = model(x)
    labels = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1, generator=gen).view(-1)
    g = torch.autograd.grad(nn.functional.cross_entropy(logits, labels), params)
    expected = _flat([logits.shape[0] * gi.square() for gi in g])
    opt.update_curvature(model, x)
    got = _flat([opt._pending[p] for p in params])
    assert got.dtype == f64 and rel(got, expected) <= 1e-15


def test_sophia_g_reads_logits_from_dict_outputs():
    case = problem("mlp", "ce", "single_batch")
    model, (x, _) = case.model, case.batches[0]

    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, inputs):
            return {"logits": self.inner(inputs), "hidden": inputs}

    wrapped = DictOut()
    ref = Sophia(model.parameters(), lr=0.01, estimator="gnb", generator=torch.Generator().manual_seed(0))
    ref.update_curvature(model, x)
    opt = Sophia(model.parameters(), lr=0.01, estimator="gnb", generator=torch.Generator().manual_seed(0))
    opt.update_curvature(wrapped, x)
    assert all(torch.equal(opt._pending[p], ref._pending[p]) for p in model.parameters())


# -------------------------------------------------- state corruption: train-mode BatchNorm
@pytest.mark.parametrize("make", [
    lambda p: Sophia(p, lr=0.01, update_period=1, generator=torch.Generator().manual_seed(0)),
    lambda p: Sophia(p, lr=0.01, update_period=1, fd_scheme="forward", generator=torch.Generator().manual_seed(0)),
    lambda p: AdaHessian(p, lr=0.01, generator=torch.Generator().manual_seed(0)),
    lambda p: AdaHessian(p, lr=0.01, fd_scheme="central", generator=torch.Generator().manual_seed(0)),
], ids=["sophia-central", "sophia-forward", "adahessian-forward", "adahessian-central"])
@pytest.mark.parametrize("zeroing", ["set_to_none", "in_place"])
def test_refresh_leaves_batchnorm_buffers_as_one_forward_does(make, zeroing):
    # No model= given. Before: num_batches_tracked 3 instead of 1, running_mean off.
    case = problem("batchnorm_train", "ce", "single_batch")
    model, batch = case.model, case.batches[0]
    reference = copy.deepcopy(model)
    reference(batch[0])  # one train-mode forward at θ0: the buffers a step should leave
    opt = make(list(model.parameters()))
    opt.step(make_closure(opt, model, case.loss_fn, batch, zeroing))
    for (name, buf), ref in zip(model.named_buffers(), reference.buffers()):
        assert torch.equal(buf, ref), name
    assert int(model[1].num_batches_tracked) == 1


def test_newton_trials_leave_batchnorm_buffers_as_one_forward_does():
    case = problem("batchnorm_train", "ce", "single_batch")
    model, batch = case.model, case.batches[0]
    reference = copy.deepcopy(model)
    reference(batch[0])
    opt = GradientRegularizedNewton(model.parameters())
    op = curvature.GGN(model, case.loss_fn, batch, allow_train_mode=True)
    opt.step(make_closure(opt, model, case.loss_fn, batch), curvature=op)
    assert opt.last_step_info.trials >= 1
    assert int(model[1].num_batches_tracked) == 1
    for buf, ref in zip(model.buffers(), reference.buffers()):
        assert torch.equal(buf, ref)


# ----------------------------------------------------------------- complex parameters
@pytest.mark.parametrize("cls", [Sophia, AdaHessian])
def test_complex_parameters_are_refused_by_name(cls):
    model = problem("complex", "ce", "single_batch").model
    with pytest.raises(TypeError, match="complex"):
        cls(model.parameters(), lr=0.01)
    opt = cls([model.out.weight], lr=0.01)
    with pytest.raises(TypeError, match="complex"):
        opt.add_param_group({"params": [model.w]})


# ------------------------------------------------------------ Newton: a stopping test
def test_newton_stops_trying_once_converged():
    # Before: every step after convergence spent all 40 trials (the decrease test cannot pass
    # once f changes only in its last bits).
    X = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.5, -1.5], [2.0, 1.0]], dtype=f64)
    y = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=f64)
    model = nn.Linear(2, 1, bias=False).double()
    nn.init.zeros_(model.weight)

    def loss_fn(out, t):
        return nn.functional.binary_cross_entropy_with_logits(out[:, 0], t) + 0.05 * model.weight.square().sum()

    opt = GradientRegularizedNewton(model.parameters())
    closure = make_closure(opt, model, loss_fn, (X, y), "in_place")
    for _ in range(30):
        opt.step(closure, curvature=curvature.Hessian(model, loss_fn, (X, y)))
    info = opt.last_step_info
    assert info.converged and info.trials <= 2, info
    # With grad_tol, a converged step runs no trial at all.
    opt = GradientRegularizedNewton(model.parameters(), grad_tol=1e-8)
    opt.step(closure, curvature=curvature.Hessian(model, loss_fn, (X, y)))
    assert opt.last_step_info.converged and opt.last_step_info.trials == 0


def test_non_finite_error_is_exported():
    assert issubclass(NonFiniteError, FloatingPointError)


class _ScaledHalfMLP(nn.Module):
    """A bfloat16 MLP with a float32 output scale (the float32 tensor comes first)."""

    def __init__(self, dtype=torch.bfloat16, scale_dtype=torch.float32):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.5], dtype=scale_dtype))
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)

    def forward(self, x):
        return self.body(x.to(self.body[0].weight.dtype)).to(self.scale.dtype) * self.scale


@pytest.mark.parametrize("scheme, tol", [("forward", 0.3), ("central", 0.1)])
def test_finite_differences_on_bfloat16_with_a_float32_tensor_first(scheme, tol):
    # Before: ε from float32 rounded the bfloat16 perturbation away (relative error 3.29 forward).
    # The truth: the same weights in float64, exact double-backward product.
    model = _ScaledHalfMLP()
    exact_model = _ScaledHalfMLP(f64, f64)
    exact_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1), dtype=f64)
    y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(2))
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    probes = draw_param_probes(params, torch.Generator().manual_seed(0))
    _, hu = _grad_and_hvp(exact_model, loss_fn, (x, y), list(exact_model.parameters()), probes)
    exact = _flat([u.double() * h for u, h in zip(probes, hu)])
    closure = make_closure(None, model, lambda out, t: loss_fn(out.float(), t), (x, y), "manual_in_place")
    closure()
    fd = fd_products(params, closure, probes, scheme=scheme)
    err = rel(_flat([u.double() * h.double() for u, h in zip(probes, fd)]), exact)
    assert err <= tol, err
