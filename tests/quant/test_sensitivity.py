import pytest
import torch
from torch import nn

import quant
from tests.quant.dense import dense_hessian, tiny_data, tiny_mlp

LOSS = nn.CrossEntropyLoss()
LAYERS = ["0", "2", "4"]
WEIGHTS = [f"{n}.weight" for n in LAYERS]


def block_slices(model):
    out, start = {}, 0
    for name in LAYERS:
        n = dict(model.named_modules())[name].weight.numel()
        out[name] = slice(start, start + n)
        start += n
    return out


def test_trace_sensitivity_matches_dense_block_traces():
    model, data = tiny_mlp(), tiny_data()
    H = dense_hessian(model, LOSS, data, WEIGHTS)
    sens = quant.sensitivity(model, LOSS, data, num_matvecs=4000, generator=torch.Generator().manual_seed(0))
    assert list(sens) == LAYERS
    for name, sl in block_slices(model).items():
        s = sens[name]
        exact = H[sl, sl].trace().item()
        assert s.num_matvecs == 4000  # one shared set of probes for all layers
        assert abs(s.trace - exact) < 4 * s.trace_stderr, (name, s.trace, exact, s.trace_stderr)
        assert s.trace_stderr < 0.1 * abs(exact) + 1e-3
        assert s.average_trace == pytest.approx(s.trace / s.num_params)
        assert s.score == s.average_trace


def test_eigenvalue_sensitivity_matches_dense_top_eigenvalue():
    model, data = tiny_mlp(), tiny_data()
    H = dense_hessian(model, LOSS, data, WEIGHTS)
    sens = quant.sensitivity(model, LOSS, data, metric="eigenvalue", num_matvecs=200, eig_tol=1e-10,
                             generator=torch.Generator().manual_seed(0))
    for name, sl in block_slices(model).items():
        top = torch.linalg.eigvalsh(H[sl, sl])[-1].item()
        assert sens[name].eigenvalue == pytest.approx(top, rel=1e-8)
        assert sens[name].score == sens[name].eigenvalue and sens[name].trace is None


def test_calibration_runs_in_eval_mode_and_restores_modes():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3))
    model.train()
    data = (torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g))
    a = quant.sensitivity(model, LOSS, data, num_matvecs=8, generator=torch.Generator().manual_seed(1))
    b = quant.sensitivity(model, LOSS, data, num_matvecs=8, generator=torch.Generator().manual_seed(1))
    assert a["0"].trace == b["0"].trace  # deterministic: dropout was off
    assert model.training and model[1].training
    assert a["0"].macs == 32 and a["3"].macs == 24


def test_layers_selection_and_errors():
    model, data = tiny_mlp(), tiny_data()
    sens = quant.sensitivity(model, LOSS, data, layers=["4", "0"], num_matvecs=4,
                             generator=torch.Generator().manual_seed(0))
    assert list(sens) == ["0", "4"]
    with pytest.raises(ValueError, match="no module named 'fc9'"):
        quant.sensitivity(model, LOSS, data, layers=["fc9"], num_matvecs=4)
    with pytest.raises(ValueError, match="no weight"):
        quant.sensitivity(model, LOSS, data, layers=["1"], num_matvecs=4)
    with pytest.raises(ValueError, match="no quantizable layer"):
        quant.sensitivity(nn.Sequential(nn.Tanh()), LOSS, data, num_matvecs=4)
    with pytest.raises(ValueError, match="empty"):
        quant.sensitivity(model, LOSS, [], num_matvecs=4)
    x, y = data
    with pytest.raises(ValueError, match="empty"):
        quant.sensitivity(model, LOSS, (x[:0], y[:0]), num_matvecs=4)
    with pytest.raises(ValueError, match="metric"):
        quant.sensitivity(model, LOSS, data, metric="hessian", num_matvecs=4)


