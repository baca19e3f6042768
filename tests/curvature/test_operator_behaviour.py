"""Operator behaviour beyond exactness: inputs, errors, determinism, state, caching, conversions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvature import GGN, DenseOperator, EmpiricalFisher, Fisher, Hessian, as_operator
from tests.curvature import reference as ref
from tests.curvature.models import loss_module, make_batches

OPERATORS = [Hessian, GGN, Fisher, EmpiricalFisher]


@pytest.fixture
def mlp_case():
    model, batches = make_batches("mlp", "ce")
    return model, nn.CrossEntropyLoss(), batches


def full(batches):
    xs, ys = zip(*batches)
    return torch.cat(xs), torch.cat(ys)


# -- data forms ---------------------------------------------------------------------------------
@pytest.mark.parametrize("Op", OPERATORS)
def test_dataloader_with_short_last_batch_equals_one_batch(mlp_case, Op):
    model, loss_fn, batches = mlp_case
    x, y = full(batches)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)  # 12 samples: 5, 5, 2
    assert ref.rel_err(Op(model, loss_fn, loader).to_dense(), Op(model, loss_fn, (x, y)).to_dense()) <= 1e-10


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(2, 2)

    def forward(self, u, w):
        return torch.tanh(self.a(u)) * self.b(w)


@pytest.mark.parametrize("Op", OPERATORS)
def test_tuple_and_dict_inputs(Op):
    torch.manual_seed(0)
    model = TwoInputs().double()
    u, w = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    loss_fn = nn.CrossEntropyLoss()
    as_tuple = Op(model, loss_fn, ((u, w), y)).to_dense()
    as_dict = Op(model, loss_fn, [({"u": u[:4], "w": w[:4]}, y[:4]), ({"u": u[4:], "w": w[4:]}, y[4:])]).to_dense()
    assert ref.rel_err(as_dict, as_tuple) <= 1e-10
    assert torch.linalg.matrix_norm(as_tuple) > 0


# -- bad input ------------------------------------------------------------------------------------
def test_non_scalar_loss(mlp_case):
    model, _, batches = mlp_case
    H = Hessian(model, nn.CrossEntropyLoss(reduction="sum"), batches, reduction="mean")
    with pytest.raises(ValueError, match="reduction"):
        Hessian(model, nn.CrossEntropyLoss(reduction="none"), batches)
    H = Hessian(model, lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"), batches)
    with pytest.raises(ValueError, match="scalar"):
        H @ torch.ones(H.shape[0], dtype=torch.float64)


@pytest.mark.parametrize("Op", OPERATORS)
def test_nan_loss_names_the_batch(mlp_case, Op):
    model, loss_fn, batches = mlp_case
    bad = [batches[0], (batches[1][0] * float("nan"), batches[1][1]), batches[2]]
    op = Op(model, loss_fn, bad)
    with pytest.raises(FloatingPointError, match="batch 1"):
        op @ torch.ones(op.shape[0], dtype=torch.float64)


def test_infinite_product_names_the_batch():
    model = nn.Linear(2, 1, bias=False).double()
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)

    def loss_fn(out, y):  # finite loss at out = 0, infinite curvature there
        return out.abs().pow(1.5).mean()

    H = Hessian(model, loss_fn, [(x[:1], x[:1, 0]), (x[1:], x[1:, 0])])
    with pytest.raises(FloatingPointError, match="product is not finite on batch 1"):
        H @ torch.ones(2, dtype=torch.float64)


def test_parameters_that_do_not_require_grad(mlp_case):
    model, loss_fn, batches = mlp_case
    model[0].weight.requires_grad_(False)
    try:
        with pytest.raises(ValueError, match="0.weight.*does not require grad"):
            Hessian(model, loss_fn, batches, params=["0.weight"])
        H = Hessian(model, loss_fn, batches)  # default: only those that require grad
        assert [b.name for b in H.blocks] == ["0.bias", "2.weight", "2.bias"]
    finally:
        model[0].weight.requires_grad_(True)
    with pytest.raises(ValueError, match="unknown parameter names"):
        Hessian(model, loss_fn, batches, params=["nope"])


@pytest.mark.parametrize("Op", OPERATORS)
def test_unused_parameters_give_zero_rows(Op):
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)}).double()
    model.forward = lambda x: model["used"](x)  # noqa: E731 - an instance-level forward
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    op = Op(model, nn.CrossEntropyLoss(), (x, y))
    D = op.to_dense()
    unused = torch.cat([torch.arange(b.slice.start, b.slice.stop) for b in op.blocks if b.name.startswith("unused")])
    assert D[unused].abs().max() == 0 and D[:, unused].abs().max() == 0
    assert D.abs().max() > 0


def test_empty_data(mlp_case):
    model, loss_fn, _ = mlp_case
    H = Hessian(model, loss_fn, [])
    with pytest.raises(ValueError, match="empty"):
        H @ torch.ones(H.shape[0], dtype=torch.float64)
    with pytest.raises(TypeError, match="one-shot iterator"):
        Hessian(model, loss_fn, iter([]))
    with pytest.raises(TypeError, match=r"\(inputs, targets\)"):
        Hessian(model, loss_fn, [torch.ones(3)]) @ torch.ones(H.shape[0], dtype=torch.float64)


def test_wrong_vectors(mlp_case):
    model, loss_fn, batches = mlp_case
    H = Hessian(model, loss_fn, batches)
    d = H.shape[0]
    with pytest.raises(ValueError, match=rf"\({d},\)"):
        H @ torch.ones(d + 1, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32"):
        H @ torch.ones(d, dtype=torch.float32)
    with pytest.raises(ValueError, match="meta"):
        H @ torch.ones(d, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match="expected 4 tensors"):
        H @ [torch.ones(3)]
    with pytest.raises(ValueError, match="'0.weight': expected shape"):
        H @ ([torch.ones(3, dtype=torch.float64)] * 4)


def test_bad_options(mlp_case):
    model, loss_fn, batches = mlp_case
    with pytest.raises(ValueError, match="backend"):
        Hessian(model, loss_fn, batches, backend="magic")
    with pytest.raises(ValueError, match="probe_batch_size"):
        GGN(model, loss_fn, batches, probe_batch_size=0)
    with pytest.raises(ValueError, match="mc_samples"):
        Fisher(model, loss_fn, batches, mc_samples=0)
    with pytest.raises(ValueError, match="GGN"):
        Fisher(model, nn.L1Loss(), batches)
    with pytest.raises(TypeError, match="nn.Module"):
        Hessian(lambda x: x, loss_fn, batches)


# -- train mode and state -----------------------------------------------------------------------
def test_train_mode_with_dropout_or_batchnorm_is_refused():
    model, batches = make_batches("batchnorm", "ce")
    model.train()
    with pytest.raises(RuntimeError, match="model.eval"):
        Hessian(model, nn.CrossEntropyLoss(), batches)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="allow_train_mode"):
        H = Hessian(model, nn.CrossEntropyLoss(), batches, allow_train_mode=True)
    with pytest.warns(UserWarning):
        H @ torch.ones(H.shape[0], dtype=torch.float64)
    for k, v in model.state_dict().items():  # running statistics restored
        assert torch.equal(v, before[k]), k
    plain = nn.Sequential(nn.Linear(2, 2)).train()  # train mode without such layers is deterministic
    Hessian(plain, nn.MSELoss(), (torch.randn(3, 2), torch.randn(3, 2)))


@pytest.mark.parametrize("Op", OPERATORS)
def test_model_state_is_untouched(mlp_case, Op):
    model, loss_fn, batches = mlp_case
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = [p.detach().clone() for p in model.parameters()]
    op = Op(model, loss_fn, batches)
    op @ torch.ones(op.shape[0], 3, dtype=torch.float64)
    assert not model.training
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b) and torch.equal(p.grad, torch.full_like(p, 7.0))


def test_deterministic_products(mlp_case):
    model, loss_fn, batches = mlp_case
    H = Hessian(model, loss_fn, batches)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    assert torch.equal(H @ v, H @ v)


# -- graph cache ------------------------------------------------------------------------------
def test_graph_cache_follows_parameter_updates(mlp_case):
    model, loss_fn, batches = mlp_case
    x, y = full(batches)
    H = Hessian(model, loss_fn, (x, y))
    assert H.cache_graph
    v = torch.randn(H.shape[0], dtype=torch.float64)
    first = H @ v
    assert H._cache
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    try:
        fresh = Hessian(model, loss_fn, (x, y), cache_graph=False) @ v
        assert ref.rel_err(H @ v, fresh) <= 1e-12
        assert not torch.allclose(first, fresh)
    finally:
        with torch.no_grad():
            model[0].weight.div_(1.5)
    with H:
        H @ v
    assert not H._cache  # released on leaving the block


def test_multi_batch_cache_opt_in(mlp_case):
    model, loss_fn, batches = mlp_case
    H = Hessian(model, loss_fn, batches, cache_graph=True)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    assert ref.rel_err(H @ v, Hessian(model, loss_fn, batches, cache_graph=False) @ v) <= 1e-12
    assert len(H._cache) == len(batches)
    H.release()
    assert not H._cache


# -- conversions and bookkeeping ------------------------------------------------------------------
def test_counter_blocks_scipy_dense_guard(mlp_case):
    model, loss_fn, batches = mlp_case
    H = Hessian(model, loss_fn, batches)
    d = H.shape[0]
    assert H.num_matvecs == 0
    H @ torch.ones(d, 4, dtype=torch.float64)
    assert H.num_matvecs == 4
    assert [(b.name, b.shape) for b in H.blocks] == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert H.blocks[-1].slice.stop == d
    A = H.to_scipy()
    v = np.random.default_rng(0).standard_normal(d)
    np.testing.assert_allclose(A @ v, (H @ torch.from_numpy(v)).numpy(), rtol=1e-12)
    from scipy.sparse.linalg import eigsh

    top = eigsh(A, k=1, which="LA", return_eigenvectors=False)[0]
    assert abs(top - torch.linalg.eigvalsh(H.to_dense())[-1].item()) < 1e-8
    import curvature.linear_operator as lo

    old, lo.DENSE_LIMIT = lo.DENSE_LIMIT, 10
    try:
        with pytest.raises(ValueError, match="force=True"):
            H.to_dense()
        assert H.to_dense(force=True).shape == (d, d)
    finally:
        lo.DENSE_LIMIT = old


def test_as_operator_adapters():
    M = torch.randn(5, 5, dtype=torch.float64)
    M = M + M.T
    op = as_operator(M)
    assert isinstance(op, DenseOperator)
    from scipy.sparse.linalg import aslinearoperator

    sp = as_operator(aslinearoperator(M.numpy()))
    V = torch.randn(5, 2, dtype=torch.float64)
    assert ref.rel_err(sp @ V, M @ V) <= 1e-14
    with pytest.raises(ValueError, match="square"):
        as_operator(torch.ones(2, 3).numpy())


def test_float32_model():
    model, batches = make_batches("cnn", "ce")
    model32 = model.float()
    data = [(x.float(), y) for x, y in batches]
    H = Hessian(model32, nn.CrossEntropyLoss(), data)
    assert H.dtype == torch.float32
    model64, batches64 = make_batches("cnn", "ce")
    v = torch.randn(H.shape[0], dtype=torch.float64)
    exact = Hessian(model64, nn.CrossEntropyLoss(), batches64) @ v
    assert ref.rel_err((H @ v.float()).double(), exact) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("Op", OPERATORS)
def test_cuda_model_with_cpu_data(Op):
    model, batches = make_batches("cnn", "ce")
    loss_fn = loss_module("ce", "mean")
    expected = Op(model, loss_fn, batches).to_dense()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cuda_model = model.cuda()
    op = Op(cuda_model, loss_fn, batches)  # data left on the CPU is moved batch by batch
    assert op.device.type == "cuda"
    assert ref.rel_err(op.to_dense().cpu(), expected) <= 1e-10
