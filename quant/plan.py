"""Bit plans: bit-width per layer with its size, BOPs and predicted Ω; save/load, apply, evaluate."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from .layers import Evaluation, channel_axis, evaluate_model, quantizable_layers
from .quantizers import check_bits, quantize_weight

__all__ = ["BitPlan", "SCHEMA_VERSION", "PlanFileError"]

#: Version of the JSON layout written by :meth:`BitPlan.to_json`.
SCHEMA_VERSION = 1


class PlanFileError(ValueError):
    """A bit-plan file (or dictionary) does not follow the schema: the message names the key."""


#: The schema: required and optional top-level keys.
_REQUIRED = ("schema_version", "bits", "size_bytes", "bops", "omega")
# "provenance": how the file was made (the `curvature` command writes one); read and ignored
_OPTIONAL = ("omega_per_layer", "metric", "method", "quantizer", "activation_bits", "provenance")
_QUANTIZER_KEYS = ("symmetric", "per_channel")
_PLAN_METRICS = ("trace", "eigenvalue")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_integer(x: Any) -> bool:
    if isinstance(x, float):
        return x.is_integer()
    return isinstance(x, int) and not isinstance(x, bool)


def _check_payload(payload: Any) -> None:
    """Raise :class:`PlanFileError` naming the first key that breaks schema version 1."""
    if not isinstance(payload, Mapping):
        raise PlanFileError(f"a bit plan must be a JSON object, got {type(payload).__name__}")
    version = payload.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise PlanFileError(f"unsupported bit-plan schema_version {version!r}; this reader knows {SCHEMA_VERSION}")
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise PlanFileError(f"bit plan is missing keys {missing}")
    unknown = sorted(set(map(str, payload)) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        known = list(_REQUIRED + _OPTIONAL)
        raise PlanFileError(f"bit plan has unknown keys {unknown}; schema version 1 knows {known}")
    bits = payload["bits"]
    if not isinstance(bits, Mapping) or not bits:
        raise PlanFileError(f"'bits' must be a non-empty object layer -> integer, got {bits!r}")
    for name, b in bits.items():
        if not isinstance(name, str) or not _is_integer(b) or not 1 <= b <= 32:
            raise PlanFileError(f"'bits'[{name!r}] must be an integer in 1..32, got {b!r}")
    for key in ("size_bytes", "bops", "omega"):
        if not _is_number(payload[key]):
            raise PlanFileError(f"{key!r} must be a number, got {payload[key]!r}")
    per_layer = payload.get("omega_per_layer", {})
    if not isinstance(per_layer, Mapping) or not all(_is_number(v) for v in per_layer.values()):
        raise PlanFileError(f"'omega_per_layer' must be an object layer -> number, got {per_layer!r}")
    stray = sorted(set(per_layer) - set(bits))
    if stray:
        raise PlanFileError(f"'omega_per_layer' names layers not in 'bits': {stray}")
    if "metric" in payload and payload["metric"] not in _PLAN_METRICS:
        raise PlanFileError(f"'metric' must be one of {_PLAN_METRICS}, got {payload['metric']!r}")
    if "method" in payload and not isinstance(payload["method"], str):
        raise PlanFileError(f"'method' must be a string, got {payload['method']!r}")
    quantizer = payload.get("quantizer", {})
    if not isinstance(quantizer, Mapping):
        raise PlanFileError(f"'quantizer' must be an object with booleans {list(_QUANTIZER_KEYS)}, got {quantizer!r}")
    odd = sorted(set(map(str, quantizer)) - set(_QUANTIZER_KEYS))
    if odd:
        raise PlanFileError(f"'quantizer' has unknown keys {odd}; it knows {list(_QUANTIZER_KEYS)}")
    for key in _QUANTIZER_KEYS:
        if key in quantizer and not isinstance(quantizer[key], bool):
            raise PlanFileError(f"'quantizer'.{key!r} must be true or false, got {quantizer[key]!r}")
    if not isinstance(payload.get("provenance", {}), Mapping):
        raise PlanFileError(f"'provenance' must be an object, got {payload['provenance']!r}")
    act = payload.get("activation_bits")
    if act is not None and not (_is_integer(act) and 1 <= act <= 32):
        raise PlanFileError(f"'activation_bits' must be null or an integer in 1..32, got {act!r}")


def with_weights(model: nn.Module, weights: Mapping[str, Tensor]) -> nn.Module:
    """A deep copy of ``model`` with the named modules' weights replaced (``model`` is untouched)."""
    clone = copy.deepcopy(model)
    modules = dict(clone.named_modules())
    with torch.no_grad():
        for name, w in weights.items():
            modules[name].weight.copy_(w)
    return clone


