"""Per-block restriction, and the solvers on a real (tiny) model Hessian."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import spectra
from curvature import DenseOperator, Hessian, make_blocks
from tests.matrices import gen, goe


def blocked(d_parts=(("fc1.weight", (6, 5)), ("fc1.bias", (6,)), ("fc2.weight", (3, 6)))):
    names, shapes = zip(*d_parts)
    blocks = make_blocks(names, shapes)
    d = blocks[-1].slice.stop
    return DenseOperator(goe(d, seed=60), blocks=blocks)


def test_restriction_is_the_principal_submatrix():
    H = blocked()
    sub = spectra.restrict(H, ["fc2.weight", "fc1.bias"])
    # Blocks keep the operator's order whatever order they were listed in.
    assert [b.name for b in sub.blocks] == ["fc1.bias", "fc2.weight"]
    idx = torch.cat([torch.arange(30, 36), torch.arange(36, 54)])
    dense = sub.to_dense()
    torch.testing.assert_close(dense, H.matrix[idx][:, idx])
    assert sub.shape == (24, 24) and sub.blocks[1].slice == slice(6, 24)
    # Each product costs one full product.
    before = H.num_matvecs
    sub @ torch.ones(24, 3, dtype=torch.float64)
    assert H.num_matvecs - before == 3
    # Module names select all of the module's parameters.
    assert spectra.restrict(H, "fc1").shape == (36, 36)
    # Per-layer spectrum.
    res = spectra.eigsh(spectra.restrict(H, "fc2"), k=2, tol=1e-10, generator=gen())
    want = torch.linalg.eigvalsh(H.matrix[36:, 36:]).flip(0)[:2]
    torch.testing.assert_close(res.eigenvalues, want)


def test_restrict_to_a_parent_module():
    H = blocked((("enc.0.weight", (3, 2)), ("enc.0.bias", (3,)), ("enc.2.weight", (2, 3)), ("head.weight", (1, 2))))
    enc = spectra.restrict(H, "enc")
    assert [b.name for b in enc.blocks] == ["enc.0.weight", "enc.0.bias", "enc.2.weight"]
    torch.testing.assert_close(enc.to_dense(), H.matrix[:15, :15])
    assert spectra.restrict(H, "enc.0").shape == (9, 9)
    # A name prefix that is not a module boundary selects nothing.
    with pytest.raises(ValueError, match="no parameter or module named 'en'"):
        spectra.restrict(H, "en")


def test_restrict_bad_names():
    H = blocked()
    with pytest.raises(ValueError, match="no parameter or module named 'fc3'"):
        spectra.restrict(H, "fc3")
    with pytest.raises(ValueError, match="at least one"):
        spectra.restrict(H, [])
    with pytest.raises(TypeError, match="names or curvature.Block"):
        spectra.restrict(H, [3])


def _tiny_problem():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    g = gen(61)
    x = torch.randn(32, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=g)
    return model, nn.CrossEntropyLoss(), (x, y)


def test_eigsh_on_tiny_mlp_hessian():
    model, loss_fn, data = _tiny_problem()
    H = Hessian(model, loss_fn, data)
    dense = H.to_dense()
    dense = (dense + dense.T) / 2
    evals = torch.linalg.eigvalsh(dense)
    res = spectra.eigsh(H, k=3, tol=1e-10, generator=gen())
    assert res.all_converged
    want = evals.flip(0)[:3]
    assert float(((res.eigenvalues - want).abs() / want.abs()).max()) < 1e-8
    # SLQ through the model operator: with a full Krylov space the nodes are the eigenvalues.
    dens = spectra.slq(H, num_probes=2, num_steps=H.shape[0], generator=gen())
    assert dens.num_steps == H.shape[0] == 75
    torch.testing.assert_close(dens.nodes[0], evals, rtol=0, atol=1e-8 * float(evals.abs().max()))
    # Per-layer: the last layer's block.
    names = [b.name for b in H.blocks]
    sub = spectra.restrict(H, "2")
    idx = torch.cat([torch.arange(b.slice.start, b.slice.stop) for b in H.blocks if b.module == "2"])
    assert names[-1].startswith("2.")
    res_sub = spectra.eigsh(sub, k=1, tol=1e-10, generator=gen())
    want_sub = torch.linalg.eigvalsh(dense[idx][:, idx])[-1]
    assert abs(float(res_sub.eigenvalues[0] - want_sub)) < 1e-8 * abs(float(want_sub))


def test_loss_landscape_along_top_eigenvectors(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image
    import matplotlib.pyplot as plt

    model, loss_fn, data = _tiny_problem()
    before = [p.detach().clone() for p in model.parameters()]
    if Hessian is not None:
        top = spectra.eigsh(Hessian(model, loss_fn, data), k=2, tol=1e-10, generator=gen())
    else:  # the directions need not be eigenvectors for the plumbing checks below
        d = sum(p.numel() for p in model.parameters())
        vecs = torch.linalg.qr(torch.randn(d, 2, generator=gen(), dtype=torch.float64))[0]
        top = spectra.EigenResult(torch.tensor([1.0, 0.5]).double(), vecs, torch.zeros(2), torch.ones(2).bool(), 0)
    line = spectra.loss_landscape(model, loss_fn, data, directions=top.eigenvectors[:, 0] * 3,
                                  radius=1e-2, num_points=11)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # restored
    assert line.ndim == 1 and line.losses.shape == (11,)
    assert abs(float(line.losses[5]) - line.base_loss) < 1e-14
    with_eig = spectra.loss_landscape(model, loss_fn, data, directions=top, radius=1e-2, num_points=11)
    assert with_eig.ndim == 2 and with_eig.losses.shape == (11, 11)
    assert with_eig.eigenvalues == tuple(top.eigenvalues.tolist())
    if Hessian is not None:
        # Along the top eigenvector the quadratic model is exact up to O(α³).
        one = spectra.EigenResult(top.eigenvalues[:1], top.eigenvectors[:, :1], top.residuals[:1],
                                  top.converged[:1], 0)
        line = spectra.loss_landscape(model, loss_fn, data, directions=one, radius=1e-2, num_points=11)
        err = (line.losses - line.quadratic_model()).abs().max()
        curvature_term = 0.5 * float(top.eigenvalues[0]) * 1e-2**2
        assert float(err) < 1e-2 * curvature_term
    for i, ls in enumerate([line, with_eig]):
        ax = ls.plot()
        path = tmp_path / f"landscape{i}.png"
        ax.figure.savefig(path, dpi=60)
        plt.close(ax.figure)
        assert float(matplotlib.image.imread(path)[..., :3].std()) > 0.05
    with pytest.raises(ValueError, match="directions have length"):
        spectra.loss_landscape(model, loss_fn, data, directions=torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_landscape_over_uneven_batches_equals_one_batch(reduction):
    model, _, (x, y) = _tiny_problem()
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    direction = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64, generator=gen(3))
    whole = spectra.loss_landscape(model, loss_fn, (x, y), directions=direction, num_points=5, radius=0.5)
    split = [(x[:20], y[:20]), (x[20:27], y[20:27]), (x[27:], y[27:])]
    parts = spectra.loss_landscape(model, loss_fn, split, directions=direction, num_points=5, radius=0.5)
    torch.testing.assert_close(parts.losses, whole.losses, rtol=1e-12, atol=1e-12)
    assert parts.base_loss == pytest.approx(float(loss_fn(model(x), y).detach()), rel=1e-12)
    assert parts.slopes == pytest.approx(whole.slopes, rel=1e-10)
