"""HAWQ plans on a CNN trained on scikit-learn's digits (trained once per module, fixed seed)."""

import copy
import statistics

import pytest
import torch
from torch import nn

import quant
from tests.quant.digits import train_digits_cnn

pytest.importorskip("sklearn")

LOSS = nn.CrossEntropyLoss()
CHOICES = (2, 4, 8)


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the autouse one-thread fixture
    try:
        model, train, _ = train_digits_cnn(seed=0)
        calib = (train[0][:512], train[1][:512])
        sens = quant.sensitivity(model, LOSS, calib, num_matvecs=50, generator=torch.Generator().manual_seed(0))
    finally:
        torch.set_num_threads(threads)
    return model, train, calib, sens


def random_losses(model, sens, data, budget, seed):
    plans = quant.sample_plans(model, sens, num_plans=15, bit_choices=CHOICES, max_size_bytes=budget,
                               min_size_bytes=0.85 * budget, generator=torch.Generator().manual_seed(seed))
    assert len(plans) == 15
    return [p.evaluate(model, LOSS, data, metric=None).loss for p in plans]


def test_v2_plan_at_uniform_4bit_size(trained):
    model, train, _, sens = trained
    uniform = quant.make_plan(model, sens, 4)
    plan = quant.allocate_bits(model, sens, bit_choices=CHOICES, max_size_bytes=uniform.size_bytes)
    assert plan.size_bytes <= uniform.size_bytes and plan.omega <= uniform.omega + 1e-15
    plan_loss = plan.evaluate(model, LOSS, train, metric=None).loss
    uniform_loss = uniform.evaluate(model, LOSS, train, metric=None).loss
    assert plan_loss <= uniform_loss + 1e-9
    assert plan_loss < statistics.median(random_losses(model, sens, train, uniform.size_bytes, seed=1))


def test_v2_plan_at_a_size_no_uniform_plan_has(trained):
    # 3 bits is not a choice: the plan must mix 2, 4 and 8 bits
    model, train, _, sens = trained
    budget = quant.make_plan(model, sens, 3).size_bytes
    plan = quant.allocate_bits(model, sens, bit_choices=CHOICES, max_size_bytes=budget)
    dp = quant.allocate_bits(model, sens, bit_choices=CHOICES, max_size_bytes=budget, method="pareto")
    assert dp.omega == pytest.approx(plan.omega, rel=1e-12)
    assert len(set(plan.bits.values())) > 1 and plan.size_bytes <= budget
    plan_loss = plan.evaluate(model, LOSS, train, metric=None).loss
    assert plan_loss < statistics.median(random_losses(model, sens, train, budget, seed=2))


def test_predicted_loss_change_for_8bit_matches_measurement(trained):
    model, _, calib, sens = trained
    m64 = copy.deepcopy(model).double()
    data = (calib[0].double(), calib[1])
    plan = quant.make_plan(m64, sens, 8)
    pred = quant.predict_loss_change(m64, LOSS, data, plan)
    measured = plan.evaluate(m64, LOSS, data, metric=None).loss - quant.evaluate_model(m64, LOSS, data).loss
    assert abs(measured) > 1e-7  # not a vacuous comparison
    assert abs(pred.total - measured) <= 0.1 * abs(measured), (pred, measured)


def test_trace_sensitivities_have_error_bars(trained):
    _, _, _, sens = trained
    assert list(sens) == ["0", "3", "7", "9"]
    for s in sens.values():
        assert s.trace > 0 and 0 < s.trace_stderr < 0.5 * s.trace
        assert s.num_matvecs == 50
