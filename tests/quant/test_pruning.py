"""quant.prune against a dense float64 Optimal Brain Surgeon (explicit inverse of F, the same rule)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import quant
from tests import cases

f64 = torch.float64


def _model(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).to(f64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=f64))
    return model


def _data(num_batches=24, n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, generator=g, dtype=f64), torch.randint(0, 4, (n,), generator=g))
            for _ in range(num_batches)]


def _grads_by_autograd(model, loss_fn, data, m):
    """m per-batch gradients of the Linear weights, by plain autograd (independent of curvature)."""
    weights = [model[0].weight, model[2].weight]
    rows = []
    for x, y in data[:m]:
        gs = torch.autograd.grad(loss_fn(model(x), y), weights)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


def _dense_inverse(G, damping, block_size):
    m, d = G.shape
    F = damping * torch.eye(d, dtype=f64) + G.T @ G / m
    if block_size is not None:  # block-diagonal over consecutive chunks of the active vector
        keep = torch.zeros(d, d, dtype=torch.bool)
        for s in range(0, d, block_size):
            keep[s : s + block_size, s : s + block_size] = True
        F = torch.where(keep, F, torch.zeros((), dtype=f64))
    return torch.linalg.inv(F)


def dense_obs(model, loss_fn, data, *, sparsity, m, damping, block_size=None, recomputations=1, scope="global"):
    """Explicit-inverse OBS with the reference's combined update and geometric schedule."""
    weights = [model[0].weight, model[2].weight]
    sizes = [w.numel() for w in weights]
    d = sum(sizes)
    keep = torch.ones(d, dtype=torch.bool)
    groups = [range(0, d)] if scope == "global" else [range(0, sizes[0]), range(sizes[0], d)]
    removed_steps = []
    for step in range(1, recomputations + 1):
        G = _grads_by_autograd(model, loss_fn, data, m)
        w = torch.cat([p.detach().reshape(-1) for p in weights])
        active = [i for i in range(d) if keep[i]]
        Finv = _dense_inverse(G[:, active], damping, block_size)
        wa = w[active]
        rho = wa**2 / (2 * Finv.diagonal())
        sel = []
        for grp in groups:
            size = len(grp)
            s = sparsity if step == recomputations else 1 - (1 - sparsity) ** (step / recomputations)
            target = round(s * size)
            k = target - sum(1 for i in grp if not keep[i])
            cand = [j for j, i in enumerate(active) if i in grp]
            cand.sort(key=lambda j: (float(rho[j]), j))
            sel += cand[:k]
        sel.sort()
        u = torch.zeros(len(active), dtype=f64)
        u[sel] = wa[sel] / Finv.diagonal()[sel]
        new = wa - Finv @ u
        new[sel] = 0
        w[active] = new
        for j in sel:
            keep[active[j]] = False
        removed_steps.append([active[j] for j in sel])
        with torch.no_grad():
            weights[0].copy_(w[: sizes[0]].view_as(weights[0]))
            weights[1].copy_(w[sizes[0] :].view_as(weights[1]))
    return keep, removed_steps


@pytest.mark.parametrize("block_size", [None, 16])
@pytest.mark.parametrize("recomputations", [1, 3])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_mfac_obs_matches_dense_float64_obs(block_size, recomputations, scope):
    loss_fn = nn.CrossEntropyLoss()
    data = _data()
    model, ref = _model(), _model()
    keep_ref, _ = dense_obs(ref, loss_fn, data, sparsity=0.6, m=12, damping=1e-2, block_size=block_size,
                            recomputations=recomputations, scope=scope)
    result = quant.prune(model, loss_fn, data, sparsity=0.6, num_gradients=12, damping=1e-2,
                         block_size=block_size, recomputations=recomputations, scope=scope)
    keep = torch.cat([result.mask.masks["0"].reshape(-1), result.mask.masks["2"].reshape(-1)])
    assert torch.equal(keep, keep_ref)
    for name in ("0", "2"):
        w, w_ref = dict(model.named_children())[name].weight, dict(ref.named_children())[name].weight
        assert (w - w_ref).abs().max() < 1e-10
        assert torch.equal(result.weights[name], w.detach())
    assert len(result.steps) == recomputations
    assert result.sparsity == pytest.approx(keep.logical_not().sum().item() / keep.numel())
    if scope == "layer":
        assert result.layer_sparsity["0"] == pytest.approx(round(0.6 * 30) / 30)
        assert result.layer_sparsity["2"] == pytest.approx(round(0.6 * 24) / 24)
    # biases are never touched
    assert torch.equal(model[0].bias, ref[0].bias)


