"""Blockwise spectra (spectra.block_spectra) against dense eigenvalues of the Hessian's diagonal
blocks, and the Jensen-Shannon distance against a brute-force computation."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

import spectra
from curvature import DenseOperator, Hessian, make_blocks
from spectra import block_kind, block_spectra, js_distance
from tests import cases


def _dense_hessian(p):
    params = [q for q in p.model.parameters() if q.requires_grad]
    names = [n for n, q in p.model.named_parameters() if q.requires_grad]
    shapes = [q.shape for q in params]
    sizes = [q.numel() for q in params]
    flat0 = torch.cat([q.detach().reshape(-1) for q in params])

    def loss_of(flat):
        chunks = torch.split(flat, sizes)
        new = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        x, y = cases.concatenated(p.batches)
        return p.loss_fn(torch.func.functional_call(p.model, new, (x,)), y)

    return torch.autograd.functional.hessian(loss_of, flat0), names, sizes


@pytest.mark.parametrize("case", [("mlp", "ce", "uneven"), ("tied_lm", "token_ce", "uneven")])
def test_block_eigenvalues_equal_dense_block_diagonal(case):
    p = cases.problem(*case)
    H_dense, names, sizes = _dense_hessian(p)
    H = Hessian(p.model, p.loss_fn, p.data)
    res = block_spectra(H, k=2, num_probes=2, num_steps=200, tol=1e-8, generator=torch.Generator().manual_seed(0))
    assert res.names == names
    offsets = np.cumsum([0] + sizes)
    for b, lo, hi in zip(res.blocks, offsets[:-1], offsets[1:]):
        exact = torch.linalg.eigvalsh(H_dense[lo:hi, lo:hi]).flip(0)
        kk = min(2, hi - lo)
        torch.testing.assert_close(b.eigenvalues, exact[:kk], rtol=0, atol=1e-9)
        # With as many Lanczos steps as the block's size, the weighted nodes are its eigenvalues.
        nodes = b.density.nodes[b.density.weights > 1e-10]
        gaps = (nodes[:, None] - exact[None, :]).abs().min(dim=1).values
        assert float(gaps.max()) < 1e-8
        assert b.density.dim == hi - lo


def test_groups_by_module_and_dict_and_kind():
    p = cases.problem("mlp", "ce", "uneven")
    H = Hessian(p.model, p.loss_fn, p.data)
    g = torch.Generator().manual_seed(0)
    by_module = block_spectra(H, groups="module", k=1, num_steps=5, generator=g)
    assert [b.params for b in by_module.blocks] == [("0.weight", "0.bias"), ("2.weight", "2.bias")]
    by_dict = block_spectra(H, groups={"weights": "*.weight", "biases": ["0.bias", "2.bias"]}, k=1,
                            num_steps=5, generator=g)
    assert by_dict.names == ["weights", "biases"]
    assert by_dict["weights"].dim == sum(q.numel() for n, q in p.model.named_parameters() if n.endswith("weight"))
    by_kind = block_spectra(H, groups="kind", k=0, num_steps=5, generator=g)
    assert by_kind.names == ["linear"] and by_kind.blocks[0].eigenvalues.numel() == 0
    with pytest.raises(ValueError, match="matches nothing; closest"):
        block_spectra(H, groups={"x": "*.wieght"}, generator=g)
    with pytest.raises(ValueError, match="in both"):
        block_spectra(H, groups={"a": "0.*", "b": "0.weight"}, generator=g)


def test_js_distance_equals_scipy():
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        a, b = torch.rand(50, generator=gen, dtype=torch.float64), torch.rand(50, generator=gen, dtype=torch.float64)
        a[:10] = 0
        assert abs(js_distance(a, b) - jensenshannon(a.numpy(), b.numpy())) < 1e-12
    assert abs(js_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) - math.sqrt(math.log(2))) < 1e-15


def test_block_js_distance_equals_brute_force_on_a_fine_uniform_grid():
    # Two blocks of very different scales: the non-uniform common grid must resolve both.
    ev = torch.cat([torch.linspace(0.0, 1.0, 30), torch.linspace(0.5, 40.0, 20)]).double()
    H = DenseOperator(torch.diag(ev), blocks=make_blocks(["a", "b"], [(30,), (20,)]))
    res = block_spectra(H, k=1, num_probes=3, num_steps=12, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(-5.0, 50.0, 100_001, dtype=torch.float64)
    rows = [b.density.evaluate(t, sigma=res.sigma, normalize=False)[1].numpy() for b in res.blocks]
    brute = jensenshannon(rows[0], rows[1])
    assert abs(float(res.js_distances[0, 1]) - brute) < 2e-3
    assert res.heterogeneity == pytest.approx(float(res.js_distances[0, 1]))
    torch.testing.assert_close(res.masses.sum(1), torch.ones(2, dtype=torch.float64))


def test_subnormal_masses_give_a_finite_distance():
    p = torch.tensor([0.5, 0.5, 5e-324], dtype=torch.float64)
    q = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    assert js_distance(p, q) == 0.0


def test_blocks_at_different_tiny_scales_are_alike_under_one_kernel():
    M = torch.zeros(9, 9, dtype=torch.float64)
    M[:3, :3] = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    M[6:, 6:] = 1e-10 * torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    H = DenseOperator(M, blocks=make_blocks(["a", "zero", "tiny"], [(3,), (3,), (3,)]))
    res = block_spectra(H, k=1, num_steps=5, generator=torch.Generator().manual_seed(0))
    assert float(res.js_distances[1, 2]) < 1e-6 and float(res.js_distances[0, 1]) > 0.5
    assert torch.isfinite(res.js_distances).all()


def test_identical_blocks_have_zero_distance_and_seeded_runs_repeat():
    H = DenseOperator(torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64).repeat(2)),
                      blocks=make_blocks(["a", "b"], [(8,), (8,)]))
    res = block_spectra(H, k=1, num_steps=8, generator=torch.Generator().manual_seed(0))
    assert res.heterogeneity < 1e-6  # 8 steps resolve both blocks exactly: same nodes, same weights
    again = block_spectra(H, k=1, num_steps=8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(res.js_distances, again.js_distances, rtol=0, atol=0)


def test_block_kind_names():
    assert block_kind("transformer.h.3.attn.c_attn.bias") == "attention qkv"
    assert block_kind("model.layers.0.self_attn.q_proj.weight") == "attention query"
    assert block_kind("model.layers.0.self_attn.o_proj.weight") == "attention output"
    assert block_kind("model.layers.0.mlp.down_proj.weight") == "mlp"
    assert block_kind("model.layers.0.input_layernorm.weight") == "layernorm"
    assert block_kind("bert.embeddings.word_embeddings.weight") == "embedding"
    assert block_kind("lm_head.weight") == "head"
    assert block_kind("conv1.weight", torch.nn.Conv2d(1, 1, 1)) == "conv"


def test_plot_draws_every_block(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    H = DenseOperator(torch.diag(torch.arange(1.0, 10.0, dtype=torch.float64)),
                      blocks=make_blocks(["x.q.weight", "x.mlp.fc.weight", "ln.weight"], [(3,), (3,), (3,)]))
    res = spectra.block_spectra(H, k=1, num_steps=3, generator=torch.Generator().manual_seed(0))
    fig = res.plot()
    fig.savefig(tmp_path / "blocks.png")
    assert (tmp_path / "blocks.png").stat().st_size > 1000


def test_converged_flags_are_honest_when_the_run_does_not_cover_the_block():
    ev = torch.cat([torch.tensor([100.0, 50.0]), torch.linspace(0.0, 1.0, 198)]).double()
    ev2 = torch.linspace(0.0, 1.0, 200).double()  # no gap: the top Ritz values converge slowly
    H = DenseOperator(torch.diag(torch.cat([ev, ev2])), blocks=make_blocks(["gap", "flat"], [(200,), (200,)]))
    res = block_spectra(H, k=2, num_steps=12, tol=1e-6, generator=torch.Generator().manual_seed(0))
    gap, flat = res["gap"], res["flat"]
    assert gap.converged.all()
    torch.testing.assert_close(gap.eigenvalues, torch.tensor([100.0, 50.0], dtype=torch.float64), rtol=0, atol=1e-6)
    assert not flat.converged.all()
    assert gap.density.num_steps == 13 and gap.dim == 200
