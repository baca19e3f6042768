"""The losses people train with: any loss, its own normalizer, token-level LM losses with padding,
and models that are not plain ``Sequential``s (no_grad parts, train-mode BatchNorm, dropout,
weight_norm, tied weights, torch.compile).

Every operator must be the curvature of exactly the loss the user wrote over ALL the data, whatever
the split into batches; references are dense float64 matrices from reverse-mode autograd
(``torch.autograd.functional``), which has the same ``no_grad`` semantics as ``loss.backward()``.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from curvature import GGN, EmpiricalFisher, Fisher, Hessian
from curvature.losses import TokenCrossEntropyLoss

TOL = 1e-10
DT = torch.float64


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# -- dense references ------------------------------------------------------------------------------
def _functional(model, inputs, outputs=None):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def f(th):
        parts = torch.split(th, [s.numel() for s in shapes])
        mapping = {n: t.view(s) for n, t, s in zip(names, parts, shapes)}
        out = functional_call(model, mapping, (inputs,))
        return outputs(out) if outputs is not None else out

    return f, theta


def dense_hessian(model, loss_fn, x, y, outputs=None):
    f, theta = _functional(model, x, outputs)
    return torch.autograd.functional.hessian(lambda th: loss_fn(f(th), y), theta)


def dense_ggn(model, loss_fn, x, y, outputs=None):
    f, theta = _functional(model, x, outputs)
    out = f(theta).detach()
    J = torch.autograd.functional.jacobian(f, theta).reshape(out.numel(), -1)
    HL = torch.autograd.functional.hessian(lambda o: loss_fn(o, y), out).reshape(out.numel(), out.numel())
    return J.T @ HL @ J


def dense_unit_ef(model, unit_loss, x, y, normalizer, outputs=None):
    """(1/Z) sum_u g_u g_u^T from per-unit gradients (unit_loss(out, y) -> vector of unit losses)."""
    f, theta = _functional(model, x, outputs)
    G = torch.autograd.functional.jacobian(lambda th: unit_loss(f(th), y).reshape(-1), theta)
    return G.T @ G / normalizer


def concat(batches):
    xs, ys = zip(*batches)
    return torch.cat(xs), torch.cat(ys)


def mlp(seed=0, d_in=3, d_out=2):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 4), nn.Tanh(), nn.Linear(4, d_out)).to(DT)


def regression_batches(seed=1, sizes=(3, 5), d_in=3, d_out=2):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d_in, generator=gen, dtype=DT), torch.randn(n, d_out, generator=gen, dtype=DT))
            for n in sizes]


# -- any loss twice differentiable in the outputs -------------------------------------------------
GENERIC_LOSSES = {
    "huber": nn.HuberLoss(delta=0.5),
    "mse_lambda": lambda o, t: F.mse_loss(o, t),
    "smooth_l1_module": nn.SmoothL1Loss(beta=2.0),
    "quartic_lambda": lambda o, t: ((o - t) ** 4).mean(),
    "kl_batchmean": lambda o, t: F.kl_div(F.log_softmax(o, -1), F.softmax(t, -1), reduction="batchmean"),
}


@pytest.mark.parametrize("name", list(GENERIC_LOSSES))
def test_generic_losses_over_uneven_batches(name):
    loss_fn = GENERIC_LOSSES[name]
    model, batches = mlp(), regression_batches()
    x, y = concat(batches)
    G = GGN(model, loss_fn, batches)
    assert rel_err(G.to_dense(), dense_ggn(model, loss_fn, x, y)) <= TOL
    H = Hessian(model, loss_fn, batches)
    assert rel_err(H.to_dense(), dense_hessian(model, loss_fn, x, y)) <= TOL


def test_kl_div_module_batchmean():
    model = nn.Sequential(mlp(), nn.LogSoftmax(-1))
    batches = [(x, F.softmax(t, -1)) for x, t in regression_batches()]
    x, y = concat(batches)
    loss_fn = nn.KLDivLoss(reduction="batchmean")
    assert rel_err(GGN(model, loss_fn, batches).to_dense(), dense_ggn(model, loss_fn, x, y)) <= TOL


@pytest.mark.parametrize("backend", ["forward_over_reverse", "auto"])
def test_hessian_forward_over_reverse_falls_back_on_mse(backend, caplog):
    model, batches = mlp(), regression_batches()
    x, y = concat(batches)
    H = Hessian(model, nn.MSELoss(), batches, backend=backend)
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    with caplog.at_level("INFO", logger="curvature"):
        HV = H @ V
    assert rel_err(HV, dense_hessian(model, nn.MSELoss(), x, y) @ V) <= TOL


def test_elementwise_mean_lambda_empirical_fisher_uses_the_element_count():
    model, batches = mlp(), regression_batches(sizes=(8,))
    x, y = concat(batches)
    E_lambda = EmpiricalFisher(model, lambda o, t: F.mse_loss(o, t), batches).to_dense()
    E_module = EmpiricalFisher(model, nn.MSELoss(), batches).to_dense()
    expected = dense_unit_ef(model, lambda o, t: ((o - t) ** 2).sum(-1), x, y, normalizer=y.numel())
    assert rel_err(E_module, expected) <= TOL
    assert rel_err(E_lambda, expected) <= TOL


# -- declared and undeclared reductions ------------------------------------------------------------
def test_declared_reduction_that_contradicts_the_loss_raises():
    model, batches = mlp(), regression_batches()
    v = torch.ones(sum(p.numel() for p in model.parameters()), dtype=DT)
    for Op in (GGN, Hessian, EmpiricalFisher):
        with pytest.raises(ValueError, match="contradicts"):
            Op(model, nn.MSELoss(), batches, reduction="sum") @ v
        with pytest.raises(ValueError, match="contradicts"):
            Op(model, lambda o, t: F.mse_loss(o, t), batches, reduction="sum") @ v
        with pytest.raises(ValueError, match="contradicts"):
            Op(model, lambda o, t: F.mse_loss(o, t, reduction="sum"), batches, reduction="mean") @ v
    G = GGN(model, nn.MSELoss(reduction="sum"), batches, reduction="sum")
    x, y = concat(batches)
    assert rel_err(G.to_dense(), dense_ggn(model, nn.MSELoss(reduction="sum"), x, y)) <= TOL


def classification_batches(seed=2, sizes=(3, 6), classes=3):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, generator=gen, dtype=DT), torch.randint(0, classes, (n,), generator=gen))
            for n in sizes]


@pytest.mark.parametrize("form", ["partial", "lambda", "module_sum"])
def test_sum_losses_written_any_way_are_sums(form):
    loss_fn = {
        "partial": functools.partial(F.cross_entropy, reduction="sum"),
        "lambda": lambda o, t: F.cross_entropy(o, t, reduction="sum"),
        "module_sum": lambda o, t: nn.CrossEntropyLoss(reduction="none")(o, t).sum(),
    }[form]
    model, batches = mlp(d_out=3), classification_batches()
    x, y = concat(batches)
    for Op, ref in ((GGN, dense_ggn), (Hessian, dense_hessian)):
        assert rel_err(Op(model, loss_fn, batches).to_dense(), ref(model, loss_fn, x, y)) <= TOL


def test_a_normalizer_the_loss_hides_must_be_declared():
    model, batches = mlp(), regression_batches()
    x, y = concat(batches)

    def hidden_mean(o, t):
        return ((o - t) ** 2).sum() / len(o)

    with pytest.raises(ValueError, match="declare it"):
        GGN(model, hidden_mean, batches) @ torch.ones(GGN(model, nn.MSELoss(), batches).shape[0], dtype=DT)
    G = GGN(model, hidden_mean, batches, reduction=lambda inputs, targets: len(targets))
    assert rel_err(G.to_dense(), dense_ggn(model, hidden_mean, x, y)) <= TOL
    E = EmpiricalFisher(model, hidden_mean, [concat(batches)], reduction=lambda inputs, targets: len(targets))
    expected = dense_unit_ef(model, lambda o, t: ((o - t) ** 2).sum(-1), x, y, normalizer=len(y))
    assert rel_err(E.to_dense(), expected) <= TOL


# -- subclasses of recognised losses ---------------------------------------------------------------
class Focal(nn.CrossEntropyLoss):
    def forward(self, input, target):
        logp = F.log_softmax(input, -1).gather(1, target[:, None])[:, 0]
        return (-(1 - logp.exp()) ** 2 * logp).mean()


class ScaledMSE(nn.MSELoss):
    def forward(self, input, target):
        return 10.0 * super().forward(input, target)


class PlainSubclass(nn.CrossEntropyLoss):
    """No forward of its own: the closed form applies."""


@pytest.mark.parametrize("loss_fn, kind", [(Focal(), "ce"), (ScaledMSE(), "mse"), (PlainSubclass(), "ce")])
def test_subclasses_get_their_own_curvature(loss_fn, kind):
    model = mlp(d_out=3)
    batches = classification_batches() if kind == "ce" else regression_batches(d_out=3)
    x, y = concat(batches)
    G = GGN(model, loss_fn, batches)
    assert G.loss_info.kind == ("cross_entropy" if isinstance(loss_fn, PlainSubclass) else "generic")
    assert rel_err(G.to_dense(), dense_ggn(model, loss_fn, x, y)) <= TOL


# -- token-level language-model losses with padding ------------------------------------------------
V_SIZE, SEQ = 5, 4


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Embedding(V_SIZE, 3)
        self.mix = nn.Linear(3, 3)
        self.head = nn.Linear(3, V_SIZE)

    def forward(self, tokens):
        h = torch.tanh(self.embed(tokens))
        h = torch.tanh(self.mix(torch.cumsum(h, dim=1) / torch.arange(1, tokens.shape[1] + 1)[:, None]))
        return self.head(h)  # (N, S, V)


def lm_batches():
    """Uneven valid-token counts per batch (padding with -100), batch sizes 2 and 3."""
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, V_SIZE, (5, SEQ), generator=gen)
    labels = tokens.clone()
    labels[0, 2:] = -100
    labels[1, 1:] = -100
    labels[3, 3:] = -100
    return [(tokens[:2], labels[:2]), (tokens[2:], labels[2:])]


def hf_style(logits, labels):
    """What a Hugging Face causal LM computes from labels, written as a lambda."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, V_SIZE), labels[:, 1:].reshape(-1), ignore_index=-100)


