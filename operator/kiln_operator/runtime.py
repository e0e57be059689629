"""Shared controller machinery: watch caches, per-object locks, status patching that remembers what it
wrote, events, the periodic resync, and the drift test for children."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from kiln import kube
from kiln_operator import metrics
from kiln_operator.conditions import change_event, changes

log = logging.getLogger("kiln.operator")

Key = tuple[str, str]


class LoopLimit:
    """A semaphore per event loop (a restarted operator runs Kopf on a new loop)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._limits: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}

    def __call__(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if loop not in self._limits:
            self._limits = {loop: asyncio.Semaphore(self.slots)}
        return self._limits[loop]


BOOKKEEPING = LoopLimit(4)
"""Concurrent status patches and events. In a burst the API server is the shared bottleneck, and
creating a user's Job is what starts their training; the status line and the event saying so can
trail it by a moment, so they share a few slots while creates do not (4 measured better than 8)."""

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
        # Shallow: snapshots and written values are private copies, and nothing here mutates them
        # (status.py builds new dicts), so a deep copy per reconcile would only cost CPU.
        out = {k: v for k, v in body.items() if k != "status"}
        status = dict(body.get("status") or {})
        status.update(self.written.get(key, {}))
        out["status"] = status
        return out

    async def patch(self, key: Key, status: dict[str, Any], obj: dict[str, Any] | None = None) -> None:
        """Merge-patch `status`; with `obj` (the object as last seen), also post one Event listing the
        conditions this write changes (`kubectl describe` then shows every condition transition)."""
        if not status:
            return
        namespace, name = key
        async with BOOKKEEPING():
            await kube.api().patch_status(self.api_version, self.kind, namespace, name, status)
        self.written.setdefault(key, {}).update(copy.deepcopy(status))
        metrics.STATUS_WRITES.labels(self.kind).inc()
        if obj is not None and "conditions" in status:
            event = change_event(changes((obj.get("status") or {}).get("conditions") or [], status["conditions"]))
            if event is not None:
                await post_event(obj, *event)

    def forget(self, key: Key) -> None:
        self.written.pop(key, None)
        self.locks.pop(key, None)


async def post_event(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
    """A Kubernetes Event on the resource (`kubectl describe` shows it).

    Posted through the API directly rather than `kopf.event`, which only works inside Kopf's own
    handler context, not from the periodic resync.
    """
    meta = body.get("metadata") or {}
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta.get('name')}.{uuid.uuid4().hex[:16]}", "namespace": meta.get("namespace")},
        "involvedObject": {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "name": meta.get("name"),
                           "namespace": meta.get("namespace"), "uid": meta.get("uid")},
        "reason": reason,
        "message": message[:1024],
        "type": type_,
        "source": {"component": "kiln-operator"},
        "reportingComponent": "kiln-operator",
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    try:
        async with BOOKKEEPING():
            await kube.api().call("POST", f"/api/v1/namespaces/{meta.get('namespace')}/events", event, decode=False)
    except Exception as exc:  # events are best effort; never fail a reconcile for one
        log.warning("could not post event %s on %s: %s", reason, meta.get("name"), exc)


def owned_by(obj: dict[str, Any], uid: str | None) -> bool:
    """Whether `obj` has an ownerReference to the object with `uid` (a namesake from a deleted owner does not)."""
    return any(ref.get("uid") == uid for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])


def snapshot(body: Any) -> dict[str, Any]:
    """A plain, detached copy of a Kopf body for indexes."""
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        # managedFields is most of a body's size and never read here.
        "metadata": copy.deepcopy({k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}),
        "spec": copy.deepcopy(dict(body.get("spec") or {})),
        "status": copy.deepcopy(dict(body.get("status") or {})),
    }


class Cache:
    """An in-memory informer cache fed by Kopf watch events: key -> {uid: slim object}.

    Why not Kopf indexes plus timers: Kopf puts a finalizer on every object with a timer, and a
    finalizer makes deletion hang while the operator is down. Watch events need no finalizer.
    """

    def __init__(self) -> None:
        self.items: dict[Key, dict[str, dict[str, Any]]] = {}

    def update(self, event_type: str | None, key: Key, obj: dict[str, Any]) -> None:
        uid = (obj.get("metadata") or {}).get("uid") or ""
        if event_type == "DELETED":
            bucket = self.items.get(key)
            if bucket is not None:
                bucket.pop(uid, None)
                if not bucket:
                    del self.items[key]
            return
        self.items.setdefault(key, {})[uid] = obj

    def get(self, key: Key) -> list[dict[str, Any]]:
        return list((self.items.get(key) or {}).values())

    def __iter__(self) -> Iterator[Key]:
        return iter(list(self.items))


class Ticker:
    """Calls an async function every `interval` seconds for the operator's lifetime (periodic resync)."""

    def __init__(self, interval: float, fn: Any) -> None:
        self.interval = interval
        self.fn = fn
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.fn()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failed resync is retried at the next tick
                log.warning("periodic resync failed: %s", exc)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None


class Coalescer:
    """Runs `fn(key)` soon after `mark(key)`, once per burst: many child events become one reconcile.

    Why: a Job and its Pods produce a burst of watch events within milliseconds (created, active,
    scheduled, running); reconciling after each would patch the status and post events several times
    for what is one transition, and under load that competes with creating other users' Jobs.
    """

    def __init__(self, fn: Any, window: float = 0.05, concurrency: int = 32) -> None:
        self.fn = fn
        self.window = window
        self.dirty: set[Key] = set()
        self.wake = asyncio.Event()
        self.limit = asyncio.Semaphore(concurrency)
        self.task: asyncio.Task[None] | None = None
        self.running: set[asyncio.Task[None]] = set()

    def mark(self, key: Key) -> None:
        self.dirty.add(key)
        self.wake.set()

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _one(self, key: Key) -> None:
        async with self.limit:
            try:
                await self.fn(key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the periodic resync retries
                log.warning("reconcile of %s/%s failed: %s", key[0], key[1], exc)

    async def _run(self) -> None:
        while True:
            await self.wake.wait()
            await asyncio.sleep(self.window)
            self.wake.clear()
            keys, self.dirty = self.dirty, set()
            for key in keys:
                task = asyncio.get_running_loop().create_task(self._one(key))
                self.running.add(task)
                task.add_done_callback(self.running.discard)

    async def stop(self) -> None:
        for task in [self.task, *self.running]:
            if task is not None:
                task.cancel()
        self.task = None


def subset(want: Any, have: Any) -> bool:
    """True when every field Kiln sets in `want` has the same value in the live object `have`.

    The API server adds defaults, so live objects are supersets; a field that differs means a hand
    edit (drift) to put back.
    """
    if isinstance(want, dict):
        return isinstance(have, dict) and all(subset(v, have.get(k)) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(want) == len(have) and all(subset(w, h) for w, h in zip(want, have, strict=True))
    if (isinstance(want, (int, float)) and isinstance(have, str)) or (isinstance(want, str) and isinstance(have, (int, float))):
        return str(want) == str(have)
    return bool(want == have)
