"""Bulk + outliers on a classifier trained on scikit-learn's digits (C = 10 classes).

Fixed setting (the count drifts with architecture and training time, so it is pinned here):
a 64→32→10 ReLU MLP in float64, weights N(0, 1/fan_in) and zero biases drawn from
``torch.Generator().manual_seed(0)``, inputs scaled by 1/16, trained by full-batch SGD
(lr 0.5, momentum 0.9) for 30 steps on all 1797 images (training accuracy 0.974). There the
Hessian and the GGN both show 9 = C − 1 outliers (exact dense check, gap score 46).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvature import GGN, Hessian
from spectra import analysis

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def trained_digits():
    from sklearn.datasets import load_digits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float64)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / p.shape[1] ** 0.5)
            else:
                p.zero_()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(30):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    model.eval()
    torch.set_num_threads(before)
    return model, loss_fn, (X, y)


def test_outlier_count_near_number_of_classes_and_carried_by_ggn(trained_digits):
    model, loss_fn, data = trained_digits
    with torch.no_grad():
        acc = float((model(data[0]).argmax(1) == data[1]).double().mean())
    assert acc > 0.95
    rep_h = analysis.outliers(Hessian(model, loss_fn, data), num_classes=10, generator=torch.Generator().manual_seed(1))
    rep_g = analysis.outliers(GGN(model, loss_fn, data), num_classes=10, generator=torch.Generator().manual_seed(1))
    for rep in (rep_h, rep_g):
        assert rep.conclusive
        assert abs(rep.count - 10) <= 1
        assert rep.matches in ("C", "C-1")
        assert rep.cut_score > 20
    # The Hessian has some negative mass (from R); the GGN none.
    assert rep_h.negative_mass > 0 and rep_g.negative_mass == 0.0
    # G carries the outliers: its top values coincide with H's to 1%.
    k = rep_h.count
    torch.testing.assert_close(rep_g.eigenvalues[:k], rep_h.eigenvalues[:k], rtol=0.01, atol=0)
    dec = analysis.decompose(model, loss_fn, data, k=k, tol=1e-5, max_iter=300,
                             generator=torch.Generator().manual_seed(2))
    assert dec.outlier_carrier == "G"
    assert float(dec.ggn_share_of_top.min()) > 0.95
    # The residual is small at the top and carries the negative eigenvalues (G ⪰ 0).
    assert float(dec.term("H").bottom[0]) < 0
    assert dec.negative_carrier == "R"
    assert float(dec.term("R").top[0]) < 0.05 * float(dec.term("H").top[0])
