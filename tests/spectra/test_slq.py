"""SLQ densities and spectral sums, checkpoints, save/load and plots."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pytest
import torch

import spectra
from curvature import Hessian, LinearOperator
from spectra import SpectralDensity
from tests.matrices import gen, goe, with_spectrum

matplotlib.use("Agg")


def rademacher_probes(d: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (d, n), generator=g) * 2 - 1).double()


def test_quadrature_exactness_per_probe():
    d, m = 150, 8
    A = goe(d, seed=40)
    A = A / torch.linalg.matrix_norm(A, ord=2)
    V = rademacher_probes(d, 3, 41)
    nodes, weights = spectra.lanczos(A, num_steps=m, v0=V).quadrature()
    dens = SpectralDensity(nodes, weights, dim=d)
    for p in range(3):
        v = V[:, p]
        x = v.clone()
        for power in range(2 * m):
            exact = float(v @ x) / float(v @ v)
            quad = float((dens.weights[p] * dens.nodes[p] ** power).sum())
            assert abs(exact - quad) < 1e-8
            x = A @ x
        # tr estimate of the single probe equals the Hutchinson sample vᵀ A^p v for p = 1, 2.
        for power in (1, 2):
            est = float(dens.select([p]).trace(lambda t, q=power: t**q).value)
            exact = float(v @ torch.linalg.matrix_power(A, power) @ v)
            assert abs(est - exact) < 1e-8 * d


def test_trace_within_hutchinson_error():
    d = 300
    evals = torch.linspace(0.1, 3.0, d, dtype=torch.float64)
    A = with_spectrum(evals, seed=42)
    dens = spectra.slq(A, num_probes=40, num_steps=30, generator=gen())
    assert dens.num_matvecs == 40 * 30
    for f, exact in [
        (None, float(evals.sum())),
        (lambda x: x**2, float((evals**2).sum())),
        (torch.log, float(torch.log(evals).sum())),
    ]:
        est = dens.trace(f)
        assert est.num_probes == 40 and est.stderr > 0
        assert abs(est.value - exact) < 4 * est.stderr, (est, exact)


def test_trace_with_full_krylov_space_equals_hutchinson():
    d = 40
    A = goe(d, seed=43)
    V = rademacher_probes(d, 5, 44)
    nodes, weights = spectra.lanczos(A, num_steps=d, v0=V).quadrature()
    dens = SpectralDensity(nodes, weights, dim=d)
    hutch = float(torch.einsum("dp,de,ep->p", V, A @ A @ A, V).mean())
    assert abs(dens.trace(lambda x: x**3).value - hutch) < 1e-10 * d


def test_density_integrates_to_one_and_lies_in_spectrum():
    d = 400
    evals = torch.cat([torch.rand(d - 3, generator=gen(45), dtype=torch.float64), torch.tensor([5.0, 6.0, 8.0])])
    A = with_spectrum(evals.double(), seed=46)
    dens = spectra.slq(A, num_probes=3, num_steps=60, generator=gen())
    lo, hi = float(evals.min()), float(evals.max())
    assert dens.nodes.min() >= lo - 1e-10 and dens.nodes.max() <= hi + 1e-10
    assert (dens.weights.sum(1) - 1).abs().max() < 1e-13
    grid, p = dens.evaluate()
    assert abs(float(torch.trapezoid(p, grid)) - 1) < 1e-12
    sigma = dens.default_sigma()
    inside = (grid >= lo - 3 * sigma) & (grid <= hi + 3 * sigma)
    assert float(torch.trapezoid(p * inside, grid)) > 0.99
    # Unnormalized on a wide grid the broadened quadrature has unit mass by construction.
    wide = torch.linspace(lo - 8 * sigma, hi + 8 * sigma, 20001, dtype=torch.float64)
    _, raw = dens.evaluate(wide, normalize=False)
    assert abs(float(torch.trapezoid(raw, wide)) - 1) < 1e-6
    # PyHessian's convention: variance sigma_squared * max(1, range).
    _, p2 = dens.evaluate(wide, sigma_squared=1e-5)
    assert abs(float(torch.trapezoid(p2, wide)) - 1) < 1e-12
    with pytest.raises(ValueError, match="not both"):
        dens.evaluate(sigma=0.1, sigma_squared=1e-5)


def test_density_close_to_truth():
    # A bulk plus outliers, L1 error of the broadened density.
    d = 600
    bulk = (torch.randn(d - 5, 4, generator=gen(47), dtype=torch.float64) ** 2).mean(1)  # chi²₄/4
    outliers = torch.tensor([20.0, 16.0, 13.0, 11.0, 9.0], dtype=torch.float64)
    evals = torch.cat([outliers, bulk])
    A = with_spectrum(evals, seed=48)
    R = float(evals.max() - evals.min())
    sigma = 0.02 * R
    m = math.ceil(R / (2 * sigma) * math.sqrt(math.log(1e3) / 2)) + 5
    dens = spectra.slq(A, num_probes=20, num_steps=m, generator=gen())
    grid = torch.linspace(float(evals.min()) - 5 * sigma, float(evals.max()) + 5 * sigma, 4000, dtype=torch.float64)
    _, est = dens.evaluate(grid, sigma)
    truth = SpectralDensity(evals[None], torch.full((1, d), 1.0 / d, dtype=torch.float64), dim=d)
    _, ref = truth.evaluate(grid, sigma)
    assert float(torch.trapezoid((est - ref).abs(), grid)) < 0.05
    top = torch.sort(dens.nodes.flatten(), descending=True).values[:1]
    assert abs(float(top[0]) - 20.0) < 1e-8 * 20


def test_log_density_push_forward_integrates_to_one():
    evals = torch.logspace(-4, 2, 200, dtype=torch.float64)
    evals[::7] *= -1
    A = with_spectrum(evals, seed=49)
    dens = spectra.slq(A, num_probes=2, num_steps=40, generator=gen())
    lam, p = dens.evaluate_log(normalize=False)
    assert (lam > 0).all()
    assert abs(float(torch.trapezoid(p, lam)) - 1) < 1e-3
    lam_pos, p_pos = dens.evaluate_log(part="positive")
    lam_neg, p_neg = dens.evaluate_log(part="negative")
    mass_neg = float(dens.weights[dens.nodes < 0].sum()) / dens.num_probes
    assert abs(float(torch.trapezoid(p_neg, lam_neg)) - mass_neg) < 1e-12
    assert abs(float(torch.trapezoid(p_pos, lam_pos)) + mass_neg - 1) < 1e-12


def test_save_load_round_trip_exact(tmp_path):
    dens = spectra.slq(goe(50, seed=50), num_probes=3, num_steps=10, generator=gen())
    path = tmp_path / "density.npz"
    dens.save(path)
    back = SpectralDensity.load(path)
    assert torch.equal(back.nodes, dens.nodes) and torch.equal(back.weights, dens.weights)
    assert torch.equal(back.probe_norms_sq, dens.probe_norms_sq)
    assert (back.dim, back.num_matvecs, back.metadata) == (dens.dim, dens.num_matvecs, dens.metadata)
    bogus = tmp_path / "other.npz"
    np.savez(bogus, header=np.array('{"format": "something else"}'))
    with pytest.raises(ValueError, match="not a saved SpectralDensity"):
        SpectralDensity.load(bogus)


class Interrupt(Exception):
    pass


class FlakyOperator(LinearOperator):
    """A dense operator that dies after a number of products (a crashed long run)."""

    def __init__(self, A: torch.Tensor, fail_after: int | None):
        super().__init__(A.shape[0], A.dtype, A.device)
        self.A, self.fail_after = A, fail_after

    def _matmat(self, V):
        if self.fail_after is not None and self.num_matvecs + V.shape[1] > self.fail_after:
            raise Interrupt
        return self.A @ V


def test_checkpoint_resume_equals_one_run(tmp_path):
    A = goe(80, seed=51)
    kwargs = dict(num_probes=7, num_steps=12, probe_batch_size=2)
    whole = spectra.slq(FlakyOperator(A, None), generator=gen(3), **kwargs)
    path = tmp_path / "slq.ckpt"
    with pytest.raises(Interrupt):
        spectra.slq(FlakyOperator(A, 12 * 5), generator=gen(3), checkpoint=path, **kwargs)
    assert SpectralDensity.load(path).num_probes == 4  # two finished blocks kept
    op = FlakyOperator(A, None)
    resumed = spectra.slq(op, generator=gen(3), checkpoint=path, **kwargs)
    assert op.num_matvecs == 3 * 12 + 1  # only the missing probes were run (+1: the fingerprint)
    assert torch.equal(resumed.nodes, whole.nodes) and torch.equal(resumed.weights, whole.weights)
    # Block size does not change the probes.
    other = spectra.slq(FlakyOperator(A, None), generator=gen(3), num_probes=7, num_steps=12, probe_batch_size=3)
    torch.testing.assert_close(other.nodes, whole.nodes, rtol=0, atol=1e-12)
    # A finished checkpoint costs nothing; more probes extend it.
    op = FlakyOperator(A, None)
    again = spectra.slq(op, generator=gen(3), checkpoint=path, **kwargs)
    assert op.num_matvecs == 1 and torch.equal(again.nodes, whole.nodes)  # just the fingerprint
    more = spectra.slq(op, generator=gen(3), checkpoint=path, num_probes=9, num_steps=12, probe_batch_size=2)
    assert op.num_matvecs == 1 + 24 + 1 and torch.equal(more.nodes[:7], whole.nodes)


def test_checkpoint_refuses_mismatched_run(tmp_path):
    A = goe(30, seed=52)
    path = tmp_path / "slq.ckpt"
    spectra.slq(A, num_probes=2, num_steps=5, generator=gen(1), checkpoint=path)
    with pytest.raises(ValueError, match="num_steps"):
        spectra.slq(A, num_probes=2, num_steps=6, generator=gen(1), checkpoint=path)
    with pytest.raises(ValueError, match="seed"):
        spectra.slq(A, num_probes=2, num_steps=5, generator=gen(2), checkpoint=path)
    with pytest.raises(ValueError, match="dim"):
        spectra.slq(goe(31), num_probes=2, num_steps=5, generator=gen(1), checkpoint=path)
    with pytest.raises(ValueError, match="dtype"):
        spectra.slq(A.float(), num_probes=2, num_steps=5, generator=gen(1), checkpoint=path)
    # Without a generator the checkpoint's seed is adopted.
    resumed = spectra.slq(A, num_probes=2, num_steps=5, checkpoint=path)
    assert torch.equal(resumed.nodes, spectra.slq(A, num_probes=2, num_steps=5, generator=gen(1)).nodes)
    with pytest.raises(ValueError, match="does not exist"):
        spectra.slq(A, num_steps=5, checkpoint=tmp_path / "missing" / "slq.ckpt")
    junk = tmp_path / "junk"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable SLQ checkpoint"):
        spectra.slq(A, num_steps=5, checkpoint=junk)


def test_checkpoint_refuses_another_operator_of_the_same_size_and_class(tmp_path):
    # A per-epoch loop with one checkpoint path: epoch 1's operator must not get epoch 0's density.
    with torch.random.fork_rng():  # a seeded init that leaves the global RNG as it was
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double().eval()
    x = torch.randn(16, 4, dtype=torch.float64, generator=gen(5))
    y = torch.randint(0, 3, (16,), generator=gen(6))
    loss = torch.nn.CrossEntropyLoss()
    path = tmp_path / "epoch.ckpt"
    spectra.slq(Hessian(model, loss, (x, y)), num_probes=2, num_steps=5, generator=gen(1), checkpoint=path)
    with torch.no_grad():
        model[0].weight.add_(0.1)  # one "epoch" of training
    H1 = Hessian(model, loss, (x, y))
    with pytest.raises(ValueError, match="different operator"):
        spectra.slq(H1, num_probes=2, num_steps=5, generator=gen(1), checkpoint=path)
    # The same operator resumes (its fingerprint matches to rounding).
    with torch.no_grad():
        model[0].weight.sub_(0.1)
    again = spectra.slq(Hessian(model, loss, (x, y)), num_probes=2, num_steps=5, generator=gen(1), checkpoint=path)
    assert again.num_probes == 2


def test_progress_bar_and_no_prints(capsys):
    spectra.slq(goe(20), num_probes=2, num_steps=4, generator=gen())
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    spectra.slq(goe(20), num_probes=2, num_steps=4, generator=gen(), progress=True)
    assert "SLQ" in capsys.readouterr().err


def test_bad_input():
    A = goe(10)
    with pytest.raises(ValueError, match="num_steps"):
        spectra.slq(A, num_steps=0)
    with pytest.raises(ValueError, match="num_probes"):
        spectra.slq(A, num_probes=0)
    with pytest.raises(ValueError, match="op must be a square"):
        spectra.slq(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="probe_batch_size"):
        spectra.slq(A, probe_batch_size=0)
    with pytest.raises(ValueError, match="nodes and weights"):
        SpectralDensity(torch.zeros(2, 3), torch.zeros(2, 4), dim=3)


def test_plot_renders(tmp_path):
    import matplotlib.image
    import matplotlib.pyplot as plt

    evals = torch.cat([torch.linspace(-0.5, 1.0, 297), torch.tensor([12.0, 20.0, 30.0])]).double()
    A = with_spectrum(evals, seed=53)
    dens = spectra.slq(A, num_probes=2, num_steps=40, generator=gen())
    top = spectra.eigsh(A, k=3, generator=gen())
    variants = [dict(top_eigenvalues=top), dict(log=False), dict(log_lambda=True, top_eigenvalues=[30.0])]
    for i, kwargs in enumerate(variants):
        ax = dens.plot(**kwargs)
        path = tmp_path / f"density{i}.png"
        ax.figure.savefig(path, dpi=80)
        plt.close(ax.figure)
        img = matplotlib.image.imread(path)
        assert img.shape[0] > 100 and img.shape[1] > 100
        rgb = img[..., :3]
        assert float(rgb.std()) > 0.05  # not blank
        assert float((rgb.mean(-1) < 0.5).mean()) > 0.005  # some dark ink (curve, labels)
