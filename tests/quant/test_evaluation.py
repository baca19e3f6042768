"""quant.evaluate_model / BitPlan.evaluate: accuracy as a fraction of predictions, the loss weighted
by the core's batch weights (issue 21 items 4 and 7)."""

import pytest
import torch
from torch import nn

import quant
from quant import BitPlan
from tests.cases import full_batch_loss, problem, problems

f64 = torch.float64


class PerfectTagger(nn.Module):
    """Scores are the one-hot of the input tokens: every prediction right."""

    def __init__(self, vocab=5):
        super().__init__()
        self.vocab = vocab
        self.scale = nn.Parameter(torch.ones((), dtype=f64))

    def forward(self, tokens):
        return nn.functional.one_hot(tokens, self.vocab).to(f64) * self.scale


def token_ce(logits, labels):
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def test_accuracy_of_a_perfect_tagger_is_one_not_tokens_per_sample():
    x = torch.randint(0, 5, (4, 6), generator=torch.Generator().manual_seed(0))
    ev = quant.evaluate_model(PerfectTagger(), token_ce, (x, x))  # was 6.0
    assert ev.accuracy == 1.0 and ev.num_predictions == 24 and ev.num_samples == 4


def test_accuracy_counts_tokens_and_ignores_padding():
    x = torch.randint(0, 5, (4, 6), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[0, :3] = (y[0, :3] + 1) % 5  # 3 wrong
    y[1, :] = -100  # 6 ignored
    loss = nn.CrossEntropyLoss(ignore_index=-100)
    ev = quant.evaluate_model(PerfectTagger(), lambda o, t: loss(o.reshape(-1, 5), t.reshape(-1)), (x, y))
    assert ev.num_predictions == 18 and ev.accuracy == pytest.approx(15 / 18, abs=1e-15)


def test_regression_accuracy_is_refused_or_left_out():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 1)).to(f64)
    data = (torch.randn(8, 3, generator=g, dtype=f64), torch.randn(8, 1, generator=g, dtype=f64))
    assert quant.evaluate_model(model, nn.MSELoss(), data).accuracy is None  # was 8.0 / 0.0 by broadcasting
    with pytest.raises(quant.MetricNotApplicableError, match="not class indices"):
        quant.evaluate_model(model, nn.MSELoss(), data, metric="accuracy")
    plan = BitPlan({"0": 8}, size_bytes=0, bops=0, omega=0)
    assert plan.evaluate(model, nn.MSELoss(), data).accuracy is None


@pytest.mark.parametrize(
    "p",
    problems(models=["mlp", "tied_lm", "frozen"], layouts=["single_batch", "uneven", "fully_padded", "shuffled"]),
    ids=str,
)
def test_evaluated_loss_is_the_loss_of_the_concatenated_batch(p):
    ev = quant.evaluate_model(p.model, p.loss_fn, p.data, metric=None)
    with torch.no_grad():
        truth = float(full_batch_loss(p.model, p.loss_fn, p.batches))
    assert ev.loss == pytest.approx(truth, rel=1e-12, abs=1e-12)


def test_padded_token_loss_figure_from_the_issue():
    p = problem("tied_lm", "token_ce", "uneven")  # 5, 1 and 7 valid tokens
    with torch.no_grad():
        truth = float(full_batch_loss(p.model, p.loss_fn, p.batches))
    ev = quant.evaluate_model(p.model, p.loss_fn, p.data)
    assert ev.loss == pytest.approx(truth, rel=1e-12)  # sample weighting gave 2.1214 against 2.0662
    assert ev.num_predictions == 13


def test_all_targets_ignored_is_a_named_error():
    p = problem("mlp", "ce_ignore_index", "single_batch")
    x, y = p.batches[0]
    with pytest.raises(ValueError, match="ignored"):
        quant.evaluate_model(p.model, p.loss_fn, [(x, torch.full_like(y, -100))], metric=None)


def test_search_plan_compares_accuracy_fractions_on_token_data():
    p = problem("tied_lm", "token_ce", "uneven")
    sens = quant.sensitivity(p.model, p.loss_fn, p.data, num_matvecs=8, generator=torch.Generator().manual_seed(0))
    result = quant.search_plan(p.model, p.loss_fn, p.data, sens, max_accuracy_drop=0.5, bit_choices=(4, 8))
    assert 0.0 <= result.baseline.accuracy <= 1.0 and result.baseline.num_predictions == 13
    assert all(0.0 <= r["measured_accuracy"] <= 1.0 for r in result.evaluations if r["measured_accuracy"] is not None)


def test_search_plan_refuses_an_accuracy_budget_on_a_regression():
    p = problem("mlp", "mse", "uneven")
    sens = quant.sensitivity(p.model, p.loss_fn, p.data, num_matvecs=4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(quant.MetricNotApplicableError):
        quant.search_plan(p.model, p.loss_fn, p.data, sens, max_accuracy_drop=0.1)


def test_accuracy_of_a_shifted_lm_loss_scores_the_next_token():
    from curvature import TokenCrossEntropyLoss

    class NextToken(nn.Module):  # position t's scores are the one-hot of token t + 1: all right
        def __init__(self, tokens):
            super().__init__()
            self.tokens = tokens
            self.scale = nn.Parameter(torch.ones((), dtype=f64))

        def forward(self, x):
            nxt = torch.cat([self.tokens[:, 1:], self.tokens[:, :1]], dim=1)
            return nn.functional.one_hot(nxt, 5).to(f64) * self.scale

    x = torch.randint(0, 5, (3, 6), generator=torch.Generator().manual_seed(0))
    ev = quant.evaluate_model(NextToken(x), TokenCrossEntropyLoss(shift=True), (x, x))
    assert ev.accuracy == 1.0 and ev.num_predictions == 15
