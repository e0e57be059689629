"""Dynamic batching: concurrent requests with compatible shapes run as one ONNX Runtime call.

Requests queue on the event loop. Whenever an inference thread is free, the oldest request and
every queued request with the same key (input names, dtypes, shapes past dim 0, and requested
outputs) are concatenated on dim 0, up to `max_batch_size` rows, run in the thread pool, and the
outputs are sliced back per request. A partial batch waits at most `max_latency_ms` for more rows
(counted from its oldest request). With `max_batch_size == 1` the same queue simply feeds the pool
one request at a time.

Inline calls (`inline_max_s` > 0; the server's default is 250 us): without merging, when the
loop iteration's dispatch finds exactly one request queued and nothing running, and its estimated
call time (the recent calls' seconds per input element, times its elements) is under
`inline_max_s`, it runs on the event loop itself, skipping the hand-off to an inference thread and
back (two thread wake-ups, the larger part of a lone request's cost). Several requests parsed in the
same iteration go to the thread together in one hand-off, which measured cheaper per request than
running each inline (docs/benchmarks.md, "Per-request cost"). A slow model, or a large request,
still goes to the thread, so the loop never stalls for much longer than that bound.

If a merged batch fails, each of its requests is retried alone so one bad request cannot fail
its neighbours.

A request may carry a deadline (monotonic time): one still waiting when it passes is answered with
`DeadlineExceeded` instead of running (checked when a batch is formed and again in the inference
thread right before the call); a request already running is not interrupted.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from kiln_server.model import OnnxModel

log = logging.getLogger("kiln_server.batching")

Key = tuple[Any, ...]
Callback = Callable[[Any, BaseException | None], None]


class DeadlineExceeded(Exception):
    """The request's deadline passed while it waited for inference: it was not run."""


class _Item:
    """One submitted request: its inputs, wanted outputs, rows, merge key (None: never merged), callback, deadline."""

    __slots__ = ("callback", "deadline", "feeds", "key", "outputs", "rows", "t0")

    def __init__(
        self, feeds: dict[str, np.ndarray], outputs: list[str], rows: int, key: Key | None, callback: Callback,
        deadline: float,
    ) -> None:
        self.feeds = feeds
        self.outputs = outputs
        self.rows = rows
        self.key = key
        self.callback = callback
        self.deadline = deadline  # time.monotonic() value, 0.0 = none
        self.t0 = time.monotonic()


def _expired(item: _Item, now: float) -> bool:
    return 0.0 < item.deadline < now


