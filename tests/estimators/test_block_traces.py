import math

import pytest
import torch

from curvature import Block, DenseOperator
from curvature.blocks import make_blocks
from estimators import block_traces, trace
from tests.matrices import gen, indefinite, psd

NAMES = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
SHAPES = [(6, 5), (6,), (3, 6), (3,)]  # 30 + 6 + 18 + 3 = 57


def blocked_operator(A=None):
    A = psd(57) if A is None else A
    return DenseOperator(A, blocks=make_blocks(NAMES, SHAPES))


def test_blocks_sum_to_trace_on_the_same_probes():
    op = blocked_operator()
    res = block_traces(op, num_matvecs=40, generator=gen(0), probe_batch_size=16)
    tot = trace(op, num_matvecs=40, generator=gen(0), probe_batch_size=16)
    assert list(res) == NAMES
    assert sum(e.value for e in res.values()) == pytest.approx(tot.value, rel=1e-12)
    assert torch.allclose(sum(e.samples for e in res.values()), tot.samples, rtol=1e-12)


def test_costs_the_same_matvecs_as_one_trace():
    op = blocked_operator()
    res = block_traces(op, num_matvecs=40, generator=gen(0))
    assert op.num_matvecs == 40
    assert all(e.num_matvecs == 40 for e in res.values())


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_each_block_converges_to_its_exact_trace(distribution):
    A = indefinite(57)
    op = blocked_operator(A)
    res = block_traces(op, num_matvecs=4000, generator=gen(1), distribution=distribution, probe_batch_size=1000)
    for b in op.blocks:
        exact = float(A[b.slice, b.slice].trace())
        est = res[b.name]
        assert abs(est.value - exact) < 4 * est.stderr
        assert est.stderr < 0.2  # converging (1/sqrt(m))


def test_unbiased_over_seeds():
    A = indefinite(57)
    op = blocked_operator(A)
    runs = [block_traces(op, num_matvecs=4, generator=gen(s)) for s in range(300)]
    for b in op.blocks:
        values = torch.tensor([r[b.name].value for r in runs])
        se = float(values.std()) / math.sqrt(len(values))
        assert abs(float(values.mean()) - float(A[b.slice, b.slice].trace())) < 4 * se


def test_group_by_module():
    op = blocked_operator()
    per_param = block_traces(op, num_matvecs=30, generator=gen(2))
    per_module = block_traces(op, num_matvecs=30, generator=gen(2), group_by_module=True)
    assert list(per_module) == ["fc1", "fc2"]
    for module in ("fc1", "fc2"):
        expected = per_param[f"{module}.weight"].value + per_param[f"{module}.bias"].value
        assert per_module[module].value == pytest.approx(expected, rel=1e-12)
        assert per_module[module].num_matvecs == 30


def test_dense_tensor_has_one_block_unless_given():
    A = psd(20)
    res = block_traces(A, num_matvecs=10, generator=gen(0))
    assert list(res) == ["all"]
    assert res["all"].value == pytest.approx(trace(A, num_matvecs=10, generator=gen(0)).value, rel=1e-12)
    given = block_traces(A, num_matvecs=10, generator=gen(0), blocks=make_blocks(["a", "b"], [(5,), (15,)]))
    assert list(given) == ["a", "b"]
    assert given["a"].value + given["b"].value == pytest.approx(res["all"].value, rel=1e-12)


def test_rtol_on_the_total():
    op = blocked_operator()
    res = block_traces(op, num_matvecs=2000, rtol=0.02, generator=gen(0), probe_batch_size=8)
    used = next(iter(res.values())).num_matvecs
    assert used < 2000 and op.num_matvecs == used
    assert all(e.converged for e in res.values())


def test_deterministic():
    op = blocked_operator()
    a = block_traces(op, num_matvecs=12, generator=gen(5))
    b = block_traces(op, num_matvecs=12, generator=gen(5))
    assert a == b


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(num_matvecs=0), ValueError, "num_matvecs"),
        (dict(num_matvecs=4, blocks=[Block("x", (100,), slice(0, 100))]), ValueError, "blocks"),
        (dict(num_matvecs=4, blocks=["x"]), TypeError, "blocks"),
        (dict(num_matvecs=4, blocks=[]), ValueError, "blocks"),
        (dict(num_matvecs=4, blocks=make_blocks(["a", "a"], [(2,), (2,)])), ValueError, "duplicate"),
        (dict(num_matvecs=4, distribution="sphere"), ValueError, "distribution"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        block_traces(psd(20), **kwargs)
