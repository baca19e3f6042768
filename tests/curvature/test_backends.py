"""The one backend selector (curvature.backends): the auto choice is reproducible, readable,
pinnable, shared per (operator, model, device, k), re-checked and memory-bounded, for the Hessian
and the output-space operators alike."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvature import GGN, Hessian, backends
from tests.curvature import reference as ref
from tests.curvature.models import make_batches


@pytest.fixture
def clean_choices():
    backends.clear()
    yield
    backends.clear()


def _tanh_case():
    model, batches = make_batches("mlp", "ce", sizes=(16, 16))
    return model, nn.CrossEntropyLoss(), batches


def test_deterministic_auto_is_bitwise_reproducible_and_column_exact(clean_choices):
    model, loss_fn, batches = _tanh_case()
    H = Hessian(model, loss_fn, batches, deterministic=True)
    V = torch.randn(H.shape[0], 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    first = H @ V
    again = Hessian(model, loss_fn, batches, deterministic=True) @ V
    assert torch.equal(first, again) and torch.equal(first, H @ V)
    for j in range(V.shape[1]):  # each column bitwise equal to its own single product
        assert torch.equal(first[:, j], H @ V[:, j].contiguous())
    choice = H.backend_choice(6)
    assert (choice.backend, choice.source) == ("loop", "rule")
    assert not backends.choices()  # a rule is not recorded as a measurement


def test_measured_choice_is_recorded_readable_and_shared(clean_choices):
    model, loss_fn, batches = _tanh_case()
    H = Hessian(model, loss_fn, batches, memory_budget=1 << 30)
    V = torch.randn(H.shape[0], 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = Hessian(model, loss_fn, batches, backend="loop") @ V
    assert ref.rel_err(H @ V, exact) <= 1e-12
    key = H.backend_key(4)
    choice = backends.lookup(key)
    assert choice is not None and choice.source == "measured" and H.backend_choice(4).backend == choice.backend
    assert set(choice.seconds_per_column) >= {"loop"}
    other = Hessian(model, loss_fn, batches)
    assert other.backend_key(4) == key and other.backend_choice(4).backend == choice.backend  # no new timing
    assert choice.to_dict()["backend"] == choice.backend


def test_pinned_choice_wins(clean_choices):
    model, loss_fn, batches = _tanh_case()
    H = Hessian(model, loss_fn, batches)
    backends.pin(H.backend_key(3), "forward_over_reverse")
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = Hessian(model, loss_fn, batches, backend="loop") @ V
    assert ref.rel_err(H @ V, exact) <= 1e-12
    assert H.backend_choice(3).source == "pinned" and H.backend_choice(3).backend == "forward_over_reverse"
    with pytest.raises(ValueError, match="backend"):
        backends.pin(H.backend_key(3), "magic")


def test_median_rule_ignores_one_lucky_sample():
    noisy = {"loop": [1.0, 1.02, 0.99], "vmap": [0.3, 1.5, 1.4]}
    assert backends.select_by_medians(noisy) == "loop"
    close = {"loop": [1.0, 1.0, 1.0], "forward_over_reverse": [0.93, 0.95, 0.94]}
    assert backends.select_by_medians(close) == "loop"  # within 10%: the lighter loop
    clear_win = {"loop": [1.0, 1.0, 1.0], "forward_over_reverse": [0.5, 0.6, 0.55]}
    assert backends.select_by_medians(clear_win) == "forward_over_reverse"


def test_recheck_drops_a_vmapped_choice_that_is_slower_than_the_loop(clean_choices):
    model, loss_fn, batches = _tanh_case()
    H = Hessian(model, loss_fn, batches)
    key = H.backend_key(4)
    fake = backends.BackendChoice(
        "vmap", "measured", seconds_per_column={"loop": 1e-12}, columns=4
    )
    backends.record(key, fake)
    H._selector._rechecks[4] = 1
    V = torch.randn(H.shape[0], 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = H @ V
    assert ref.rel_err(out, Hessian(model, loss_fn, batches, backend="loop") @ V) <= 1e-12
    assert H.backend_choice(4).backend == "loop"
    assert backends.lookup(key).reason.startswith("re-check")


def test_memory_budget_bounds_the_vmapped_columns(clean_choices):
    model, loss_fn, batches = _tanh_case()
    H = Hessian(model, loss_fn, batches, memory_budget=0)
    V = torch.randn(H.shape[0], 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = Hessian(model, loss_fn, batches, backend="loop") @ V
    assert ref.rel_err(H @ V, exact) <= 1e-12
    choice = H.backend_choice(8)
    assert choice.backend == "loop" and "memory budget" in choice.reason
    # An explicit vmapped backend takes as many columns per pass as the budget allows.
    Hv = Hessian(model, loss_fn, batches, backend="vmap", memory_budget=0)
    Hv @ V[:, :1]
    Hv._graph_bytes = 1000
    Hv._selector.memory_budget = 3000
    assert Hv._selector.columns("vmap", 8, Hv._bytes_per_column("vmap"), Hv.device) == 3
    assert ref.rel_err(Hv @ V, exact) <= 1e-12


def test_out_of_memory_falls_back_to_the_loop(clean_choices, monkeypatch, caplog):
    model, loss_fn, batches = _tanh_case()
    H = Hessian(model, loss_fn, batches, backend="vmap")

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(H, "_vmapped_second_backward", boom)
    V = torch.randn(H.shape[0], 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with caplog.at_level("WARNING", logger="curvature.hessian"):
        out = H @ V
    assert ref.rel_err(out, Hessian(model, loss_fn, batches, backend="loop") @ V) <= 1e-12
    assert "out of memory" in caplog.text


# -- one policy and one vocabulary for every operator ---------------------------------------------
def test_every_operator_speaks_the_one_vocabulary():
    from curvature import EmpiricalFisher, Fisher

    for Op in (Hessian, GGN, Fisher, EmpiricalFisher):
        assert Op.backends[0] == "loop" and set(Op.backends) <= set(backends.BACKENDS)
    model, loss_fn, batches = _tanh_case()
    with pytest.raises(ValueError, match="backend must be one of"):
        GGN(model, loss_fn, batches, backend="double_backward")
    with pytest.raises(ValueError, match="backend must be one of"):
        GGN(model, loss_fn, batches, backend="finite_difference")  # Hessian only


def test_output_space_choice_is_recorded_per_operator_and_pinnable(clean_choices):
    model, loss_fn, batches = _tanh_case()
    G = GGN(model, loss_fn, batches, memory_budget=1 << 30)
    H = Hessian(model, loss_fn, batches, deterministic=True)
    assert G.backend_key(4) != H.backend_key(4)  # the GGN and the Hessian choose independently
    V = torch.randn(G.shape[0], 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = GGN(model, loss_fn, batches, backend="loop") @ V
    assert ref.rel_err(G @ V, exact) <= 1e-12
    choice = backends.lookup(G.backend_key(4))
    assert choice.source == "measured" and set(choice.seconds_per_column) == {"loop", "vmap"}
    assert G.backend_choice(4) == choice and GGN(model, loss_fn, batches).backend_choice(4) == choice
    backends.pin(G.backend_key(4), "vmap", columns=3)
    assert G.backend_choice(4).source == "pinned"
    assert ref.rel_err(G @ V, exact) <= 1e-12


def test_output_space_memory_budget_bounds_the_batched_columns(clean_choices):
    model, loss_fn, batches = _tanh_case()
    G = GGN(model, loss_fn, batches, memory_budget=0)
    V = torch.randn(G.shape[0], 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = GGN(model, loss_fn, batches, backend="loop") @ V
    assert ref.rel_err(G @ V, exact) <= 1e-12
    choice = G.backend_choice(8)
    assert choice.backend == "loop" and "memory budget" in choice.reason


def test_deterministic_is_the_fixed_rule_for_every_operator(clean_choices):
    model, loss_fn, batches = _tanh_case()
    d = Hessian(model, loss_fn, batches).shape[0]
    V = torch.randn(d, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for Op in (Hessian, GGN):
        op = Op(model, loss_fn, batches, deterministic=True)
        first = op @ V
        assert torch.equal(first, Op(model, loss_fn, batches, deterministic=True) @ V)
        assert op.backend_choice(5).reason == "deterministic=True"
    assert not backends.choices()


def test_cpu_budget_keeps_a_trace_within_1_2x_of_one_column_at_a_time():
    """Issue 21: batched columns may add at most 10% to the process's memory (the allocator's
    run-to-run noise, ~5%, must still fit under 1.2x)."""
    from curvature._memory import CPU_FLOOR, default_memory_budget, used_memory

    ballast = torch.ones(400 << 20, dtype=torch.uint8)  # a process well above the 64 MiB floor's range
    used = used_memory("cpu")
    budget = default_memory_budget("cpu")
    del ballast
    assert budget <= max(CPU_FLOOR, 0.1 * used * 1.05) and budget >= min(CPU_FLOOR, 0.1 * used)