class Batcher:
    """Queues requests for one model and feeds its inference threads, merging when allowed.

    The inference threads are dedicated (not a generic executor): they take work from a
    `SimpleQueue`, and finished work wakes the event loop with one `call_soon_threadsafe` for
    however much completed meanwhile. Dispatch itself is deferred to the end of the current
    event-loop iteration, so every request parsed in one iteration (many connections readable at
    once) is queued with a single thread wake-up and can share one ORT call.

    The batching window (`max_latency_ms`) is skipped when waiting cannot help: when every open
    connection already has a request waiting for inference, no further request can arrive (short of
    a new connection), so the batch runs at once. This keeps low-concurrency latency near the
    unbatched one while high concurrency still forms full batches.
    """

    def __init__(
        self,
        model: OnnxModel,
        threads: int,
        max_batch_size: int,
        max_latency_ms: float,
        observe_batch: Callable[[int, int], None] | None = None,
        may_grow: Callable[[], bool] | None = None,
        inline_max_s: float = 0.0,
    ) -> None:
        self.model = model
        self.threads = threads
        self.max_batch_size = max_batch_size
        self.max_latency = max_latency_ms / 1000.0
        self.enabled = max_batch_size > 1 and model.batchable
        # Without merging there is no reason to hold requests back: queue them all to the threads.
        self.max_running = threads if self.enabled else 1 << 30
        self.observe_batch = observe_batch
        self.may_grow = may_grow
        self.pending: deque[_Item] = deque()
        self.running = 0
        self.inflight = 0  # requests submitted and not yet answered
        self.expired = 0  # requests answered with DeadlineExceeded (never run)
        self.inline = 0  # requests run on the event loop (see inline_max_s)
        self.inline_max_s = inline_max_s if not self.enabled else 0.0
        # Seconds per input element of recent calls (an exponential average over every call); unknown
        # (infinite) until the first call, so a model is never run inline before it was measured.
        self.per_element_s = float("inf")
        self._timer: asyncio.TimerHandle | None = None
        self._scheduled = False
        self._loop = asyncio.get_running_loop()
        self._work: queue.SimpleQueue[list[list[_Item]] | None] = queue.SimpleQueue()
        self._done: deque[tuple[list[_Item], list[Any]]] = deque()
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self._threads = [
            threading.Thread(target=self._worker, name=f"kiln-infer-{i}", daemon=True) for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def submit(
        self, feeds: dict[str, np.ndarray], outputs: list[str], rows: int, callback: Callback, deadline: float = 0.0
    ) -> None:
        """Queue one request; `callback(outputs, None)` or `callback(None, error)` runs on the loop later.

        `deadline` (a `time.monotonic()` value, 0 = none): past it, a request not yet run gets
        `DeadlineExceeded`.
        """
        key: Key | None = None
        if self.enabled and rows <= self.max_batch_size:
            parts: list[Any] = []
            for name, arr in feeds.items():
                if arr.ndim == 0 or arr.shape[0] != rows:
                    parts = []
                    break
                parts.append((name, arr.dtype.str, arr.shape[1:]))
            if parts:
                parts.sort()
                key = (tuple(parts), tuple(outputs))
        self.pending.append(_Item(feeds, outputs, rows, key, callback, deadline))
        self.inflight += 1
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._dispatch_soon)

    def _run_inline(self, item: _Item, elements: int) -> None:
        """Run a lone short call on the loop and answer it at once (its deadline was checked just before)."""
        self.inline += 1
        self.inflight -= 1
        t0 = time.perf_counter()
        try:
            result = self.model.run(item.feeds, item.outputs)
        except Exception as exc:
            self._measured(time.perf_counter() - t0, elements)
            item.callback(None, exc)
            return
        self._measured(time.perf_counter() - t0, elements)
        if self.observe_batch is not None:
            self.observe_batch(item.rows, 1)
        try:
            item.callback(result, None)
        except Exception:
            log.exception("inference callback failed")

    def _inline_candidate(self) -> tuple[_Item, int] | None:
        """The one queued request and its element count, when it may run on the loop: alone (nothing else queued or running),
        batching off, and estimated under `inline_max_s` from the recent calls."""
        if not self.inline_max_s or self.running or len(self.pending) != 1:
            return None
        item = self.pending[0]
        elements = 0
        for arr in item.feeds.values():
            elements += arr.size
        return (item, elements) if elements * self.per_element_s < self.inline_max_s else None

    def _measured(self, seconds: float, elements: int) -> None:
        """Fold one call's time into the seconds-per-element estimate (any thread: one float store).

        The average moves 30 % of the way per call: one call slowed by a busy CPU sends a few calls
        to the thread, a few normal ones bring inline back, and a model that turns slow leaves the
        loop after one or two calls.
        """
        per = seconds / max(elements, 1)
        old = self.per_element_s
        self.per_element_s = per if old == float("inf") else 0.7 * old + 0.3 * per

    def close(self) -> None:
        """Stop the inference threads once they finish what they have."""
        for _ in self._threads:
            self._work.put(None)

    def _dispatch_soon(self) -> None:
        """End of the loop iteration that submitted work: dispatch everything queued meanwhile at once."""
        self._scheduled = False
        self._dispatch(self.max_latency)

    def _dispatch(self, max_latency: float) -> None:
        """Form batches from the queue while threads are free; a partial batch may wait up to `max_latency`."""
        pending = self.pending
        lone = self._inline_candidate()
        if lone is not None and not (lone[0].deadline and _expired(lone[0], time.monotonic())):
            pending.popleft()
            self._run_inline(*lone)
            return
        jobs: list[list[_Item]] = []
        late: list[_Item] = []
        while pending and self.running + len(jobs) < self.max_running:
            first = pending[0]
            if first.deadline and _expired(first, time.monotonic()):
                late.append(pending.popleft())
                continue
            if first.key is None:
                pending.popleft()
                jobs.append([first])
                continue
            batch = [first]
            rows = first.rows
            if len(pending) > 1:
                for item in list(pending)[1:]:
                    if item.key == first.key and rows + item.rows <= self.max_batch_size:
                        batch.append(item)
                        rows += item.rows
                        if rows == self.max_batch_size:
                            break
            if rows < self.max_batch_size and max_latency > 0 and (self.may_grow is None or self.may_grow()):
                wait = first.t0 + max_latency - time.monotonic()
                if wait > 0:
                    if self._timer is None:
                        self._timer = self._loop.call_later(wait, self._on_timer)
                    break
            if len(batch) == 1:
                pending.popleft()
            else:
                chosen = set(map(id, batch))
                self.pending = pending = deque(i for i in pending if id(i) not in chosen)
            jobs.append(batch)
        if late:
            self._answer_late(late)
        if not jobs:
            return
        self.running += len(jobs)
        if self.threads == 1:
            self._work.put(jobs)  # one wake-up for everything this iteration produced
        else:
            for job in jobs:
                self._work.put([job])

    def _answer_late(self, items: list[_Item]) -> None:
        """On the loop: requests whose deadline passed before they could be batched get DeadlineExceeded."""
        self.inflight -= len(items)
        self.expired += len(items)
        for item in items:
            try:
                item.callback(None, DeadlineExceeded("the request's deadline passed while it was queued"))
            except Exception:
                log.exception("inference callback failed")

    def _on_timer(self) -> None:
        """The oldest request's deadline has passed: run what there is."""
        self._timer = None
        self._dispatch(0.0)

    def _worker(self) -> None:
        """An inference thread: run jobs, and wake the loop once for however many finished meanwhile."""
        work, done = self._work, self._done
        while True:
            jobs = work.get()
            if jobs is None:
                return
            for batch in jobs:
                try:
                    results = self._run(batch)
                except BaseException as exc:  # never lose a batch: report the error to every request
                    results = [exc] * len(batch)
                done.append((batch, results))
            with self._wake_lock:
                if self._wake_pending:
                    continue
                self._wake_pending = True
            try:
                self._loop.call_soon_threadsafe(self._collect)
            except RuntimeError:  # loop closed during shutdown
                return

    def _collect(self) -> None:
        """On the loop: deliver finished batches to their callbacks, then dispatch what waits."""
        with self._wake_lock:
            self._wake_pending = False
        done = self._done
        while done:
            batch, results = done.popleft()
            self._finished(batch, results)
        if self.pending:
            self._dispatch(self.max_latency)

    def _run(self, batch: list[_Item]) -> list[Any]:
        """Runs in an inference thread: one ORT call for the whole batch, then per-request slices.

        Requests whose deadline has passed by now are not run (their result is DeadlineExceeded).
        """
        model = self.model
        if len(batch) == 1:
            item = batch[0]
            if item.deadline and _expired(item, time.monotonic()):
                return [DeadlineExceeded("the request's deadline passed while it was queued")]
            t0 = time.perf_counter()
            try:
                return [model.run(item.feeds, item.outputs)]
            except Exception as exc:
                return [exc]
            finally:
                self._measured(time.perf_counter() - t0, sum(a.size for a in item.feeds.values()))
        now = time.monotonic()
        if any(_expired(it, now) for it in batch):
            live = [it for it in batch if not _expired(it, now)]
            done = iter(self._run(live) if live else [])
            late = DeadlineExceeded("the request's deadline passed while it was queued")
            return [late if _expired(it, now) else next(done) for it in batch]
        names = list(batch[0].feeds)
        feeds = {n: np.concatenate([it.feeds[n] for it in batch]) for n in names}
        total = sum(it.rows for it in batch)
        try:
            outs = model.run(feeds, batch[0].outputs)
            if any(o.ndim == 0 or o.shape[0] != total for o in outs):
                raise ValueError("an output's first dimension is not the batch dimension")
        except Exception:
            results: list[Any] = []
            for item in batch:
                try:
                    results.append(model.run(item.feeds, item.outputs))
                except Exception as exc:
                    results.append(exc)
            return results
        results = []
        offset = 0
        for item in batch:
            end = offset + item.rows
            results.append([o[offset:end] for o in outs])
            offset = end
        return results

    def _finished(self, batch: list[_Item], results: list[Any]) -> None:
        """Answer each request of a batch (a failing callback cannot stop the others) and count the batch."""
        self.running -= 1
        self.inflight -= len(batch)
        for item, res in zip(batch, results, strict=True):
            if type(res) is DeadlineExceeded:
                self.expired += 1
            try:
                if isinstance(res, BaseException):
                    item.callback(None, res)
                else:
                    item.callback(res, None)
            except Exception:
                log.exception("inference callback failed")
        if self.observe_batch is not None:
            self.observe_batch(sum(it.rows for it in batch), len(batch))