def test_precomputed_gradients_are_used_and_exactly_m_are_collected():
    loss_fn, data = nn.CrossEntropyLoss(), _data()
    model = _model()
    G = _grads_by_autograd(model, loss_fn, data, 12)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = quant.prune(a, loss_fn, data, sparsity=0.5, num_gradients=12, damping=1e-2)
    G_before = G.clone()
    rb = quant.prune(b, gradients=G, sparsity=0.5, num_gradients=12, damping=1e-2)
    assert torch.equal(G, G_before)  # the caller's gradients are not overwritten by the in-place inverse
    assert ra.mask == rb.mask
    assert (a[0].weight - b[0].weight).abs().max() < 1e-12
    # m - 1 gradients (the reference loop's defect) would give another inverse and other weights
    c = copy.deepcopy(model)
    G_defect = G.clone()
    G_defect[-1] = 0
    quant.prune(c, gradients=G_defect, sparsity=0.5, damping=1e-2)
    assert (c[0].weight - a[0].weight).abs().max() > 1e-6


def test_single_weight_obs_zeroes_and_predicts_on_a_quadratic():
    # Spec 01 C.13: on L(w) = ½ (w − w*)ᵀ F (w − w*) the OBS update hits w_q = 0 and its loss
    # increase is ρ_q when starting at w = w*.
    g = torch.Generator().manual_seed(3)
    G = torch.randn(6, 10, generator=g, dtype=f64)
    lam = 0.1
    F = lam * torch.eye(10, dtype=f64) + G.T @ G / 6
    model = nn.Sequential(nn.Linear(10, 1, bias=False)).to(f64)
    w_star = torch.randn(10, generator=g, dtype=f64)
    with torch.no_grad():
        model[0].weight.copy_(w_star[None])
    result = quant.prune(model, gradients=G, sparsity=0.1, damping=lam)
    w = model[0].weight.detach().reshape(-1)
    delta = w - w_star
    loss_increase = 0.5 * float(delta @ F @ delta)
    assert loss_increase == pytest.approx(result.predicted_loss_increase, rel=1e-10)
    (q,) = torch.nonzero(w == 0).flatten().tolist()
    Finv = torch.linalg.inv(F)
    rho = w_star**2 / (2 * Finv.diagonal())
    assert q == int(torch.argmin(rho))


def test_magnitude_baseline_and_deterministic_ties():
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -1.0, 3.0, 1.0], [0.5, 2.0, -1.0, 4.0]]))
    result = quant.prune(model, sparsity=0.5, method="magnitude")
    # |w| = 0.5 first, then the four ties at 1 broken by position: (0,0), (0,1), (0,3)
    expected = torch.tensor([[False, False, True, False], [False, True, True, True]])
    assert torch.equal(result.mask.masks["0"], expected)
    assert math.isnan(result.predicted_loss_increase)
    assert result.num_gradients == 0


def test_mask_survives_optimizer_steps_and_gradual_pruning():
    loss_fn, data = nn.CrossEntropyLoss(), _data()
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = quant.GradualPruner(model, loss_fn, data, schedule=quant.sparsity_schedule(0.8, 3), optimizer=opt,
                                 num_gradients=12, damping=1e-2)
    previous = None
    while not pruner.finished:
        result = pruner.step()
        if previous is not None:  # pruned weights stay pruned
            for name, m in previous.masks.items():
                assert not (result.mask.masks[name] & ~m).any()
        previous = result.mask
        for x, y in data[:5]:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        pruner.mask.check(model)
    assert pruner.mask.sparsity == pytest.approx(round(0.8 * 54) / 54)
    with pytest.raises(IndexError):
        pruner.step()
    pruner.remove()


def test_mask_save_load_round_trip_and_malformed_files(tmp_path):
    model = _model()
    result = quant.prune(model, sparsity=0.5, method="magnitude")
    path = tmp_path / "mask.pt"
    result.mask.save(path)
    loaded = quant.PruneMask.load(path)
    assert loaded == result.mask
    fresh = _model()
    loaded.apply(fresh)
    loaded.check(fresh)
    bad = tmp_path / "bad.pt"
    for state in [
        [1, 2],
        {"kind": "something else", "schema_version": 1, "masks": {}},
        {"kind": "quant.PruneMask", "schema_version": 99, "masks": {"0": torch.ones(2, dtype=torch.bool)}},
        {"kind": "quant.PruneMask", "schema_version": 1, "masks": {"0": torch.ones(2)}},
        {"kind": "quant.PruneMask", "schema_version": 1, "masks": {}},
    ]:
        torch.save(state, bad)
        with pytest.raises(quant.MaskFileError):
            quant.PruneMask.load(bad)
    bad.write_bytes(b"not a torch file")
    with pytest.raises(quant.MaskFileError):
        quant.PruneMask.load(bad)
    other = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).to(f64)
    with pytest.raises(quant.MaskMismatchError):
        loaded.apply(other)
    with pytest.raises(quant.MaskMismatchError):
        loaded.check(_model())


