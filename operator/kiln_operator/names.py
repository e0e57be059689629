"""Deterministic names and labels of everything Kiln creates.

Why deterministic: an operator restart, a retried handler or a duplicate event must find the object it
made before instead of making a second one. Long names are shortened with a hash, never truncated
into a collision.
"""

from __future__ import annotations

import hashlib

from kiln import GROUP

LABEL_TRAININGJOB = f"{GROUP}/trainingjob"
LABEL_MODELDEPLOYMENT = f"{GROUP}/modeldeployment"
ANNOTATION_TRAININGJOB = f"{GROUP}/trainingjob"
ANNOTATION_MODELDEPLOYMENT = f"{GROUP}/modeldeployment"
ANNOTATION_SPEC = f"{GROUP}/spec"
"""On the trainer's pod template: the TrainingJob as the trainer reads it (downward API file)."""
LABEL_TRIAL = f"{GROUP}/trial"
"""On a parallel trial's Job and pods: the trial's index, or `indexed` for the one Indexed Job of all trials."""
LABEL_CREATED_BY = f"{GROUP}/created-by-trainingjob"
LABEL_TRACK = f"{GROUP}/track"
"""On server pods: `stable` (spec.model) or `canary` (spec.canary.model); the main Service selects both."""
MAX_NAME = 63


def shorten(value: str, limit: int = MAX_NAME) -> str:
    """`value` if it fits, else a prefix plus an 8-character hash of the whole (stable and unique)."""
    if len(value) <= limit:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:8]
    return value[: limit - 9].rstrip("-.") + "-" + digest


def child(owner: str, suffix: str, limit: int = MAX_NAME) -> str:
    """Name of a child object: `<owner>-<suffix>`, shortened to `limit`."""
    return shorten(f"{owner}-{suffix}", limit)


def label_value(value: str) -> str:
    """A label value (at most 63 characters) identifying `value`."""
    return shorten(value, 63)


def standard_labels(name: str, component: str, app: str) -> dict[str, str]:
    """The app.kubernetes.io/* labels Kiln puts on every object."""
    return {
        "app.kubernetes.io/name": app,
        "app.kubernetes.io/instance": label_value(name),
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "kiln",
        "app.kubernetes.io/managed-by": "kiln-operator",
    }


def job_name(tj: str) -> str:
    # Pods of an Indexed Job are named `<job>-<index>-<random>` and their hostname `<job>-<index>`
    # must stay a DNS label: keep room for the suffixes.
    return child(tj, "train", 52)


def trials_job(tj: str) -> str:
    """The Indexed Job of a TrainingJob's parallel trials (room for `-<index>-<random>` pod suffixes)."""
    return child(tj, "trials", 52)


def trial_job(tj: str, index: int) -> str:
    """The Job of one parallel trial (API servers without Indexed Jobs)."""
    return child(tj, f"trial-{index}", 57)


def trainer_account(tj: str) -> str:
    return child(tj, "trainer")


def workers_service(tj: str) -> str:
    return child(tj, "workers")


def server_deployment(md: str) -> str:
    return child(md, "server")


def server_service(md: str) -> str:
    return shorten(md)


def canary_deployment(md: str) -> str:
    """The canary's Deployment (`spec.canary`), next to `server_deployment`."""
    return child(md, "canary")


def track_service(md: str, track: str) -> str:
    """A Service of one track (`stable` or `canary`), the HTTPRoute's backends."""
    return child(md, track)


def http_route(md: str) -> str:
    return shorten(md)
