"""Every operator against dense float64 references on small models, losses, reductions and batchings."""

from __future__ import annotations

import functools

import pytest
import torch

from curvature import GGN, EmpiricalFisher, Fisher, Hessian
from tests.curvature import reference as ref
from tests.curvature.models import loss_module, make_batches

TOL = 1e-10
MODELS = ["mlp", "cnn", "residual", "transformer", "batchnorm"]
LOSSES = [("ce", "mean"), ("ce", "sum"), ("mse", "mean"), ("mse", "sum"), ("bce", "mean"), ("bce", "sum")]
# Keep the grid affordable: every loss on the MLP and CNN, two on the others.
CASES = [
    (m, k, r)
    for m in MODELS
    for (k, r) in LOSSES
    if m in ("mlp", "cnn") or (k, r) in (("ce", "mean"), ("mse", "sum"))
]


@functools.cache
def setup(model_name, kind, reduction):
    model, batches = make_batches(model_name, kind)
    loss_fn = loss_module(kind, reduction)
    names = tuple(n for n, _ in model.named_parameters())
    refs = {
        "hessian": ref.dense_hessian(model, loss_fn, batches, names),
        "ggn": ref.dense_ggn(model, loss_fn, batches, names),
        "fisher": ref.dense_fisher(model, kind, reduction, batches, names),
        "ef": ref.dense_empirical_fisher(model, kind, reduction, batches, names),
    }
    return model, batches, loss_fn, refs


OPERATORS = {"hessian": Hessian, "ggn": GGN, "fisher": Fisher, "ef": EmpiricalFisher}


def one_batch(batches):
    xs, ys = zip(*batches)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("model_name,kind,reduction", CASES)
@pytest.mark.parametrize("op_name", list(OPERATORS))
def test_dense_matches_reference(model_name, kind, reduction, op_name):
    model, batches, loss_fn, refs = setup(model_name, kind, reduction)
    expected = refs[op_name]
    # one big batch, and several uneven batches (sizes 5, 4, 3) must both give the full-data matrix
    for data in (one_batch(batches), batches):
        op = OPERATORS[op_name](model, loss_fn, data)
        assert ref.rel_err(op.to_dense(), expected) <= TOL


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("op_name", list(OPERATORS))
def test_vector_and_block_products(model_name, op_name):
    model, batches, loss_fn, refs = setup(model_name, "ce", "mean")
    expected = refs[op_name]
    op = OPERATORS[op_name](model, loss_fn, batches)
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(op.shape[0], generator=gen, dtype=torch.float64)
    V = torch.randn(op.shape[0], 5, generator=gen, dtype=torch.float64)
    assert ref.rel_err(op @ v, expected @ v) <= TOL
    assert ref.rel_err(op @ V, expected @ V) <= TOL
    # per-parameter tensor lists in, per-parameter tensor lists out
    out = op @ op.unflatten(v)
    assert [tuple(t.shape) for t in out] == [tuple(p.shape) for p in op.params]
    assert ref.rel_err(op.flatten(out), expected @ v) <= TOL