WEIGHTS = torch.tensor([0.5, 2.0, 1.0, 1.5, 0.7], dtype=DT)
LM_LOSSES = {
    "token_ce_shift": (TokenCrossEntropyLoss(shift=True), None),
    "token_ce_smoothing": (TokenCrossEntropyLoss(label_smoothing=0.1), None),
    "hf_lambda": (hf_style, None),
    "ce_weight_smoothing": (
        nn.CrossEntropyLoss(weight=WEIGHTS, ignore_index=-100, label_smoothing=0.1),
        lambda out: out.transpose(1, 2),
    ),
}


@pytest.mark.parametrize("name", list(LM_LOSSES))
def test_token_losses_batch_split_equals_one_big_batch(name):
    loss_fn, outputs = LM_LOSSES[name]
    model = TinyLM().to(DT)
    batches = lm_batches()
    x, y = concat(batches)
    ggn = dense_ggn(model, loss_fn, x, y, outputs)
    hess = dense_hessian(model, loss_fn, x, y, outputs)
    G = GGN(model, loss_fn, batches, outputs=outputs)
    if name != "hf_lambda":
        assert G.loss_info.kind == "cross_entropy"  # the closed form, not autodiff
    assert rel_err(G.to_dense(), ggn) <= TOL
    assert rel_err(Hessian(model, loss_fn, batches, outputs=outputs).to_dense(), hess) <= TOL
    if name == "hf_lambda":  # a lambda names no likelihood to sample from
        with pytest.raises(ValueError, match="use GGN"):
            Fisher(model, loss_fn, batches)
    elif name != "ce_weight_smoothing":  # a weighted loss is no likelihood
        assert rel_err(Fisher(model, loss_fn, batches, outputs=outputs).to_dense(), ggn) <= TOL
    E_split = EmpiricalFisher(model, loss_fn, batches, outputs=outputs).to_dense()
    E_one = EmpiricalFisher(model, loss_fn, [(x, y)], outputs=outputs).to_dense()
    assert rel_err(E_split, E_one) <= TOL