def test_per_layer_probes_match_dense_without_cross_block_variance():
    model, data = tiny_mlp(), tiny_data()
    H = dense_hessian(model, LOSS, data, WEIGHTS)
    kw = dict(num_matvecs=2000)
    per_layer = quant.sensitivity(model, LOSS, data, probes="per_layer", generator=torch.Generator().manual_seed(0),
                                  **kw)
    shared = quant.sensitivity(model, LOSS, data, generator=torch.Generator().manual_seed(0), **kw)
    for name, sl in block_slices(model).items():
        block = H[sl, sl]
        exact = block.trace().item()
        s = per_layer[name]
        assert abs(s.trace - exact) < 4 * s.trace_stderr
        assert s.num_matvecs == 2000 * 3
        # Var(zᵀ H_ii z) = 2(‖H_ii‖_F² − Σ_k (H_ii)_kk²) for block-restricted Rademacher probes
        var = 2 * ((block**2).sum() - (block.diagonal() ** 2).sum()).item()
        assert s.trace_stderr == pytest.approx((var / 2000) ** 0.5, rel=0.1)
        assert shared[name].trace_stderr >= 0.9 * s.trace_stderr  # cross-block terms only add variance
    with pytest.raises(ValueError, match="probes"):
        quant.sensitivity(model, LOSS, data, probes="each", num_matvecs=4)


class _TiedLM(torch.nn.Module):
    """An embedding and an output head that share one weight (as language models do)."""

    def __init__(self, vocab=7, dim=4):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.mix = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def test_tied_weights_are_one_layer():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _TiedLM().double().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 7, (12,), generator=g)
    sens = quant.sensitivity(model, torch.nn.CrossEntropyLoss(), (ids, ids.roll(1)), num_matvecs=8, generator=g)
    assert list(sens) == ["embed", "mix"]  # the head's weight IS the embedding's: quantized once
    with pytest.raises(ValueError, match="share one weight tensor"):
        quant.sensitivity(model, torch.nn.CrossEntropyLoss(), (ids, ids), layers=["embed", "head"], num_matvecs=4)


def test_a_given_operator_replaces_the_built_hessian():
    from curvature import Hessian

    model, (x, y) = tiny_mlp(), tiny_data()
    loss_fn = nn.CrossEntropyLoss()
    weights = [f"{name}.weight" for name in quant.quantizable_layers(model)]
    own = quant.sensitivity(model, loss_fn, (x, y), num_matvecs=16, generator=torch.Generator().manual_seed(3))
    given = quant.sensitivity(model, loss_fn, (x, y), num_matvecs=16, generator=torch.Generator().manual_seed(3),
                              operator=Hessian(model, loss_fn, (x, y), params=weights))
    assert {k: v.trace for k, v in own.items()} == {k: v.trace for k, v in given.items()}
    with pytest.raises(ValueError, match="operator has no block"):
        quant.sensitivity(model, loss_fn, (x, y), num_matvecs=4,
                          operator=Hessian(model, loss_fn, (x, y), params=weights[:1]))


# --- one definition (issue 21): weights only, Tr(H_ii)/n_i of the data set's loss, with its error ----
from tests.cases import full_batch_loss, problems  # noqa: E402


def dense_block_traces(p, weights):
    """Tr(H_ii) of the full-batch loss for each weight, by autograd (float64)."""
    out = {}
    for name, w in weights.items():
        g = torch.autograd.grad(full_batch_loss(p.model, p.loss_fn, p.batches), w, create_graph=True)[0].reshape(-1)
        rows = (torch.autograd.grad(g[k], w, retain_graph=True)[0].reshape(-1) for k in range(g.numel()))
        out[name] = sum(float(row[k]) for k, row in enumerate(rows))
    return out


@pytest.mark.parametrize(
    "p", problems(models=["mlp", "tied_lm", "called_twice"], losses=["ce_weighted", "ce_ignore_index", "token_ce"],
                  layouts=["uneven"]), ids=str,
)
def test_the_definition_over_the_case_registry(p):
    layers = quant.quantizable_layers(p.model)
    truth = dense_block_traces(p, {n: m.weight for n, m in layers.items()})
    sens = quant.sensitivity(p.model, p.loss_fn, p.data, num_matvecs=500, probes="per_layer",
                             generator=torch.Generator().manual_seed(0))
    for name, s in sens.items():
        n = layers[name].weight.numel()
        assert s.num_params == n  # the weight only, no bias
        assert s.score_stderr == pytest.approx(s.trace_stderr / n) and s.score_stderr > 0
        assert abs(s.score - truth[name] / n) < 4 * s.score_stderr + 1e-12, (name, s.score, truth[name] / n)
        assert s.to_dict()["score_stderr"] == s.score_stderr