@pytest.mark.parametrize("backend", ["loop", "vmap", "forward_over_reverse", "auto"])
@pytest.mark.parametrize("model_name", ["cnn", "transformer", "batchnorm"])
def test_hessian_backends(backend, model_name):
    model, batches, loss_fn, refs = setup(model_name, "ce", "mean")
    V = torch.randn(refs["hessian"].shape[0], 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for data in (one_batch(batches), batches):
        H = Hessian(model, loss_fn, data, backend=backend, probe_batch_size=3)
        assert ref.rel_err(H @ V, refs["hessian"] @ V) <= TOL
        assert H.backend_choice(11).backend in ("loop", "vmap", "forward_over_reverse")
        assert ref.rel_err(H @ V[:, :5], refs["hessian"] @ V[:, :5]) <= TOL


@pytest.mark.parametrize("backend", ["vmap", "loop"])
@pytest.mark.parametrize("op_name", ["ggn", "fisher", "ef"])
def test_jacobian_backends(backend, op_name):
    model, batches, loss_fn, refs = setup("cnn", "mse", "mean")
    V = torch.randn(refs[op_name].shape[0], 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    op = OPERATORS[op_name](model, loss_fn, batches, backend=backend, probe_batch_size=3)
    assert ref.rel_err(op @ V, refs[op_name] @ V) <= TOL


@pytest.mark.parametrize("op_name", list(OPERATORS))
def test_parameter_subsets(op_name):
    model, batches, loss_fn, refs = setup("mlp", "ce", "mean")
    names = [n for n, _ in model.named_parameters()]
    numels = [p.numel() for _, p in model.named_parameters()]
    offsets = torch.tensor([0] + numels).cumsum(0)
    chosen = ["0.weight", "2.bias"]
    idx = torch.cat([torch.arange(offsets[names.index(n)], offsets[names.index(n) + 1]) for n in chosen])
    expected = refs[op_name][idx][:, idx]
    by_name = OPERATORS[op_name](model, loss_fn, batches, params=chosen)
    by_tensor = OPERATORS[op_name](model, loss_fn, batches, params=[model[0].weight, model[2].bias])
    by_predicate = OPERATORS[op_name](model, loss_fn, batches, params=lambda n, p: n in chosen)
    for op in (by_name, by_tensor, by_predicate):
        assert [b.name for b in op.blocks] == chosen
        assert ref.rel_err(op.to_dense(), expected) <= TOL


def test_ggn_generic_loss_matches_reference():
    """A loss the toolkit has no closed form for goes through autodiff of the output Hessian."""
    model, batches = make_batches("mlp", "mse")

    def smooth_l1_cubed(out, y):
        return ((out - y) ** 4).mean() + torch.nn.functional.smooth_l1_loss(out, y)

    names = tuple(n for n, _ in model.named_parameters())
    expected = ref.dense_ggn(model, smooth_l1_cubed, batches, names)
    G = GGN(model, smooth_l1_cubed, batches)
    assert ref.rel_err(G.to_dense(), expected) <= TOL
    H = Hessian(model, smooth_l1_cubed, batches)
    assert ref.rel_err(H.to_dense(), ref.dense_hessian(model, smooth_l1_cubed, batches, names)) <= TOL


def test_fisher_equals_ggn_for_exponential_families():
    for kind in ("ce", "mse", "bce"):
        _, _, _, refs = setup("mlp", kind, "mean")
        assert ref.rel_err(refs["fisher"], refs["ggn"]) <= 1e-12


def test_unweighted_batch_average_would_fail():
    """Regression guard: batch sizes differ, so weighting by sample count matters."""
    model, batches, loss_fn, refs = setup("mlp", "ce", "mean")
    unweighted = sum(Hessian(model, loss_fn, b).to_dense() for b in batches) / len(batches)
    assert ref.rel_err(unweighted, refs["hessian"]) > 1e-3


def test_mc_fisher_converges_to_exact():
    model, batches, loss_fn, refs = setup("mlp", "ce", "mean")
    exact = refs["fisher"]
    errors = []
    for samples in (4, 64, 1024):
        F = Fisher(model, loss_fn, batches, mc_samples=samples, generator=torch.Generator().manual_seed(1))
        errors.append(((F.to_dense() - exact).norm() / exact.norm()).item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.05
    # roughly 1/sqrt(S): 256x the samples should cut the error by well over 4x
    assert errors[2] < errors[0] / 4


def test_mc_fisher_is_a_fixed_symmetric_matrix():
    model, batches, loss_fn, _ = setup("cnn", "bce", "mean")
    F1 = Fisher(model, loss_fn, batches, mc_samples=3, generator=torch.Generator().manual_seed(5))
    F2 = Fisher(model, loss_fn, batches, mc_samples=3, generator=torch.Generator().manual_seed(5))
    D = F1.to_dense()
    assert torch.equal(D, F1.to_dense())  # same samples on every product
    assert torch.equal(D, F2.to_dense())  # same seed, same matrix
    assert ref.rel_err(D, D.T) <= 1e-12
    F3 = Fisher(model, loss_fn, batches, mc_samples=3, generator=torch.Generator().manual_seed(6))
    assert not torch.allclose(D, F3.to_dense())


@pytest.mark.parametrize("kind", ["ce", "mse", "bce"])
def test_mc_fisher_matches_explicit_sampled_outer_products(kind):
    """For fixed sampled labels, the matrix-free product equals per-sample sampled-gradient outer products."""
    model, batches = make_batches("mlp", kind)
    loss_fn = loss_module(kind, "mean")
    x, y = batches[0]
    names = tuple(n for n, _ in model.named_parameters())
    F = Fisher(model, loss_fn, (x, y), mc_samples=2, generator=torch.Generator().manual_seed(0))
    out, J = ref.jacobian(model, names, x)
    from curvature.losses import OutputCurvature

    R = OutputCurvature(F.loss_info, loss_fn, out, y).sampled_residuals(
        2, torch.Generator().manual_seed(F._seed + 0)
    )  # (S, N, C)
    N, C = out.shape
    Jn = J.reshape(N, C, -1)
    G = torch.einsum("snc,ncd->snd", R, Jn).reshape(-1, J.shape[1])
    expected = ref.kappa(kind, "mean", out) * G.T @ G / 2
    assert ref.rel_err(F.to_dense(), expected) <= TOL


def test_cross_entropy_ignore_index_and_label_smoothing():
    model, batches = make_batches("mlp", "ce")
    x, y = ref._concat(batches)
    y = y.clone()
    y[::4] = -100
    names = tuple(n for n, _ in model.named_parameters())
    for loss_fn in (torch.nn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss(label_smoothing=0.1)):
        expected_h = ref.dense_hessian(model, loss_fn, [(x, y)], names)
        expected_g = ref.dense_ggn(model, loss_fn, [(x, y)], names)
        assert ref.rel_err(Hessian(model, loss_fn, (x, y)).to_dense(), expected_h) <= TOL
        assert ref.rel_err(GGN(model, loss_fn, (x, y)).to_dense(), expected_g) <= TOL