def test_token_empirical_fisher_is_per_token():
    model = TinyLM().to(DT)
    x, y = concat(lm_batches())
    E = EmpiricalFisher(model, TokenCrossEntropyLoss(shift=True), (x, y)).to_dense()

    def unit(o, t):
        return F.cross_entropy(o[:, :-1].reshape(-1, V_SIZE), t[:, 1:].reshape(-1), reduction="none")

    expected = dense_unit_ef(model, unit, x, y, normalizer=float((y[:, 1:] != -100).sum()))
    assert rel_err(E, expected) <= TOL
    E_hf = EmpiricalFisher(model, hf_style, (x, y)).to_dense()  # per sequence for a generic loss
    assert torch.isfinite(E_hf).all()


def test_mc_fisher_draws_no_labels_for_ignored_tokens():
    model = TinyLM().to(DT)
    batches = lm_batches()
    x, y = concat(batches)
    Fmc = Fisher(model, TokenCrossEntropyLoss(shift=True), batches, mc_samples=4000,
                 generator=torch.Generator().manual_seed(0)).to_dense()
    ggn = dense_ggn(model, TokenCrossEntropyLoss(shift=True), x, y)
    assert rel_err(Fmc, ggn) < 0.08


# -- models whose reverse mode is not forward mode ------------------------------------------------
class NoGradParts(nn.Module):
    """A probe on a backbone computed under no_grad, and a scale computed under no_grad."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.backbone = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        with torch.no_grad():
            scale = self.head.weight.abs().max()
        h = torch.tanh(self.backbone(x))
        with torch.no_grad():
            frozen = torch.tanh(self.backbone(x))
        return self.head(h + frozen) / scale


@pytest.mark.parametrize("Op", [GGN, Fisher, EmpiricalFisher])
def test_jacobian_products_respect_no_grad(Op):
    model = NoGradParts().to(DT)
    batches = regression_batches()
    x, y = concat(batches)
    D = Op(model, nn.MSELoss(), batches).to_dense()
    assert rel_err(D, D.T) <= TOL
    if Op is not EmpiricalFisher:
        assert rel_err(D, dense_ggn(model, nn.MSELoss(), x, y)) <= TOL
    else:
        expected = dense_unit_ef(model, lambda o, t: ((o - t) ** 2).sum(-1), x, y, normalizer=y.numel())
        assert rel_err(D, expected) <= TOL


def test_hessian_forward_over_reverse_respects_no_grad():
    model = NoGradParts().to(DT)
    batches = regression_batches()
    x, y = concat(batches)
    def loss_fn(o, t):  # forward AD has formulas for all of these ops
        return ((o - t) ** 2).mean() * 0.5 + (o**3).mean() * 0.1

    expected = dense_hessian(model, loss_fn, x, y)
    V = torch.randn(expected.shape[0], 4, generator=torch.Generator().manual_seed(0), dtype=DT)
    with pytest.warns(UserWarning, match="no_grad"):
        HV = Hessian(model, loss_fn, batches, backend="forward_over_reverse") @ V
    assert rel_err(HV, expected @ V) <= TOL


# -- train-mode BatchNorm and dropout --------------------------------------------------------------
class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.bn(self.fc(x))))


@pytest.mark.parametrize("Op", [GGN, Fisher, EmpiricalFisher])
def test_train_mode_batchnorm_products(Op):
    model = BNNet().to(DT).train()
    (x, y), = regression_batches(sizes=(6,))
    before = model.bn.running_mean.clone()
    with pytest.warns(UserWarning, match="allow_train_mode"):
        op = Op(model, nn.MSELoss(), (x, y), allow_train_mode=True)
    D = op.to_dense()
    assert torch.equal(model.bn.running_mean, before)
    if Op is not EmpiricalFisher:
        reference_model = BNNet().to(DT).train()  # same seed, its own buffers
        assert rel_err(D, dense_ggn(reference_model, nn.MSELoss(), x, y)) <= TOL


class DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(F.dropout(torch.tanh(self.a(x)), 0.5, self.training))


@pytest.mark.parametrize("backend", ["vmap", "loop", "auto"])
def test_functional_dropout_in_train_mode(backend):
    model = DropoutNet().to(DT).train()
    batches = regression_batches()
    with pytest.warns(UserWarning):
        G = GGN(model, nn.MSELoss(), batches, allow_train_mode=True, backend=backend)
    D = G.to_dense()  # one product: one mask per batch for J and J^T alike
    assert rel_err(D, D.T) <= TOL
    assert torch.linalg.eigvalsh(D).min() >= -1e-12 * torch.linalg.eigvalsh(D).max()


# -- weight_norm, tied weights, torch.compile -----------------------------------------------------
def test_weight_norm_hessian_is_exact():
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(8)
    model = nn.Sequential(weight_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 2)).to(DT).eval()
    batches = regression_batches()
    x, y = concat(batches)
    H = Hessian(model, nn.MSELoss(), batches, backend="loop")
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    HV = H @ V
    # Central finite differences of the (exact, first-order) gradient: error O(eps^2).
    f, theta = _functional(model, x)

    def grad_at(th):
        th = th.clone().requires_grad_(True)
        return torch.autograd.grad(nn.MSELoss()(f(th), y), th)[0]

    errors = []
    for eps in (1e-3, 1e-4):
        fd = torch.stack([(grad_at(theta + eps * v) - grad_at(theta - eps * v)) / (2 * eps) for v in V.T], 1)
        errors.append(rel_err(HV, fd))
    # The error is the O(eps^2) truncation of the finite differences: it shrinks 100-fold.
    assert errors[1] <= 1e-6 and errors[1] <= errors[0] / 50


def test_tied_parameter_second_name():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.lm_head = nn.Linear(3, 5, bias=False)
            self.lm_head.weight = self.embed.weight

        def forward(self, t):
            return self.lm_head(torch.tanh(self.embed(t)))

    torch.manual_seed(9)
    model = Tied().to(DT)
    data = (torch.randint(0, 5, (4, 3)), torch.randint(0, 5, (4, 3)))
    loss = TokenCrossEntropyLoss()
    H1 = Hessian(model, loss, data, params=["lm_head.weight"]).to_dense()
    H2 = Hessian(model, loss, data, params=["embed.weight"]).to_dense()
    assert torch.equal(H1, H2)
    G = GGN(model, loss, data, params=["lm_head.weight"])
    assert [b.name for b in G.blocks] == ["embed.weight"]  # listed under its first name


def test_compiled_model_is_analysed_through_its_original(caplog):
    model, batches = mlp(), regression_batches()
    compiled = torch.compile(model)
    with caplog.at_level("INFO", logger="curvature"):
        H = Hessian(compiled, nn.MSELoss(), batches)
    assert "torch.compile" in caplog.text
    V = torch.randn(H.shape[0], 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    for Op in (Hessian, GGN, EmpiricalFisher):
        assert rel_err(Op(compiled, nn.MSELoss(), batches) @ V, Op(model, nn.MSELoss(), batches) @ V) <= 1e-14


# -- clear errors ----------------------------------------------------------------------------------
def test_clear_errors_for_bad_losses_and_shapes():
    model, batches = mlp(), regression_batches()
    d = sum(p.numel() for p in model.parameters())
    v = torch.ones(d, dtype=DT)
    with pytest.raises(TypeError, match="differentiable"):
        GGN(model, lambda o, t: (o.argmax(-1) == t.argmax(-1)).sum(), batches) @ v
    with pytest.raises(ValueError, match="do not match targets"):
        GGN(model, nn.MSELoss(), [(x, y[:, :1]) for x, y in batches]) @ v
    with pytest.raises(ValueError, match="class targets"):
        bad = [(x, torch.zeros(len(x), 2, dtype=torch.long)) for x, _ in batches]
        G = GGN(mlp(d_out=3), nn.CrossEntropyLoss(), bad)
        G @ torch.ones(G.shape[0], dtype=DT)
    with pytest.raises(ValueError, match="do not match targets"):
        Hessian(model, nn.MSELoss(), [(x, y[:, :1]) for x, y in batches]) @ v


def test_output_space_auto_backend_is_a_measured_choice():
    model, batches = mlp(), regression_batches()
    G = GGN(model, nn.MSELoss(), batches)
    assert G.backend_choice(1).backend == "loop" and G.backend_choice(4) is None
    V = torch.randn(G.shape[0], 4, generator=torch.Generator().manual_seed(0), dtype=DT)
    first = G @ V
    assert G.backend_choice(4).backend in ("loop", "vmap")
    # The first column came by forward mode, the repeat by the double backward: equal to rounding.
    torch.testing.assert_close(G @ V, first, rtol=1e-13, atol=1e-15)
    D = GGN(model, nn.MSELoss(), batches, deterministic=True)
    assert D.backend_choice(4).backend == "loop"
    assert torch.equal(D @ V, D @ V)  # deterministic=True: one form for every column, the same bits


def test_generic_normalizer_is_remembered_per_batch():
    """A lambda's normalizer costs one extra no-grad forward per distinct batch, not per product."""
    model, batches = mlp(), regression_batches()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    G = GGN(model, lambda o, t: F.mse_loss(o, t), batches, cache_graph=False)
    v = torch.ones(G.shape[0], dtype=DT)
    G @ v
    first = len(calls)
    G @ v
    assert len(calls) - first == len(batches)  # the products' own forwards only