@dataclass(frozen=True)
class BitPlan:
    """A mixed-precision plan: one weight bit-width per layer, with its predicted cost and error.

    Attributes:
        bits: ``{layer name: bits}`` in model order (read-only mapping).
        size_bytes: total model size: the quantized weights at their bit-widths plus every other
            parameter (biases, norms) at its storage dtype.
        bops: bit operations per sample, ``Σ_i MACs_i · b_w,i · b_a,i`` (activation bits equal to
            the weight bits unless ``activation_bits`` is set).
        omega: predicted loss perturbation ``Ω = Σ_i score_i · ‖Q_{b_i}(W_i) − W_i‖²``.
        omega_per_layer: ``{layer: Ω_i}`` (read-only mapping).
        metric: the sensitivity behind Ω (``"trace"``: HAWQ-V2; ``"eigenvalue"``: HAWQ-V1).
        symmetric, per_channel: the weight quantizer (see :func:`quant.quantize_weight`).
        activation_bits: fixed activation bit-width used for BOPs (``None``: equal to weights).
        method: how the plan was made (``"ilp"``, ``"pareto"``, ``"manual"``, ...).

    JSON schema, version 1 (:meth:`to_json`): an object with ``"schema_version": 1``,
    ``"bits"`` (object: layer name -> integer 1..32), ``"size_bytes"`` (number), ``"bops"``
    (number), ``"omega"`` (number), ``"omega_per_layer"`` (object: layer -> number),
    ``"metric"`` (``"trace"`` or ``"eigenvalue"``), ``"method"`` (string), ``"quantizer"``
    (object with booleans ``"symmetric"`` and ``"per_channel"``), ``"activation_bits"``
    (integer 1..32 or null), ``"provenance"`` (object, how the file was made; read and ignored).
    :meth:`from_dict` checks every value's type and range and refuses
    unknown keys, with a :class:`PlanFileError` naming the key (never a coercion: ``"false"``
    is not a boolean). Readers reject other versions; later versions only add keys.

    Examples:
        >>> plan = BitPlan({"0": 8, "2": 4}, size_bytes=100.0, bops=0.0, omega=0.1,
        ...                omega_per_layer={"0": 0.02, "2": 0.08})
        >>> plan.bits["2"], plan.finetune_order
        (4, ('2', '0'))
        >>> BitPlan.from_dict(plan.to_dict()) == plan
        True
    """

    bits: Mapping[str, int]
    size_bytes: float
    bops: float
    omega: float
    omega_per_layer: Mapping[str, float] = field(default_factory=dict)
    metric: str = "trace"
    symmetric: bool = True
    per_channel: bool = True
    activation_bits: int | None = None
    method: str = "manual"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, Mapping) or not self.bits:
            raise ValueError("bits must be a non-empty mapping from layer name to bit-width")
        bits = {}
        for name, b in self.bits.items():
            if not isinstance(name, str):
                raise TypeError(f"bits: layer names must be strings, got {type(name).__name__}")
            bits[name] = check_bits(int(b) if isinstance(b, float) and b.is_integer() else b, name=f"bits[{name!r}]")
        if self.activation_bits is not None:
            check_bits(self.activation_bits, name="activation_bits")
        for key in ("symmetric", "per_channel"):
            if not isinstance(getattr(self, key), bool):
                raise TypeError(f"{key} must be a bool, got {getattr(self, key)!r}")
        unknown = set(self.omega_per_layer) - set(bits)
        if unknown:
            raise ValueError(f"omega_per_layer names layers not in bits: {sorted(unknown)}")
        object.__setattr__(self, "bits", MappingProxyType(bits))
        omega = {k: float(v) for k, v in self.omega_per_layer.items()}
        object.__setattr__(self, "omega_per_layer", MappingProxyType(omega))
        object.__setattr__(self, "size_bytes", float(self.size_bytes))
        object.__setattr__(self, "bops", float(self.bops))
        object.__setattr__(self, "omega", float(self.omega))

    def __hash__(self) -> int:
        return hash((tuple(self.bits.items()), self.size_bytes, self.method))

    def __deepcopy__(self, memo: dict) -> BitPlan:
        return self  # immutable

    def __reduce__(self) -> tuple[Any, ...]:
        return (BitPlan.from_dict, (self.to_dict(),))

    # -- views ------------------------------------------------------------------------------------
    @property
    def finetune_order(self) -> tuple[str, ...]:
        """HAWQ-V1's block-wise fine-tuning order: layers by descending ``Ω_i`` (Dong et al. 2019).

        Quantize and fine-tune the layer with the largest expected perturbation first, while the
        not-yet-quantized layers can still compensate. Layers without a recorded ``Ω_i`` come last.
        """
        names = list(self.bits)
        return tuple(sorted(names, key=lambda n: (-self.omega_per_layer.get(n, float("-inf")), names.index(n))))

    @property
    def size_bits(self) -> float:
        return self.size_bytes * 8

    def __str__(self) -> str:
        bits = ", ".join(f"{k}:{v}" for k, v in self.bits.items())
        return f"BitPlan({bits}; {self.size_bytes:.0f} B, Ω={self.omega:.4g}, {self.method})"

    # -- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The schema-version-1 dictionary (see the class docstring)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "bits": dict(self.bits),
            "size_bytes": self.size_bytes,
            "bops": self.bops,
            "omega": self.omega,
            "omega_per_layer": dict(self.omega_per_layer),
            "metric": self.metric,
            "method": self.method,
            "quantizer": {"symmetric": self.symmetric, "per_channel": self.per_channel},
            "activation_bits": self.activation_bits,
        }

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> BitPlan:
        """Rebuild a plan from :meth:`to_dict`'s output, validated against the schema.

        Raises:
            PlanFileError: (a ``ValueError``) naming the key whose value breaks the schema.

        Examples:
            >>> BitPlan.from_dict({"schema_version": 1, "bits": {"fc": 4}, "size_bytes": 2,
            ...                    "bops": 0, "omega": 0, "quantizer": {"symmetric": "false"}})
            Traceback (most recent call last):
            ...
            quant.plan.PlanFileError: 'quantizer'.'symmetric' must be true or false, got 'false'
        """
        _check_payload(payload)
        quantizer = payload.get("quantizer", {})
        act = payload.get("activation_bits")
        return cls(
            bits={k: int(v) for k, v in payload["bits"].items()},
            size_bytes=payload["size_bytes"],
            bops=payload["bops"],
            omega=payload["omega"],
            omega_per_layer=payload.get("omega_per_layer", {}),
            metric=payload.get("metric", "trace"),
            symmetric=quantizer.get("symmetric", True),
            per_channel=quantizer.get("per_channel", True),
            activation_bits=None if act is None else int(act),
            method=payload.get("method", "manual"),
        )

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON (schema version 1)."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> BitPlan:
        """Read a plan written by :meth:`to_json`."""
        with open(path) as f:
            try:
                payload = json.load(f)
            except json.JSONDecodeError as e:
                raise PlanFileError(f"{os.fspath(path)!r} is not JSON: {e}") from None
        return cls.from_dict(payload)

    # -- use ----------------------------------------------------------------------------------
    def quantized_weights(self, model: nn.Module) -> dict[str, Tensor]:
        """``{layer: Q_{b}(W)}`` for every layer of the plan (the model is not modified)."""
        layers = quantizable_layers(model, list(self.bits))
        return {
            name: quantize_weight(m.weight.detach(), self.bits[name], symmetric=self.symmetric,
                                  per_channel=self.per_channel, channel_axis=channel_axis(m))
            for name, m in layers.items()
        }

    def apply(self, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` whose planned weights are fake-quantized (``W ← Q_b(W)``).

        The original model is left untouched. Every layer of the plan must exist in the model.
        """
        return with_weights(model, self.quantized_weights(model))

    def evaluate(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        data: Any,
        *,
        metric: str | Callable[[Any, Tensor], Any] | None = "auto",
        ignore_index: int | None = None,
    ) -> Evaluation:
        """Loss and accuracy (or ``metric``) of the quantized copy of ``model`` on ``data``.

        See :func:`quant.evaluate_model` for ``metric`` and ``ignore_index``.
        """
        return evaluate_model(self.apply(model), loss_fn, data, metric=metric, ignore_index=ignore_index)
