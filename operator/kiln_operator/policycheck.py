"""The operator's side of the admin's policy (`kiln.policy`): the namespace's profile and the labels of
referenced Secrets/PVCs are looked up here, the decision is the pure `kiln.policy` check.

Called once at the top of each controller's create path, before any child exists.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from kiln import kube
from kiln.kube import ApiError
from kiln.policy import PROFILE_LABEL, Labels, Policy, Violation, check_modeldeployment, check_trainingjob, lookups
from kiln_operator.runtime import log

PROFILE_TTL = 10.0
"""Seconds a namespace's profile label (and a referenced object's labels) is cached for ModelDeployments, which
are checked on every resync: a relabel applies to them within this, without a watch. TrainingJobs read it fresh."""
_profiles: dict[str, tuple[float, str | None]] = {}
_seen: dict[tuple[str, str, str], tuple[float, dict[str, str] | None]] = {}
"""Labels of referenced Secrets/PVCs, cached like profiles (ModelDeployments are checked on every resync)."""
_API = {"Secret": "v1", "PersistentVolumeClaim": "v1"}


async def namespace_profile(namespace: str, fresh: bool = False) -> str | None:
    """The namespace's `kiln.dev/policy-profile` label (None when unset, or the Namespace is not readable).

    `fresh`: read it now (a TrainingJob is checked once, at creation); otherwise a cached answer up to
    PROFILE_TTL old will do (ModelDeployments are checked on every resync)."""
    cached = _profiles.get(namespace)
    if cached and not fresh and time.monotonic() - cached[0] < PROFILE_TTL:
        return cached[1]
    try:
        ns = await kube.api().get("v1", "Namespace", None, namespace)
    except ApiError as exc:
        if exc.status != 403:
            raise
        log.warning("cannot read Namespace %s (%s): the base policy applies there", namespace, exc.reason)
        ns = None
    profile = (((ns or {}).get("metadata") or {}).get("labels") or {}).get(PROFILE_LABEL)
    _profiles[namespace] = (time.monotonic(), profile)
    return profile


async def effective(policy: Policy, namespace: str, fresh: bool = False) -> Policy:
    """The base policy, widened by the namespace's profile when it has one."""
    return policy.for_profile(await namespace_profile(namespace, fresh)) if policy.profiles else policy


async def _labels(namespace: str, wanted: set[tuple[str, str]], fresh: bool) -> Labels:
    async def one(kind: str, name: str) -> dict[str, str] | None:
        cached = _seen.get((namespace, kind, name))
        if cached and not fresh and time.monotonic() - cached[0] < PROFILE_TTL:
            return cached[1]
        try:
            obj = await kube.api().get(_API[kind], kind, namespace, name)
        except ApiError as exc:
            if exc.status != 403:
                raise
            log.warning("cannot read %s %s/%s (%s): it counts as not matching the policy's selector", kind, namespace, name, exc.reason)
            return None
        labels = None if obj is None else dict((obj.get("metadata") or {}).get("labels") or {})
        _seen[(namespace, kind, name)] = (time.monotonic(), labels)
        return labels

    keys = sorted(wanted)
    found = await asyncio.gather(*(one(kind, name) for kind, name in keys))
    return dict(zip(keys, found, strict=True))


async def check(kind: str, obj: dict[str, Any], policy: Policy, model_uri: str | None = None,
                model_sha256: str | None = None) -> list[Violation]:
    """What the base `policy`, widened for the object's namespace, refuses in a TrainingJob or
    ModelDeployment (`model_uri`: the model it would serve)."""
    namespace = obj["metadata"].get("namespace") or "default"
    spec = obj.get("spec") or {}
    fresh = kind == "TrainingJob"
    pol = await effective(policy, namespace, fresh)
    labels = await _labels(namespace, lookups(kind, spec, pol, model_uri or ""), fresh)
    if kind == "TrainingJob":
        return check_trainingjob(spec, pol, labels)
    return check_modeldeployment(spec, pol, labels, model_uri, model_sha256)
