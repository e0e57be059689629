"""The admin's policy: what a TrainingJob or ModelDeployment may ask the operator to create.

Why: the operator holds more rights than a tenant who may only create Kiln resources (it creates Jobs,
Deployments, ServiceAccounts, Roles and Services). Without a policy it is a confused deputy: a tenant
could have it start a pod as any ServiceAccount, with any Secret, any PVC, any image, on control-plane
nodes. Every field through which a spec reaches beyond its own pod is checked here, before anything is
created, by the operator and by `kiln render` alike (same code, same answer).

Pure and typed: `check_trainingjob` / `check_modeldeployment` take a spec, a `Policy` and what the
caller looked up (labels of referenced Secrets and PVCs), and return `Violation`s naming the field.
The policy document is the chart's `policy:` values (`POLICY_SCHEMA`, strict); a namespace labelled
`kiln.dev/policy-profile: NAME` gets the union of the base policy and the profile `namespaceProfiles.NAME`.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import yaml

from kiln.netguard import DEFAULT_MAX_MODEL_BYTES, FetchPolicy, address_problem

PROFILE_LABEL = "kiln.dev/policy-profile"
"""Namespace label selecting a `namespaceProfiles` entry: only who may edit Namespaces can set it."""
CONTROL_PLANE_KEYS = ("node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master")
"""Taint and label keys of control-plane nodes."""
REASON = "PolicyViolation"
MOUNTABLE: Mapping[str, str] = {"kiln.dev/mountable": "true"}
"""The default PVC selector: only someone who may edit a claim can label it, so mounting it gives nothing new."""

_NAMES = {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 253}, "uniqueItems": True}
_SELECTOR = {"type": ["object", "null"], "additionalProperties": {"type": ["string", "null"], "maxLength": 63}}


def _strict(props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "properties": props}


_RULES: dict[str, Any] = {
    "serviceAccounts": _strict({"allow": _NAMES}),
    "secrets": _strict({"allow": _NAMES, "selector": _SELECTOR}),
    "pvcs": _strict({"allow": _NAMES, "selector": _SELECTOR}),
    "images": _strict({"allowedPrefixes": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}),
    "priorityClasses": _strict({"allow": _NAMES}),
    "scheduling": _strict({"allowControlPlane": {"type": "boolean"}}),
    "serviceTypes": {"type": "array", "items": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}, "uniqueItems": True},
    "modelFetch": _strict({
        "allowHttp": {"type": "boolean"},
        "allowPrivateAddresses": {"type": "boolean"},
        "requireSha256": {"type": "boolean"},
        "maxBytes": {"type": "integer", "minimum": 1},
    }),
}
POLICY_SCHEMA: dict[str, Any] = _strict({
    **_RULES,
    "namespaceProfiles": {"type": "object", "additionalProperties": _strict(dict(_RULES)),
                          "propertyNames": {"pattern": "^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$"}},
})
"""JSON schema of the chart's `policy:` values (the chart's values.schema.json holds the same)."""


class PolicyError(ValueError):
    """The policy document itself is invalid (a startup error of the operator, not a tenant's)."""


@dataclass(frozen=True)
class Violation:
    """One field of a spec the policy refuses, and why."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@dataclass(frozen=True)
class Policy:
    """The effective policy for one namespace. Defaults are the safe ones the chart ships."""

    service_accounts: tuple[str, ...] = ()
    secrets: tuple[str, ...] = ()
    secret_selectors: tuple[Mapping[str, str], ...] = ()
    """Label selectors (matchLabels, each matched whole): a Secret matching any one may be referenced."""
    pvcs: tuple[str, ...] = ()
    pvc_selectors: tuple[Mapping[str, str], ...] = (MOUNTABLE,)
    image_prefixes: tuple[str, ...] = ()
    priority_classes: tuple[str, ...] = ()
    allow_control_plane: bool = False
    service_types: tuple[str, ...] = ("ClusterIP",)
    fetch: FetchPolicy = field(default_factory=FetchPolicy)
    profiles: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    own_images: tuple[str, ...] = ()
    """Kiln's own images (the operator's trainer and server images): always allowed."""

    def for_profile(self, name: str | None) -> Policy:
        """This policy widened by profile `name` (unknown or no name: unchanged)."""
        doc = self.profiles.get(name or "")
        return self if doc is None else _widen(self, doc)

    def with_own_images(self, *images: str) -> Policy:
        return Policy(**{**self.__dict__, "own_images": tuple(i for i in images if i)})


def _widen(base: Policy, doc: Mapping[str, Any]) -> Policy:
    """The union: lists concatenate, selectors add alternatives, flags OR, the size limit is the larger."""
    extra = _from_rules(doc, Policy(service_types=(), pvc_selectors=()))
    fetch = FetchPolicy(
        allow_http=base.fetch.allow_http or extra.fetch.allow_http,
        allow_private=base.fetch.allow_private or extra.fetch.allow_private,
        require_sha256=base.fetch.require_sha256 and ("requireSha256" not in (doc.get("modelFetch") or {})
                                                      or extra.fetch.require_sha256),
        max_bytes=max(base.fetch.max_bytes, extra.fetch.max_bytes if "maxBytes" in (doc.get("modelFetch") or {}) else 0),
    )
    return Policy(
        service_accounts=base.service_accounts + extra.service_accounts,
        secrets=base.secrets + extra.secrets,
        secret_selectors=base.secret_selectors + extra.secret_selectors,
        pvcs=base.pvcs + extra.pvcs,
        pvc_selectors=base.pvc_selectors + extra.pvc_selectors,
        image_prefixes=base.image_prefixes + extra.image_prefixes,
        priority_classes=base.priority_classes + extra.priority_classes,
        allow_control_plane=base.allow_control_plane or extra.allow_control_plane,
        service_types=tuple(dict.fromkeys(base.service_types + extra.service_types)),
        fetch=fetch, profiles=base.profiles, own_images=base.own_images,
    )


def _selectors(doc: Mapping[str, Any], section: str, default: tuple[Mapping[str, str], ...]) -> tuple[Mapping[str, str], ...]:
    """The section's selector ({} or null: none); absent: `default`."""
    rules = doc.get(section) or {}
    if "selector" not in rules:
        return default
    selector = {k: v for k, v in (rules["selector"] or {}).items() if v is not None}
    return (selector,) if selector else ()


