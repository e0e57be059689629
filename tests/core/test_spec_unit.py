"""The typed specs (kiln.spec) against the CRD schemas: no drift, defaults only in the CRD.

The walk fails on a CRD field without a dataclass field (or the reverse), on a type that does not
match the schema's, and on a field typed as always present that the CRD neither requires nor defaults
(the code would need a default of its own: exactly what kiln.spec exists to prevent).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import pytest
from kiln_server.settings import Settings

from kiln import spec
from kiln.schema import openapi_schema, with_defaults

pytestmark = [pytest.mark.unit]

SCALARS = {"string": str, "integer": int, "number": float, "boolean": bool}


def _matches(hint: Any, schema: dict[str, Any], where: str, problems: list[str]) -> None:
    """Whether the (None-stripped) type `hint` fits `schema`; nested models are walked."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if schema.get("x-kubernetes-int-or-string"):
        if set(args) != {int, str}:
            problems.append(f"{where}: int-or-string in the CRD, {hint} in kiln.spec")
        return
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        if "type" not in schema:  # any JSON value (e.g. a tuning parameter's list or {min, max})
            if hint is not Any:
                problems.append(f"{where}: any JSON value in the CRD, {hint} in kiln.spec")
        elif origin is not dict:
            problems.append(f"{where}: free-form object in the CRD, {hint} in kiln.spec")
        return
    kind = schema.get("type")
    if kind in SCALARS:
        if hint is not SCALARS[kind]:
            problems.append(f"{where}: {kind} in the CRD, {hint} in kiln.spec")
    elif kind == "array":
        if origin is not list:
            problems.append(f"{where}: array in the CRD, {hint} in kiln.spec")
        else:
            _matches(args[0], schema["items"], f"{where}[]", problems)
    elif kind == "object" and "properties" in schema:
        if not (isinstance(hint, type) and issubclass(hint, spec.Model)):
            problems.append(f"{where}: object with fields in the CRD, {hint} in kiln.spec")
        else:
            walk(hint, schema, where, problems)
    elif kind == "object":
        if origin is not dict:
            problems.append(f"{where}: map in the CRD, {hint} in kiln.spec")
        else:
            _matches(args[1], schema["additionalProperties"], f"{where}{{}}", problems)
    else:
        problems.append(f"{where}: CRD type {kind!r} has no mapping")


def walk(cls: type[spec.Model], schema: dict[str, Any], where: str, problems: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    props = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    fields = {f.key: f for f in spec.plan(cls)}
    for key in sorted(set(props) - set(fields)):
        problems.append(f"{where}.{key}: in the CRD, not in {cls.__name__}")
    for key in sorted(set(fields) - set(props)):
        problems.append(f"{where}.{key}: in {cls.__name__}, not in the CRD")
    for key in sorted(set(fields) & set(props)):
        f, sub = fields[key], props[key]
        hint, optional = spec._unwrap(hints[f.name])
        always = key in required or "default" in sub
        is_object = sub.get("type") == "object" and "properties" in sub
        if optional and always:
            problems.append(f"{where}.{key}: the CRD requires or defaults it, {cls.__name__} allows None")
        if not optional and not always and not (is_object and not sub.get("required")):
            problems.append(f"{where}.{key}: neither required nor defaulted in the CRD, but {cls.__name__} needs a value")
        _matches(hint, sub, f"{where}.{key}", problems)
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            problems.append(f"{where}: {cls.__name__}.{f.name} has a default of its own (defaults belong in the CRD)")


@pytest.mark.parametrize("cls", spec.TOP_LEVEL, ids=lambda c: c.KIND)
def test_typed_spec_matches_crd_schema(cls: type[spec.Model]) -> None:
    problems: list[str] = []
    walk(cls, openapi_schema(cls.KIND)["properties"]["spec"], "spec", problems)
    assert problems == []


def test_walk_finds_drift() -> None:
    """The walk itself can fail: a renamed field, a wrong type and a missing default are each found."""
    @dataclasses.dataclass(frozen=True)
    class Drifted(spec.Model):
        max_batch_size: str
        max_latency: float

    problems: list[str] = []
    walk(Drifted, openapi_schema("ModelDeployment")["properties"]["spec"]["properties"]["batching"], "batching", problems)
    assert any("maxLatencyMs: in the CRD" in p for p in problems)
    assert any("maxLatency: in Drifted, not in the CRD" in p for p in problems)
    assert any("integer in the CRD" in p for p in problems)


def test_absent_fields_take_the_crd_defaults() -> None:
    tj = spec.TrainingJobSpec.from_dict({"dataset": {"uri": "d.csv"}, "model": {"inputShape": [4], "layers": [{"type": "Dense"}]}})
    schema = openapi_schema("TrainingJob")["properties"]["spec"]["properties"]
    assert tj.training.epochs == schema["training"]["properties"]["epochs"]["default"]
    assert tj.output.formats == ["onnx"] and tj.run_policy.restart_policy == "Never" and tj.deploy is None
    assert tj.dataset is not None and tj.dataset.preprocessing.missing_values == "drop"
    md = spec.ModelDeploymentSpec.from_dict({"model": {"uri": "s3://b/m.onnx"}, "batching": {}})
    assert md.batching is not None and (md.batching.max_batch_size, md.batching.max_latency_ms) == (32, 5)
    assert md.limits is None and md.autoscaling is None and md.service.port == 80


def test_parsing_a_defaulted_spec_changes_nothing() -> None:
    """from_dict on the API server's (here kiln.schema's) defaulted spec reads the same values."""
    doc = {"apiVersion": "kiln.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "m"},
           "spec": {"model": {"trainingJob": "t"}, "batching": {"maxLatencyMs": 1}, "limits": {}}}
    assert spec.ModelDeploymentSpec.from_dict(with_defaults(doc)["spec"]) == spec.ModelDeploymentSpec.from_dict(doc["spec"])


def test_server_limits_defaults_equal_the_crd_defaults() -> None:
    """`kiln serve`'s own defaults for request limits are the CRD's (a ModelDeployment without `limits` gets no flags)."""
    limits = openapi_schema("ModelDeployment")["properties"]["spec"]["properties"]["limits"]["properties"]
    assert Settings.__dataclass_fields__["max_body_bytes"].default == limits["maxBodyBytes"]["default"]
    assert Settings.__dataclass_fields__["max_elements"].default == limits["maxElements"]["default"]
