"""Data-parallel operators over 2 and 3 gloo processes equal one process over all the data.

Shards are uneven (37/23 and 29/17/14 samples, one rank with batches of 8 and a short last batch),
so a plain average of the ranks' means would be wrong; products, Hutchinson traces, SLQ nodes and
weights, eigsh eigenvalues and HAWQ block traces (and the bit plan built from them) must match
the single-process run to float64 rounding. Each launch runs many scenarios, because starting
processes dominates the time.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import quant
from curvature import GGN, Hessian
from tests.distributed import workers
from tests.distributed.launch import run_ranks
from tests.distributed.problems import WEIGHTS, analyses, full_data, make_model

TOL = 1e-12


@pytest.fixture(scope="module")
def reference() -> dict:
    model, data = make_model(), full_data()
    ce = nn.CrossEntropyLoss()
    return analyses(
        Hessian(model, ce, data), GGN(model, ce, data), Hessian(model, nn.CrossEntropyLoss(reduction="sum"), data),
        Hessian(model, ce, data, params=WEIGHTS),
    )


@pytest.fixture(scope="module", params=[2, 3])
def ranks(request) -> list[dict]:
    run = run_ranks(workers.exact, request.param, timeout=120)
    assert run.exitcodes == [0] * request.param, run
    return run.results


def _close(a, b, tol: float = TOL) -> None:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape
    scale = max(1.0, float(b.abs().max()))
    assert float((a - b).abs().max()) <= tol * scale, float((a - b).abs().max())


@pytest.mark.parametrize("key", ["hessian", "ggn", "hessian_sum_loss", "slq_nodes", "slq_weights", "eigenvalues"])
def test_equals_single_process(ranks, reference, key):
    for result in ranks:
        _close(result[key], reference[key])


def test_every_rank_gets_the_same_bits(ranks):
    for result in ranks[1:]:
        for key in ("hessian", "ggn", "slq_nodes", "eigenvalues"):
            assert torch.equal(result[key], ranks[0][key]), key


def test_trace_with_the_same_probes(ranks, reference):
    for result in ranks:
        assert result["trace"] == pytest.approx(reference["trace"], rel=TOL, abs=TOL)


def test_ddp_wrapped_and_unwrapped_models(ranks, reference):
    for result in ranks:
        _close(result["ddp"], reference["hessian"])
        _close(result["ddp_unwrapped"], reference["hessian"])
        assert result["ddp_names"][0] == "module.0.weight"
        assert result["counts"][0] == 60


def test_hawq_sensitivities_and_plan(ranks, reference):
    model, data = make_model(), full_data()
    single = quant.sensitivity(model, nn.CrossEntropyLoss(), data, num_matvecs=16,
                               generator=torch.Generator().manual_seed(5))
    layer_of = {"0.weight": "0", "2.weight": "2"}
    for name, value in reference["block_traces"].items():  # HAWQ-V2 is these block traces
        assert single[layer_of[name]].trace == pytest.approx(value, rel=TOL)
    budget = quant.make_plan(model, single, 4).size_bytes
    plan_single = quant.allocate_bits(model, single, bit_choices=(2, 4, 8), max_size_bytes=budget)
    for result in ranks:
        traces = result["block_traces"]
        sens = {layer_of[n]: dataclasses.replace(single[layer_of[n]], trace=v) for n, v in traces.items()}
        for name in sens:
            assert sens[name].trace == pytest.approx(single[name].trace, rel=TOL)
        plan = quant.allocate_bits(model, sens, bit_choices=(2, 4, 8), max_size_bytes=budget)
        assert plan.bits == plan_single.bits


@pytest.fixture(scope="module")
def failures() -> list:
    run = run_ranks(workers.failures, 2, timeout=90, pg_timeout=10)
    return run


def test_a_failing_rank_fails_every_rank_by_name(failures):
    for result in failures.results:
        outcome = result["nan_batch"]
        assert outcome["type"] == "DistributedCurvatureError"
        assert outcome["failed_ranks"] == (1,)
        assert "rank 1: FloatingPointError" in outcome["message"] and "nan" in outcome["message"]


def test_a_vector_refused_on_one_rank_fails_every_rank(failures):
    for result in failures.results:
        outcome = result["wrong_shape_on_one_rank"]
        assert outcome["type"] == "DistributedCurvatureError" and outcome["failed_ranks"] == (1,)
        assert "rank 1: ValueError: V must have shape (53,) or (53, k), got (54, 3)" in outcome["message"]


@pytest.mark.parametrize("scenario,words", [
    ("different_probes", "V differ across ranks"),
    ("different_values", "parameter values differ between rank 0 and rank 1"),
    ("different_shapes", "dimension"),
    ("different_dtypes", "dtype"),
])
def test_disagreements_are_refused_on_every_rank(failures, scenario, words):
    for result in failures.results:
        assert result[scenario]["type"] == "ValueError", result[scenario]
        assert words in result[scenario]["message"]


def test_the_group_stays_usable_after_errors(failures):
    reference = Hessian(make_model(), nn.CrossEntropyLoss(), full_data()) @ workers.probe_block(53)
    for result in failures.results:
        _close(result["after"], reference)


def test_a_dead_peer_does_not_hang_the_others(failures):
    assert failures.exitcodes == [0, 3]
    survivor = failures.results[0]
    assert survivor["peer_died"]["type"] is not None  # an error, not a hang
    assert survivor["peer_died_seconds"] < 15


def _single_process_optimizers() -> dict[str, list[torch.Tensor]]:
    from curvature.optim import AdaHessian, Sophia

    ce = nn.CrossEntropyLoss()
    x, y = full_data()
    makers = {
        "sophia": lambda ps: Sophia(ps, lr=0.05, rho=0.5, update_period=1, weight_decay=0.0,
                                    generator=torch.Generator().manual_seed(7)),
        "adahessian": lambda ps: AdaHessian(ps, lr=0.05, generator=torch.Generator().manual_seed(7)),
    }
    out = {}
    for name, make in makers.items():
        model = make_model()
        opt = make(model.parameters())

        def closure(opt=opt, model=model):
            opt.zero_grad()
            loss = ce(model(x), y)
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure)
        out[f"{name}_ddp"] = [p.detach().clone() for p in model.parameters()]
        model = make_model()
        opt = make(model.parameters())
        for _ in range(3):
            model.zero_grad()
            ce(model(x), y).backward()
            opt.step(curvature=Hessian(model, ce, (x, y)))
        out[f"{name}_operator"] = [p.detach().clone() for p in model.parameters()]
    return out


def test_sophia_and_adahessian_agree_across_ranks_and_with_one_process(ranks):
    """Same probe seed on every rank: identical states on all ranks; DDP-averaged gradients with
    finite-difference curvature (equal shards) and exact data-parallel products (uneven shards)
    both reproduce the single-process run."""
    reference = _single_process_optimizers()
    for result in ranks:
        assert isinstance(result["optimizers"], dict), result["optimizers"]
    first = ranks[0]["optimizers"]
    for result in ranks[1:]:
        for key, tensors in result["optimizers"].items():
            if key.endswith("_state"):
                for a, b in zip(tensors, first[key]):
                    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key
            else:
                if key != "mfac":
                    assert all(torch.equal(a, b) for a, b in zip(tensors, first[key])), key
    for result in ranks:  # M-FAC windows: identical, and a perturbation is refused on every rank
        assert torch.equal(result["optimizers"]["mfac"]["window"][1:], first["mfac"]["window"][1:])
        assert result["optimizers"]["mfac"]["perturbed"]["type"] == "ValueError"
        assert "the M-FAC window differ across ranks" in result["optimizers"]["mfac"]["perturbed"]["message"]
    for key, expected in reference.items():
        # The closure path differences gradients at θ ± εu: the rounding of DDP's averaged gradients
        # (another summation order than one process) is divided by ε, so it agrees to ~1e-6 only.
        tol = 1e-12 if key.endswith("_operator") else 1e-5
        for got, want in zip(first[key], expected):
            _close(got, want, tol)


def test_padded_and_empty_shards_weigh_zero_and_all_empty_is_named():
    """Issue 21: a rank whose shard is only padding, or empty, contributes 0; no rank dies."""
    from tests import cases
    from tests.curvature.reference import dense_ggn, dense_hessian

    run = run_ranks(workers.padded_shards, 3, timeout=120)
    assert run.exitcodes == [0, 0, 0], run
    p = cases.problem("mlp", "ce_ignore_index", "fully_padded")
    names = [n for n, _ in p.model.named_parameters()]
    V = workers.probe_block(sum(q.numel() for q in p.model.parameters()))
    want = {"hessian": dense_hessian(p.model, p.loss_fn, p.batches, names) @ V,
            "ggn_lambda": dense_ggn(p.model, p.loss_fn, p.batches, names) @ V}
    for result in run.results:
        for key, value in want.items():
            assert isinstance(result[key], torch.Tensor), result[key]
            _close(result[key], value, 1e-10)
        assert result["all_padded"]["type"] == "EmptyDataError", result["all_padded"]
