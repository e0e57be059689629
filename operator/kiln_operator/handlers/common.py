"""Shared handler machinery: per-object locks, status patching that remembers what it wrote, events."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections import defaultdict
from typing import Any

import kopf

from kiln_operator import kube

log = logging.getLogger("kiln.operator")

Key = tuple[str, str]


class StatusWriter:
    """Patches `status` and remembers what it wrote, so a stale watch snapshot is not re-patched.

    Kopf's indexes and timers see an object as of the last watch event; our own status patch may not
    have arrived yet. Overlaying what we last wrote keeps reconciles from repeating a transition (and
    its event) twice.
    """

    def __init__(self, api_version: str, kind: str) -> None:
        self.api_version = api_version
        self.kind = kind
        self.written: dict[Key, dict[str, Any]] = {}
        self.locks: defaultdict[Key, asyncio.Lock] = defaultdict(asyncio.Lock)

    def view(self, key: Key, body: dict[str, Any]) -> dict[str, Any]:
        """The object with our latest written status fields laid over the snapshot."""
        out = {k: v for k, v in body.items() if k != "status"}
        status = copy.deepcopy(dict(body.get("status") or {}))
        status.update(copy.deepcopy(self.written.get(key, {})))
        out["status"] = status
        return out

    async def patch(self, key: Key, status: dict[str, Any]) -> None:
        if not status:
            return
        namespace, name = key
        await asyncio.to_thread(kube.patch_status, self.api_version, self.kind, namespace, name, status)
        self.written.setdefault(key, {}).update(copy.deepcopy(status))

    def forget(self, key: Key) -> None:
        self.written.pop(key, None)
        self.locks.pop(key, None)


def post_event(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
    """A Kubernetes Event on the resource (kubectl describe shows it)."""
    try:
        kopf.event(body, type=type_, reason=reason, message=message[:1024])
    except Exception as exc:  # events are best effort; never fail a reconcile for one
        log.warning("could not post event %s on %s: %s", reason, body.get("metadata", {}).get("name"), exc)


def snapshot(body: Any) -> dict[str, Any]:
    """A plain, detached copy of a Kopf body for indexes."""
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": copy.deepcopy(dict(body.get("metadata") or {})),
        "spec": copy.deepcopy(dict(body.get("spec") or {})),
        "status": copy.deepcopy(dict(body.get("status") or {})),
    }