def _from_rules(doc: Mapping[str, Any], defaults: Policy) -> Policy:
    def names(section: str, key: str = "allow") -> tuple[str, ...]:
        return tuple((doc.get(section) or {}).get(key) or ())

    fetch_doc = doc.get("modelFetch") or {}
    return Policy(
        service_accounts=names("serviceAccounts"),
        secrets=names("secrets"),
        secret_selectors=_selectors(doc, "secrets", defaults.secret_selectors),
        pvcs=names("pvcs"),
        pvc_selectors=_selectors(doc, "pvcs", defaults.pvc_selectors),
        image_prefixes=names("images", "allowedPrefixes"),
        priority_classes=names("priorityClasses"),
        allow_control_plane=bool((doc.get("scheduling") or {}).get("allowControlPlane", False)),
        service_types=tuple(doc["serviceTypes"]) if "serviceTypes" in doc else defaults.service_types,
        fetch=FetchPolicy(bool(fetch_doc.get("allowHttp", False)), bool(fetch_doc.get("allowPrivateAddresses", False)),
                          bool(fetch_doc.get("requireSha256", True)), int(fetch_doc.get("maxBytes", DEFAULT_MAX_MODEL_BYTES))),
    )


def load_policy(doc: Mapping[str, Any] | None) -> Policy:
    """A `Policy` from the chart's `policy:` values (None or {}: the safe defaults); PolicyError if invalid."""
    doc = dict(doc or {})
    try:
        jsonschema.validate(doc, POLICY_SCHEMA)
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise PolicyError(f"invalid policy at policy.{where}: {exc.message}") from None
    base = _from_rules(doc, Policy())
    return Policy(**{**base.__dict__, "profiles": dict(doc.get("namespaceProfiles") or {})})


def load_policy_file(path: str | Path) -> Policy:
    """A policy from a YAML/JSON file holding the chart's `policy:` values (a top-level `policy:` key is unwrapped)."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc}") from None
    if isinstance(doc, dict) and set(doc) == {"policy"}:
        doc = doc["policy"]
    if doc is not None and not isinstance(doc, dict):
        raise PolicyError(f"policy file {path}: expected a mapping, got {type(doc).__name__}")
    return load_policy(doc)


def load_policy_env(value: str) -> Policy:
    """A policy from the JSON the chart puts in `KILN_POLICY`."""
    try:
        doc = json.loads(value) if value.strip() else {}
    except json.JSONDecodeError as exc:
        raise PolicyError(f"KILN_POLICY is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise PolicyError("KILN_POLICY must be a JSON object")
    return load_policy(doc)


# ------------------------------------------------------------------------------------ lookups
Labels = Mapping[tuple[str, str], Mapping[str, str] | None]
"""(kind, name) -> that object's labels, or None when it does not exist (what the caller looked up)."""


