"""BitPlan files are validated against schema version 1 (issue 21: ``bool("false")`` was True)."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import quant
from quant import BitPlan, PlanFileError

BASE = {"schema_version": 1, "bits": {"0": 4, "2": 8}, "size_bytes": 10.0, "bops": 0.0, "omega": 0.5}


def with_(**changes):
    payload = json.loads(json.dumps(BASE))
    payload.update(changes)
    return payload


def test_string_false_is_refused_not_read_as_true():
    with pytest.raises(PlanFileError, match="'symmetric' must be true or false"):
        BitPlan.from_dict(with_(quantizer={"symmetric": "false"}))  # loaded as symmetric=True before


def test_null_quantizer_is_a_named_error():
    with pytest.raises(PlanFileError, match="'quantizer' must be an object"):
        BitPlan.from_dict(with_(quantizer=None))  # AttributeError before


def test_the_loaded_quantizer_is_the_one_applied():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    plan = BitPlan.from_dict(with_(quantizer={"symmetric": False, "per_channel": True}))
    assert plan.symmetric is False
    w = model[0].weight.detach()
    assert torch.equal(plan.quantized_weights(model)["0"], quant.quantize_weight(w, 4, symmetric=False))


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"bits": {"0": "4"}}, "'bits'"),
        ({"bits": {"0": 4.5}}, "'bits'"),
        ({"bits": {"0": 0}}, "'bits'"),
        ({"bits": {"0": True}}, "'bits'"),
        ({"bits": {}}, "'bits'"),
        ({"size_bytes": "10"}, "'size_bytes'"),
        ({"omega": None}, "'omega'"),
        ({"bops": False}, "'bops'"),
        ({"metric": "hessian"}, "'metric'"),
        ({"method": 3}, "'method'"),
        ({"activation_bits": "8"}, "'activation_bits'"),
        ({"activation_bits": 64}, "'activation_bits'"),
        ({"omega_per_layer": {"7": 1.0}}, "'omega_per_layer'"),
        ({"omega_per_layer": {"0": "x"}}, "'omega_per_layer'"),
        ({"quantizer": {"symmetric": True, "per_tensor": True}}, "'quantizer'"),
        ({"quantizer": {"per_channel": 1}}, "'per_channel'"),
        ({"schema_version": True}, "schema_version"),
        ({"extra": 1}, "unknown keys"),
        ({"provenance": "cli"}, "'provenance' must be an object"),
    ],
)
def test_malformed_values_are_named(changes, key):
    with pytest.raises(PlanFileError, match=key):
        BitPlan.from_dict(with_(**changes))


def test_missing_key_and_bad_json(tmp_path):
    payload = with_()
    del payload["omega"]
    with pytest.raises(PlanFileError, match="missing"):
        BitPlan.from_dict(payload)
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(PlanFileError, match="not JSON"):
        BitPlan.from_json(path)


def test_constructor_refuses_non_bool_quantizer_flags():
    with pytest.raises(TypeError, match="symmetric"):
        BitPlan({"0": 4}, size_bytes=1, bops=0, omega=0, symmetric="false")


names = st.text(alphabet="abc.0123_", min_size=1, max_size=6)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
plans = st.builds(
    lambda bits, size, bops, omega, per, metric, sym, pc, act, method: BitPlan(
        bits, size_bytes=size, bops=bops, omega=omega,
        omega_per_layer={k: v for k, v in zip(bits, per)}, metric=metric, symmetric=sym, per_channel=pc,
        activation_bits=act, method=method,
    ),
    st.dictionaries(names, st.integers(1, 32), min_size=1, max_size=5),
    finite, finite, finite, st.lists(finite, max_size=5), st.sampled_from(["trace", "eigenvalue"]),
    st.booleans(), st.booleans(), st.none() | st.integers(1, 32), st.text(max_size=8),
)


@settings(max_examples=150, deadline=None)
@given(plans)
def test_round_trip_through_json(plan):
    again = BitPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.to_dict() == plan.to_dict()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 40) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(BASE) + ["omega_per_layer", "metric", "method", "quantizer", "activation_bits"]),
       json_values)
def test_any_malformed_file_is_refused_by_name_or_loads_exactly(key, value):
    payload = with_(**{key: value})
    try:
        plan = BitPlan.from_dict(payload)
    except PlanFileError:
        return  # a named error: fine
    # accepted: then it holds exactly the file's values, nothing coerced
    out = plan.to_dict()
    for k, v in payload.items():
        if k == "quantizer":
            assert {**{"symmetric": True, "per_channel": True}, **v} == out["quantizer"]
        elif k == "bits":
            assert out["bits"] == v and all(type(b) is int for b in out["bits"].values())
        else:
            assert out[k] == v
