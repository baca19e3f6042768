"""The schema of ``summary.json`` (version 2) and a small validator for it.

``summary.json`` is written by every ``curvature`` subcommand (and printed by ``--json``). It is a
JSON object; numbers that are not finite are written as ``null``; every estimate is an object
``{"value", "stderr", "num_matvecs", "method"}`` with ``stderr`` one standard error (``0`` when
exact, ``null`` when it cannot be estimated). Sections that were not computed (another subcommand,
or an interrupted run: ``"complete": false``) are ``null``; optional sections that could not run for
the problem are ``null`` and named in ``"skipped"`` with the reason. ``"provenance"`` (version 2)
records the command line, seed, quick flag, budgets, versions, device, date and the timings: the
only part that differs between two runs with one seed. Version 2 moved ``timings_s`` into it.
Later versions only add keys.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SCHEMA_VERSION", "SUMMARY_SCHEMA", "validate"]

SCHEMA_VERSION = 2

_NUM = {"type": ["number", "null"]}
_EST = {"type": "object", "required": ["value", "stderr", "num_matvecs", "method"],
        "properties": {"value": _NUM, "stderr": _NUM, "num_matvecs": {"type": "integer"}, "method": {"type": "string"}}}
_EIG = {"type": "object", "required": ["value", "solver_residual", "true_relative_residual", "converged"],
        "properties": {"value": {"type": "number"}, "solver_residual": _NUM, "true_relative_residual": _NUM,
                       "converged": {"type": "boolean"}}}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


#: JSON Schema (draft 2020-12 subset: type, required, properties, items, anyOf) of ``summary.json``.
SUMMARY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["schema_version", "command", "complete", "sections", "problem", "traces", "eigenvalues",
                 "spectrum", "analyses", "quantization", "skipped", "files", "provenance"],
    "properties": {
        "schema_version": {"type": "integer"},
        "command": {"type": "string"},
        "complete": {"type": "boolean"},
        "sections": {"type": "array", "items": {"type": "string"}},
        "problem": _nullable({
            "type": "object",
            "required": ["name", "num_params", "num_layers", "num_samples", "num_batches", "loss", "grad_norm",
                         "metric", "info", "dtype", "device", "ggn_unavailable"],
            "properties": {
                "name": {"type": "string"}, "num_params": {"type": "integer"}, "num_layers": {"type": "integer"},
                "num_samples": {"type": "integer"}, "num_batches": {"type": "integer"}, "loss": _NUM,
                "grad_norm": _NUM, "info": {"type": "object"}, "dtype": {"type": "string"},
                "device": {"type": "string"}, "ggn_unavailable": {"type": ["string", "null"]},
                "metric": _nullable({"type": "object", "required": ["name", "value"]}),
            },
        }),
        "traces": _nullable({
            "type": "object", "required": ["hessian", "ggn", "alternatives", "layers", "notes"],
            "properties": {
                "hessian": _EST, "ggn": _nullable(_EST), "alternatives": {"type": "object"},
                "notes": {"type": "array", "items": {"type": "string"}},
                "layers": {"type": "array", "items": {
                    "type": "object", "required": ["name", "type", "numel", "trace", "trace_per_param"],
                    "properties": {"name": {"type": "string"}, "type": {"type": "string"},
                                   "numel": {"type": "integer"}, "trace": _EST, "trace_per_param": _NUM}}},
            },
        }),
        "eigenvalues": _nullable({
            "type": "object", "required": ["top", "smallest"],
            "properties": {"top": {"type": "array", "items": _EIG}, "smallest": _EIG},
        }),
        "spectrum": _nullable({
            "type": "object", "required": ["num_probes", "num_steps", "support", "trace", "negative_mass",
                                           "noise_floor", "below_noise_floor_mass"],
            "properties": {"num_probes": {"type": "integer"}, "num_steps": {"type": "integer"},
                           "support": {"type": "array", "items": {"type": "number"}}, "trace": _EST,
                           "negative_mass": {"type": "number"}},
        }),
        "analyses": _nullable({
            "type": "object", "required": ["outliers", "decomposition", "hyperparameters", "skipped"],
            "properties": {"outliers": {"type": ["object", "null"]}, "decomposition": {"type": ["object", "null"]},
                           "hyperparameters": {"type": ["object", "null"]}, "skipped": {"type": "object"}},
        }),
        "quantization": _nullable({
            "type": "object", "required": ["plan", "budget_bytes", "uniform", "layers"],
            "properties": {"plan": {"type": "object", "required": ["bits", "size_bytes", "omega"]},
                           "budget_bytes": {"type": "number"}, "uniform": {"type": "object"},
                           "layers": {"type": "array", "items": {"type": "object"}}},
        }),
        "skipped": {"type": "object"},
        "files": {"type": "object"},
        "provenance": _nullable({
            "type": "object",
            "required": ["command_line", "problem", "seed", "quick", "settings", "versions", "device", "date",
                         "deterministic", "timings_s"],
            "properties": {"command_line": {"type": ["string", "null"]}, "problem": {"type": "string"},
                           "seed": {"type": ["integer", "null"]}, "quick": {"type": "boolean"},
                           "settings": {"type": "object"}, "versions": {"type": "object"},
                           "device": {"type": "string"}, "date": {"type": "string"},
                           "deterministic": {"type": "string"}, "timings_s": {"type": "object"}},
        }),
    },
}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[kind])


def validate(instance: Any, schema: dict[str, Any] = SUMMARY_SCHEMA, path: str = "$") -> list[str]:
    """Every violation of ``schema`` in ``instance`` (empty when valid), as ``"path: problem"``.

    Examples:
        >>> validate({"a": 1}, {"type": "object", "required": ["a", "b"]})
        ['$: missing key b']
        >>> validate([1, "x"], {"type": "array", "items": {"type": "integer"}})
        ["$[1]: expected integer, got 'x'"]
    """
    if "anyOf" in schema:
        options = [validate(instance, s, path) for s in schema["anyOf"]]
        return [] if any(not o for o in options) else min(options, key=len)
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_is(instance, k) for k in kinds):
            return [f"{path}: expected {' or '.join(kinds)}, got {instance!r}"[:200]]
    errors = []
    if isinstance(instance, dict):
        errors += [f"{path}: missing key {k}" for k in schema.get("required", []) if k not in instance]
        for key, sub in schema.get("properties", {}).items():
            if key in instance:
                errors += validate(instance[key], sub, f"{path}.{key}")
    if isinstance(instance, list) and "items" in schema:
        for i, item in enumerate(instance):
            errors += validate(item, schema["items"], f"{path}[{i}]")
    return errors
