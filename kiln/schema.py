"""The CRD schemas as a library: validation and defaulting of Kiln manifests without a cluster.

Why: `kiln render`, `kiln train` and `kiln run` must reject exactly what the API server rejects and
fill in exactly the defaults it fills in, so a manifest behaves the same on a laptop and in a cluster.
The schemas are read from the packaged CRDs (`crds/`), never copied.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from importlib import resources
from typing import Any

import jsonschema
import yaml

from kiln import API_VERSION

KINDS = {"TrainingJob": "trainingjobs.yaml", "ModelDeployment": "modeldeployments.yaml"}


class ManifestError(ValueError):
    """A manifest that the API server would reject; the message names the document and field."""


@dataclass(frozen=True)
class FieldError:
    """One schema violation at a dotted field path."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@functools.cache
def crd(kind: str) -> dict[str, Any]:
    """The CustomResourceDefinition of a Kiln kind, as shipped in `crds/`."""
    if kind not in KINDS:
        raise ManifestError(f"unknown kind {kind!r}: Kiln knows {', '.join(KINDS)}")
    text = resources.files("kiln.crds").joinpath(KINDS[kind]).read_text()
    doc: dict[str, Any] = yaml.safe_load(text)
    return doc


def openapi_schema(kind: str) -> dict[str, Any]:
    """The openAPIV3Schema of the served version."""
    schema: dict[str, Any] = crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _to_jsonschema(node: Any) -> Any:
    """Translate Kubernetes' OpenAPI v3.0 dialect into Draft 4 JSON Schema (which jsonschema checks)."""
    if isinstance(node, list):
        return [_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            if key == "x-kubernetes-int-or-string" and value:
                out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            continue
        if key in ("description", "default", "format"):
            continue
        if key in ("properties",):
            out[key] = {k: _to_jsonschema(v) for k, v in value.items()}
        else:
            out[key] = _to_jsonschema(value)
    # Structural schemas prune unknown fields; we reject them, as `kubectl apply` with server-side
    # field validation (strict) would, so typos do not vanish silently.
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def _validator(kind: str) -> jsonschema.Draft4Validator:
    schema = _to_jsonschema(openapi_schema(kind))
    schema["properties"]["metadata"] = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
            "namespace": {"type": "string"},
        },
    }
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return jsonschema.Draft4Validator(schema)


def _path(error: jsonschema.ValidationError) -> str:
    parts: list[str] = []
    for p in error.absolute_path:
        parts.append(f"[{p}]" if isinstance(p, int) else (("." if parts else "") + str(p)))
    return "".join(parts) or "(root)"


def _message(error: jsonschema.ValidationError) -> str:
    if error.validator in ("oneOf", "anyOf") and isinstance(error.validator_value, list):
        options = [" and ".join(v.get("required", [])) for v in error.validator_value if isinstance(v, dict)]
        word = "exactly one" if error.validator == "oneOf" else "at least one"
        return f"needs {word} of: {', '.join(options)}"
    if error.validator == "additionalProperties":
        return str(error.message).replace("Additional properties are not allowed", "unknown field")
    return str(error.message)


def errors(doc: dict[str, Any]) -> list[FieldError]:
    """All schema violations of one Kiln manifest (empty when it is valid)."""
    if not isinstance(doc, dict):
        return [FieldError("(root)", "a manifest must be a mapping")]
    kind = doc.get("kind")
    if kind not in KINDS:
        return [FieldError("kind", f"unknown kind {kind!r}: Kiln knows {', '.join(KINDS)}")]
    if doc.get("apiVersion") != API_VERSION:
        return [FieldError("apiVersion", f"must be {API_VERSION!r}, got {doc.get('apiVersion')!r}")]
    found = sorted(_validator(kind).iter_errors(doc), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    return [FieldError(_path(e), _message(e)) for e in found]


def _defaults(schema: dict[str, Any], value: Any) -> Any:
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties", {})
        for name, sub in props.items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = _defaults(sub, value[name])
    elif isinstance(value, list) and "items" in schema:
        return [_defaults(schema["items"], v) for v in value]
    return value


def with_defaults(doc: dict[str, Any]) -> dict[str, Any]:
    """A copy of `doc` with the CRD defaults filled in, as the API server does on create."""
    out = copy.deepcopy(doc)
    schema = openapi_schema(out["kind"])
    if "spec" in out:
        out["spec"] = _defaults(schema["properties"]["spec"], out["spec"])
    return out


def validate(doc: dict[str, Any], where: str = "manifest") -> dict[str, Any]:
    """Validate and default one manifest; raises ManifestError naming `where` and every bad field."""
    found = errors(doc)
    if found:
        name = doc.get("metadata", {}).get("name") if isinstance(doc, dict) and isinstance(doc.get("metadata"), dict) else None
        label = f"{where} ({doc.get('kind')}/{name})" if name else where
        raise ManifestError(f"{label} is invalid:\n" + "\n".join(f"  {e}" for e in found))
    return with_defaults(doc)