def _allowed(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _selected(labels: Mapping[str, str] | None, selectors: Iterable[Mapping[str, str]]) -> bool:
    """The object exists and matches one of the selectors as a whole."""
    return labels is not None and any(all(labels.get(k) == v for k, v in sel.items()) for sel in selectors)


def _secret_refs(spec: Mapping[str, Any], prefix: str) -> list[tuple[str, str]]:
    """(field, Secret name) for every Secret a spec references: env valueFrom and imagePullSecrets."""
    out = []
    for i, env in enumerate(spec.get("env") or []):
        ref = ((env or {}).get("valueFrom") or {}).get("secretKeyRef")
        if isinstance(ref, dict):
            out.append((f"{prefix}.env[{i}].valueFrom.secretKeyRef.name", str(ref.get("name") or "")))
    for i, ref in enumerate(spec.get("imagePullSecrets") or []):
        out.append((f"{prefix}.imagePullSecrets[{i}].name", str((ref or {}).get("name") or "")))
    return out


def _auth_secret(spec: Mapping[str, Any], policy: Policy) -> list[tuple[str, str]]:
    """The server's token Secret, when a tenant's own image would read it: Kiln's server only compares
    tokens with it (never shows it), so with Kiln's image it needs no allow-listing."""
    name = (spec.get("auth") or {}).get("tokenSecret")
    image = spec.get("image")
    if not name or not image or image in policy.own_images:
        return []
    return [("spec.auth.tokenSecret", str(name))]


def _pvc_refs(uris: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    out = []
    for where, uri in uris:
        if isinstance(uri, str) and uri.startswith("pvc://"):
            out.append((where, uri[len("pvc://"):].partition("/")[0]))
    return out


def _tj_pvcs(spec: Mapping[str, Any]) -> list[tuple[str, str]]:
    return _pvc_refs([("spec.dataset.uri", (spec.get("dataset") or {}).get("uri", "")),
                      ("spec.output.uri", (spec.get("output") or {}).get("uri", ""))])


def lookups(kind: str, spec: Mapping[str, Any], policy: Policy, model_uri: str = "") -> set[tuple[str, str]]:
    """The (kind, name) objects whose labels the caller must look up: references no allow-list covers
    while a selector is configured (without a selector nothing needs reading)."""
    secrets = _secret_refs(spec, "spec") + (_auth_secret(spec, policy) if kind == "ModelDeployment" else [])
    served = model_uri or str((spec.get("model") or {}).get("uri") or "")
    pvcs = _tj_pvcs(spec) if kind == "TrainingJob" else _pvc_refs([("spec.model.uri", served)])
    out: set[tuple[str, str]] = set()
    if policy.secret_selectors:
        out |= {("Secret", n) for _, n in secrets if not _allowed(n, policy.secrets)}
    if policy.pvc_selectors:
        out |= {("PersistentVolumeClaim", n) for _, n in pvcs if not _allowed(n, policy.pvcs)}
    return out


# ------------------------------------------------------------------------------------ checks
def _check_names(refs: list[tuple[str, str]], kind: str, allow: tuple[str, ...], selectors: tuple[Mapping[str, str], ...],
                 labels: Labels, section: str) -> list[Violation]:
    out = []
    for where, name in refs:
        if _allowed(name, allow) or _selected(labels.get((kind, name)), selectors):
            continue
        how = f"not in policy.{section}.allow"
        if selectors:
            how += " and " + ("does not exist" if labels.get((kind, name)) is None else "its labels match no policy selector")
        out.append(Violation(where, f"{kind} {name!r} may not be used: {how}"))
    return out


def _check_image(spec: Mapping[str, Any], prefix: str, policy: Policy) -> list[Violation]:
    image = spec.get("image")
    if not image or image in policy.own_images or any(str(image).startswith(p) for p in policy.image_prefixes):
        return []
    allowed = ", ".join(repr(p) for p in policy.image_prefixes) or "none"
    return [Violation(f"{prefix}.image", f"image {image!r} is not one of Kiln's own images and matches no allowed "
                                         f"registry prefix (policy.images.allowedPrefixes: {allowed})")]


def _check_scheduling(spec: Mapping[str, Any], prefix: str, policy: Policy) -> list[Violation]:
    sched = spec.get("scheduling") or {}
    out = []
    pc = sched.get("priorityClassName")
    if pc and not _allowed(str(pc), policy.priority_classes):
        out.append(Violation(f"{prefix}.scheduling.priorityClassName",
                             f"PriorityClass {pc!r} is not in policy.priorityClasses.allow"))
    if policy.allow_control_plane:
        return out
    for i, tol in enumerate(sched.get("tolerations") or []):
        key = (tol or {}).get("key") or ""
        if key in CONTROL_PLANE_KEYS or (not key and (tol or {}).get("operator") == "Exists"):
            what = f"the control-plane taint {key}" if key else "every taint (operator Exists without a key), control-plane ones included"
            out.append(Violation(f"{prefix}.scheduling.tolerations[{i}]", f"tolerates {what}; "
                                 "policy.scheduling.allowControlPlane is false"))
    for key in sched.get("nodeSelector") or {}:
        if key in CONTROL_PLANE_KEYS:
            out.append(Violation(f"{prefix}.scheduling.nodeSelector", f"selects control-plane nodes ({key}); "
                                 "policy.scheduling.allowControlPlane is false"))
    return out


def _check_service(spec: Mapping[str, Any], prefix: str, policy: Policy) -> list[Violation]:
    stype = (spec.get("service") or {}).get("type") or "ClusterIP"
    if stype in policy.service_types:
        return []
    return [Violation(f"{prefix}.service.type", f"Service type {stype!r} is not in policy.serviceTypes "
                                                f"({', '.join(policy.service_types) or 'none'})")]


def check_model_uri(uri: str, sha256: str, policy: Policy, where: str = "spec.model.uri") -> list[Violation]:
    """What the fetch policy says about an `http(s)://` model URI (other schemes: nothing here)."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return []
    out = []
    if parsed.scheme == "http" and not policy.fetch.allow_http:
        out.append(Violation(where, "plain http:// is refused (use https://, or set policy.modelFetch.allowHttp)"))
    problem = address_problem(parsed.hostname or "")
    if problem and not policy.fetch.allow_private:
        out.append(Violation(where, f"host {parsed.hostname} is a {problem} address "
                                    "(policy.modelFetch.allowPrivateAddresses is false)"))
    if not sha256 and policy.fetch.require_sha256:
        out.append(Violation(where.rsplit(".", 1)[0] + ".sha256",
                             "required for http(s):// models (policy.modelFetch.requireSha256)"))
    return out


def _check_pod_fields(spec: Mapping[str, Any], prefix: str, policy: Policy, labels: Labels) -> list[Violation]:
    """Image, Secrets and scheduling: what both kinds (and a TrainingJob's spec.deploy) share."""
    out = _check_image(spec, prefix, policy)
    out += _check_names(_secret_refs(spec, prefix), "Secret", policy.secrets, policy.secret_selectors, labels, "secrets")
    out += _check_scheduling(spec, prefix, policy)
    return out


def check_trainingjob(spec: Mapping[str, Any], policy: Policy, labels: Labels | None = None) -> list[Violation]:
    """Every field of a TrainingJob spec the policy refuses (empty: it may be created)."""
    labels = labels or {}
    out = []
    account = spec.get("serviceAccountName")
    if account and not _allowed(str(account), policy.service_accounts):
        out.append(Violation("spec.serviceAccountName", f"ServiceAccount {account!r} is not in policy.serviceAccounts.allow "
                                                        "(leave it unset: the operator makes one that may only report progress)"))
    out += _check_pod_fields(spec, "spec", policy, labels)
    out += _check_names(_tj_pvcs(spec), "PersistentVolumeClaim", policy.pvcs, policy.pvc_selectors, labels, "pvcs")
    deploy = spec.get("deploy")
    if isinstance(deploy, dict):
        out += _check_pod_fields(deploy, "spec.deploy", policy, labels) + _check_service(deploy, "spec.deploy", policy)
    return out


def check_modeldeployment(spec: Mapping[str, Any], policy: Policy, labels: Labels | None = None,
                          model_uri: str | None = None, model_sha256: str | None = None) -> list[Violation]:
    """Every field of a ModelDeployment spec the policy refuses. `model_uri` is the model actually served
    (from a TrainingJob's result, which a bring-your-own trainer reports itself), checked like spec.model.uri."""
    labels = labels or {}
    model = spec.get("model") or {}
    uri = model_uri if model_uri is not None else str(model.get("uri") or "")
    sha = model_sha256 if model_sha256 is not None else str(model.get("sha256") or "")
    where = "spec.model.uri" if model.get("uri") else "status.model.uri (the TrainingJob's result)"
    out = _check_pod_fields(spec, "spec", policy, labels) + _check_service(spec, "spec", policy)
    out += _check_names(_auth_secret(spec, policy), "Secret", policy.secrets, policy.secret_selectors, labels, "secrets")
    out += _check_names(_pvc_refs([(where, uri)]), "PersistentVolumeClaim", policy.pvcs, policy.pvc_selectors, labels, "pvcs")
    if model.get("uri"):
        out += check_model_uri(uri, sha, policy)
    return out


def describe(violations: Iterable[Violation]) -> str:
    """One message for a status: every refused field, in order."""
    return "; ".join(str(v) for v in violations)