def test_tied_weights_are_pruned_once():
    p = cases.problem("tied_lm", "token_ce", "uneven")
    model = p.model
    result = quant.prune(model, p.loss_fn, p.data, sparsity=0.5, num_gradients=3, damping=1e-2)
    assert list(result.mask.masks) == ["embed", "mix"]
    assert model.head.weight is model.embed.weight
    assert result.sparsity == pytest.approx(0.5)
    assert torch.equal(model.head.weight == 0, ~result.mask.masks["embed"])


def test_frozen_layers_are_left_alone():
    p = cases.problem("frozen", "ce", "uneven")
    before = p.model[0].weight.detach().clone()
    result = quant.prune(p.model, p.loss_fn, p.data, sparsity=0.5, num_gradients=3, damping=1e-2)
    assert list(result.mask.masks) == ["2"]
    assert torch.equal(p.model[0].weight, before)
    with pytest.raises(ValueError, match="does not require grad"):
        quant.prune(p.model, p.loss_fn, p.data, sparsity=0.5, layers=["0"], num_gradients=3)


@pytest.mark.parametrize("layout", ["uneven", "shuffled"])
def test_called_twice_and_layouts_match_the_batch_gradients(layout):
    p = cases.problem("called_twice", "ce", layout)
    model = p.model
    weights = list(quant.prunable_weights(model).values())
    rows = []
    for x, y in p.data:  # the order the pruner will read (ShuffledBatches draws one order per pass)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(p.loss_fn(model(x), y), weights)]))
    ref = copy.deepcopy(model)
    quant.prune(ref, gradients=torch.stack(rows), sparsity=0.4, damping=1e-2)
    if layout == "shuffled":  # the pruner's own pass sees the next shuffled order; compare sets instead
        result = quant.prune(model, p.loss_fn, p.batches, sparsity=0.4, num_gradients=3, damping=1e-2)
    else:
        result = quant.prune(model, p.loss_fn, p.data, sparsity=0.4, num_gradients=3, damping=1e-2)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert (a - b).abs().max() < 1e-10
    assert result.sparsity == pytest.approx(round(0.4 * result.mask.num_weights) / result.mask.num_weights)


def test_bad_options():
    model = _model()
    with pytest.raises(ValueError, match="sparsity"):
        quant.prune(model, sparsity=1.0, method="magnitude")
    with pytest.raises(ValueError, match="method"):
        quant.prune(model, sparsity=0.5, method="random")
    with pytest.raises(ValueError, match="loss_fn and data"):
        quant.prune(model, sparsity=0.5)
    quant.prune(model, sparsity=0.5, method="magnitude")
    with pytest.raises(ValueError, match="un-prune"):
        mask = quant.prune(model, sparsity=0.5, method="magnitude").mask
        quant.prune(model, sparsity=0.2, method="magnitude", mask=mask)


def test_train_mode_model_is_pruned_with_eval_mode_gradients_and_its_mode_restored():
    p = cases.problem("batchnorm_train", "ce", "uneven")
    model = p.model
    running = model[1].running_mean.clone()
    eval_copy = copy.deepcopy(model).eval()
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(p.loss_fn(eval_copy(x), y),
                                                                  [eval_copy[0].weight, eval_copy[3].weight])])
            for x, y in p.batches]
    quant.prune(eval_copy, gradients=torch.stack(rows), sparsity=0.5, damping=1e-2)
    quant.prune(model, p.loss_fn, p.data, sparsity=0.5, num_gradients=3, damping=1e-2)
    assert model.training and model[1].training
    assert torch.equal(model[1].running_mean, running)  # eval mode: BatchNorm statistics untouched
    assert (model[0].weight - eval_copy[0].weight).abs().max() < 1e-10


def test_mixed_dtypes_magnitude_works_and_mfac_says_why_not():
    p = cases.problem("mixed_dtype", "ce", "uneven")
    result = quant.prune(p.model, sparsity=0.5, method="magnitude")
    assert p.model.head.weight.dtype == f64 and result.sparsity == pytest.approx(0.5)
    with pytest.raises(TypeError, match="mixed dtypes"):
        quant.prune(p.model, p.loss_fn, p.data, sparsity=0.6, num_gradients=3)


def test_a_non_positive_inverse_diagonal_is_an_error_not_a_ranking():
    # float32 gradients spanning all but one coordinate, damping tiny against them: the dual form's
    # 1 − ‖W_q‖² is ~1e-15 in exact arithmetic and float32 rounding makes some of it negative
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 1, bias=False))
    G = 1e3 * torch.randn(49, 50, generator=g)
    G[:, -1] = 0
    with pytest.raises(ValueError, match="raise the damping"):
        quant.prune(model, gradients=G, sparsity=0.5, damping=1e-6)
    result = quant.prune(model, gradients=G.double(), sparsity=0.5, damping=1e-6, dtype=f64)
    assert result.num_gradients == 49
