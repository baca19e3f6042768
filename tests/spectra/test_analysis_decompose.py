"""spectra.analysis.decompose: H = G + R against dense float64 references on tiny models."""

from __future__ import annotations

import json

import matplotlib
import pytest
import torch
from torch import nn

from curvature import GGN, Hessian
from spectra import analysis
from tests.curvature.reference import dense_ggn, dense_hessian

matplotlib.use("Agg")


def tiny_classifier(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(24, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    return model.eval(), nn.CrossEntropyLoss(), (x, y)


def names(model):
    return [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("seed", [0, 1])
def test_g_plus_r_equals_h_to_rounding(seed):
    model, loss_fn, data = tiny_classifier(seed)
    H_ref = dense_hessian(model, loss_fn, [data], names(model))
    G_ref = dense_ggn(model, loss_fn, [data], names(model))
    H, G = Hessian(model, loss_fn, data), GGN(model, loss_fn, data)
    R = analysis.ResidualOperator(H, G)
    R_dense = R.to_dense()
    scale = float(H_ref.abs().max())
    assert float((G.to_dense() + R_dense - H_ref).abs().max()) <= 1e-12 * scale
    assert float((R_dense - (H_ref - G_ref)).abs().max()) <= 1e-12 * scale
    assert float((R_dense - R_dense.T).abs().max()) <= 1e-12 * scale
    # The residual of an untrained tanh network is far from zero (so the check above has teeth).
    assert float(R_dense.abs().max()) > 1e-3 * scale


def test_decomposition_matches_dense_eigenvalues_and_traces():
    model, loss_fn, data = tiny_classifier(0)
    H_ref = dense_hessian(model, loss_fn, [data], names(model))
    G_ref = dense_ggn(model, loss_fn, [data], names(model))
    k = 3
    dec = analysis.decompose(model, loss_fn, data, k=k, tol=1e-10, generator=torch.Generator().manual_seed(0))
    for name, ref in (("H", H_ref), ("G", G_ref), ("R", H_ref - G_ref)):
        ev = torch.linalg.eigvalsh(ref)
        t = dec.term(name)
        torch.testing.assert_close(t.top, ev.flip(0)[:k], rtol=0, atol=1e-8 * float(ev.abs().max()))
        atol = 1e-8 * float(ev.abs().max())
        if name == "G":
            # G is singular with a multiple zero eigenvalue; single-vector Lanczos finds one copy
            # of it, so only check that the values found are eigenvalues and the smallest is 0.
            assert abs(float(t.bottom[0]) - float(ev[0])) <= atol
            assert float((t.bottom[:, None] - ev[None, :]).abs().min(1).values.max()) <= atol
        else:
            torch.testing.assert_close(t.bottom, ev[:k], rtol=0, atol=atol)
        # d = 43 <= trace_matvecs: the traces are exact.
        assert t.trace == pytest.approx(float(torch.trace(ref)), rel=1e-10, abs=1e-12)
    # x^T G x + x^T R x = λ for the eigenvectors of H; G ⪰ 0, so negatives come from R.
    torch.testing.assert_close(dec.top_split.sum(1), dec.term("H").top, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(dec.bottom_split.sum(1), dec.term("H").bottom, rtol=1e-8, atol=1e-10)
    assert bool((dec.top_split[:, 0] >= -1e-12).all())
    if float(dec.term("H").bottom[0]) < 0:
        assert dec.negative_carrier == "R"
    d = dec.to_dict()
    json.dumps(d)
    assert [t["name"] for t in d["terms"]] == ["H", "G", "R"]
    axes = dec.plot()
    assert len(axes) == 2
    import matplotlib.pyplot as plt

    plt.close("all")


def test_residual_vanishes_for_linear_model_with_mse():
    g = torch.Generator().manual_seed(3)
    model = nn.Linear(5, 2).double()
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = torch.randn(30, 2, generator=g, dtype=torch.float64)
    R = analysis.ResidualOperator(Hessian(model, nn.MSELoss(), (x, y)), GGN(model, nn.MSELoss(), (x, y)))
    assert float(R.to_dense().abs().max()) <= 1e-13
    dec = analysis.decompose(model, nn.MSELoss(), (x, y), k=2, generator=g)
    r = dec.term("R")
    assert float(r.top.abs().max()) <= 1e-12 and float(r.bottom.abs().max()) <= 1e-12
    assert abs(r.trace) <= 1e-12
    assert dec.outlier_carrier == "G" and dec.negative_carrier == "none"


def test_difference_operator_checks_its_operands():
    A = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="same shape"):
        analysis.DifferenceOperator(A, torch.eye(4, dtype=torch.float64))
    with pytest.raises(TypeError, match="same dtype"):
        analysis.DifferenceOperator(A, torch.eye(3, dtype=torch.float32))


def test_progress_shows_each_solve_and_changes_nothing(capsys):
    model, loss, data = tiny_classifier()
    quiet = analysis.decompose(model, loss, data, k=2, generator=torch.Generator().manual_seed(0))
    assert capsys.readouterr().err == ""
    shown = analysis.decompose(model, loss, data, k=2, generator=torch.Generator().manual_seed(0), progress=True)
    err = capsys.readouterr().err
    assert [t.top.tolist() for t in shown.terms] == [t.top.tolist() for t in quiet.terms]
    assert "eigsh (LA, k=2)" in err and "eigsh (SA, k=2)" in err and "trace" in err
