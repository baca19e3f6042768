"""spectra.analysis.outliers: planted outliers on spiked Wishart matrices, the gap rule, bad input."""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import pytest
import torch

import spectra
from spectra import analysis

matplotlib.use("Agg")

N = 1000
SPIKES = (8.0, 6.0, 4.5)  # additive spikes; with γ = 1 the outliers sit near θ²/(θ − 1)


def spiked_wishart(seed: int, spikes=SPIKES, n: int = N) -> torch.Tensor:
    """``ZZᵀ/n`` (Marchenko–Pastur bulk on [0, 4]) plus a rank-``len(spikes)`` spike."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = Z @ Z.T / n
    if spikes:
        Q, _ = torch.linalg.qr(torch.randn(n, len(spikes), generator=g, dtype=torch.float64))
        A = A + (Q * torch.tensor(spikes, dtype=torch.float64)) @ Q.T
    return (A + A.T) / 2


@pytest.fixture(scope="module")
def planted():
    return {seed: spiked_wishart(seed) for seed in range(4)}


@pytest.mark.parametrize("seed", range(4))
def test_planted_count_and_bulk_edge(planted, seed):
    A = planted[seed]
    exact = torch.linalg.eigvalsh(A).flip(0)
    rep = analysis.outliers(A, generator=torch.Generator().manual_seed(100 + seed))
    assert rep.count == len(SPIKES)
    assert rep.conclusive
    # The bulk edge is a converged Ritz value: it equals the 4th eigenvalue to 1e-6 relative,
    # and lies within 3% of the Marchenko–Pastur edge (1 + √γ)² = 4.
    assert abs(rep.bulk_edge - float(exact[3])) <= 1e-6 * float(exact[3])
    assert abs(rep.bulk_edge - 4.0) <= 0.03 * 4.0
    torch.testing.assert_close(rep.outliers, exact[:3], rtol=1e-8, atol=0)
    # Outliers near θ²/(θ − 1) (finite-n fluctuations of a few %).
    theory = np.array([s * s / (s - 1) for s in SPIKES])
    assert np.all(np.abs(rep.outliers.numpy() / theory - 1) < 0.03)
    # Exact trace (d <= trace_matvecs would be exact; here Hutchinson/XTrace within 5%).
    share = float(exact[:3].sum() / torch.trace(A))
    assert rep.outlier_share == pytest.approx(share, rel=0.05)
    assert rep.cut_score > 50 and rep.residuals.max() <= 1e-3 * float(exact[0])
    assert rep.negative_mass == 0.0  # a Wishart matrix plus a PSD spike has no negative mass


@pytest.mark.parametrize("seed", range(10, 13))
def test_pure_wishart_has_no_outliers(seed):
    rep = analysis.outliers(spiked_wishart(seed, spikes=()), generator=torch.Generator().manual_seed(seed))
    assert rep.count == 0 and rep.conclusive
    assert np.isnan(rep.outlier_share) or rep.outlier_share == 0.0
    assert float(np.max(rep.scores)) < 20


def test_eigen_result_input_and_comparison_with_classes(planted):
    A = planted[0]
    res = spectra.eigsh(A, k=24, tol=1e-8, generator=torch.Generator().manual_seed(0))
    rep = analysis.outliers(res, num_classes=4, trace=float(torch.trace(A)))
    assert rep.count == 3 and rep.matches == "C-1" and rep.ratio == pytest.approx(0.75)
    assert rep.num_matvecs == 0
    assert rep.outlier_share == pytest.approx(float(res.eigenvalues[:3].sum() / torch.trace(A)), rel=1e-12)
    assert analysis.outliers(res, num_classes=3).matches == "C"
    assert analysis.outliers(res, num_classes=5).matches is None


def test_unconverged_ritz_values_are_not_used(planted):
    """A short Lanczos run has only a few converged values: the rule says so (inconclusive, or
    an error below 4 values) instead of scoring quadrature nodes, whose gaps miss the planted
    outliers."""
    A = planted[1]
    rep = analysis.outliers(A, num_steps=40, max_steps=40, generator=torch.Generator().manual_seed(0))
    assert rep.num_steps == 40 and rep.num_converged < 3 + 8
    assert not rep.conclusive
    assert bool((rep.residuals <= 1e-3 * float(rep.eigenvalues[0])).all())
    with pytest.raises(ValueError, match="converged"):
        analysis.outliers(A, num_steps=25, max_steps=25, generator=torch.Generator().manual_seed(0))
    # The same runs' raw Ritz values (converged or not) miss the planted count.
    for m in (25, 40, 60):
        res = spectra.lanczos(A, num_steps=m, generator=torch.Generator().manual_seed(0))
        theta = res.ritz()[0][0].flip(0).numpy()
        theta = theta[theta > 1e-3 * theta[0]]
        assert analysis.log_gap_rule(theta).count != 3
    # Given room, the run is extended until the count is conclusive.
    rep = analysis.outliers(A, num_steps=40, generator=torch.Generator().manual_seed(0))
    assert rep.conclusive and rep.count == 3 and rep.num_steps > 40


def test_density_input_needs_enough_steps(planted):
    A = planted[2]
    short = spectra.slq(A, num_probes=3, num_steps=20, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="too few Lanczos steps"):
        analysis.outliers(short)
    one = spectra.slq(A, num_probes=1, num_steps=200, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="at least 2 probes"):
        analysis.outliers(one)
    long = spectra.slq(A, num_probes=3, num_steps=200, generator=torch.Generator().manual_seed(0))
    rep = analysis.outliers(long)
    assert rep.count == 3
    # Three outliers of 1000 eigenvalues: the SLQ mass above the cut is 3 ± a few s.e.
    assert abs(rep.slq_count - 3) <= max(3 * rep.slq_count_stderr, 1.5)


def test_non_symmetric_operator_is_refused():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(50, 50, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match="symmetric"):
        analysis.outliers(A)

    class Matmul:  # the documented operator contract, not symmetric
        shape, dtype, device = (50, 50), torch.float64, torch.device("cpu")

        def __matmul__(self, V):
            return A @ V

    with pytest.raises(ValueError, match="symmetric"):
        analysis.outliers(Matmul(), generator=g)


def test_bad_arguments():
    A = torch.diag(torch.linspace(1, 2, 60, dtype=torch.float64))
    with pytest.raises(ValueError, match="z"):
        analysis.outliers(A, z=-1.0)
    with pytest.raises(ValueError, match="num_classes"):
        analysis.outliers(A, num_classes=1)
    with pytest.raises(ValueError, match="positive"):
        analysis.outliers(-A)
    with pytest.raises(ValueError, match="descending"):
        analysis.log_gap_rule([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="at least 4"):
        analysis.log_gap_rule([3.0, 2.0])


def test_gap_rule_levels_of_a_hierarchy():
    """Two groups of outliers (C = 3 then C(C − 1) = 6 more) give two levels."""
    top = [30.0, 28.0, 26.0]
    mid = list(np.linspace(6.0, 5.0, 6))
    bulk = list(np.geomspace(1.0, 0.5, 40))
    rule = analysis.log_gap_rule(top + mid + bulk)
    assert rule.count == 9 and rule.levels == (3, 9)


def test_to_dict_and_plot(planted):
    rep = analysis.outliers(planted[3], num_classes=3, generator=torch.Generator().manual_seed(0))
    d = rep.to_dict()
    json.dumps(d)
    assert d["count"] == 3 and d["matches"] == "C" and len(d["outliers"]) == 3
    axes = rep.plot()
    assert len(axes) == 2 and axes[0].get_yscale() == "log"
    import matplotlib.pyplot as plt

    plt.close("all")


def test_three_level_hierarchy_of_class_means():
    """Papyan's structure: class means U_c (‖U_c‖ = 3) give C outliers, cross-class means W_cc'
    (‖W‖ = 1) C(C − 1) more, within-class noise the bulk; G = VᵀV/len(V) has levels {C, C(C−1)}."""
    C, P = 5, 1500
    g = torch.Generator().manual_seed(0)
    U = torch.randn(C, P, generator=g, dtype=torch.float64)
    U = 3 * U / U.norm(dim=1, keepdim=True)
    W = torch.randn(C, C, P, generator=g, dtype=torch.float64)
    W = W / W.norm(dim=2, keepdim=True)
    rows = [
        U[c] + W[c, c2] + 0.3 / P**0.5 * torch.randn(60, P, generator=g, dtype=torch.float64)
        for c in range(C)
        for c2 in range(C)
        if c2 != c
    ]
    V = torch.cat(rows)
    G = V.T @ V / V.shape[0]
    # The bulk sits at ~1.5e-4·θ_1: resolving it needs a residual tolerance (and floor) below that.
    coarse = analysis.outliers(G, num_classes=C, k=35, generator=g)
    assert coarse.count == C and coarse.matches == "C"
    fine = analysis.outliers(G, num_classes=C, k=35, residual_tol=1e-6, generator=g)
    assert fine.count == C * (C - 1) and fine.levels == (C, C * (C - 1)) and fine.matches == "C(C-1)"