def test_weighted_bce_closed_form_and_weighted_nll_with_padding():
    model = mlp(d_out=3)
    gen = torch.Generator().manual_seed(11)
    batches = [(torch.randn(n, 3, generator=gen, dtype=DT), (torch.rand(n, 3, generator=gen) < 0.4).to(DT))
               for n in (3, 5)]
    x, y = concat(batches)
    bce = nn.BCEWithLogitsLoss(weight=torch.tensor([0.5, 1.0, 2.0], dtype=DT),
                               pos_weight=torch.tensor([3.0, 1.0, 0.2], dtype=DT))
    G = GGN(model, bce, batches)
    assert G.loss_info.kind == "bce_with_logits"
    assert rel_err(G.to_dense(), dense_ggn(model, bce, x, y)) <= TOL
    with pytest.raises(ValueError, match="likelihood"):
        Fisher(model, bce, batches)
    # A class-weighted NLL with ignored targets, as a lambda: its normalizer is the summed
    # weights of the valid targets, which differ between the batches.
    w = torch.tensor([0.3, 1.0, 2.5], dtype=DT)

    def nll(o, t):
        return F.nll_loss(F.log_softmax(o, -1), t, weight=w, ignore_index=-1)

    labels = [torch.tensor([0, -1, 2]), torch.tensor([1, 2, -1, -1, 0])]
    batches = [(xb, t) for (xb, _), t in zip(batches, labels)]
    x, y = concat(batches)
    for Op, ref in ((GGN, dense_ggn), (Hessian, dense_hessian)):
        assert rel_err(Op(model, nll, batches).to_dense(), ref(model, nll, x, y)) <= TOL
