"""`--workers N`: N server processes on the same ports (SO_REUSEPORT), one scrape of /metrics for all.

One event loop parses every request, so one process serves what one core can. With `--workers N`
the first process becomes a supervisor that serves nothing itself: it starts N workers (the same
`python -m kiln_server` command line, told their index through `KILN_WORKER_INDEX`), each with its
own ONNX Runtime session whose intra-op threads default to its share of the CPUs
(`available_cpus() // N`, at least 1). The kernel spreads new connections over the workers' sockets.

Lifecycle (the supervisor):
- SIGTERM/SIGINT is passed to every worker, which drains as a single server does; the supervisor
  waits for all (graceful timeout + 10 s, then SIGKILL) and exits 0 when all exited 0.
- A worker that exits with 1 or 2 (cannot listen, bad settings, model load failure with
  `--exit-on-load-failure`) cannot be helped by a restart: the supervisor stops the others and exits
  with that status, so the pod restarts with a visible reason.
- A worker that dies otherwise (killed, OOM, crash) is restarted at once; more than 5 restarts within
  60 s means something is badly wrong and the supervisor exits 1.
- Workers get PR_SET_PDEATHSIG, so a supervisor killed with SIGKILL takes them along.

Metrics: each worker writes a snapshot of its registry (every second and on each scrape) into a
private folder (`KILN_METRICS_DIR`, created by the supervisor under the temp dir, removed at exit);
the worker a scrape reaches merges all snapshots: counters and histograms summed, the in-flight
gauge summed, `kiln_model_ready` the minimum (the pod is ready only when every worker is), other
gauges the maximum. A restarted worker's last snapshot is kept as "retired" and its counters stay
in the sums, so pod-level counters never go backwards. `kiln_worker_requests{worker,pid}` shows
each worker's share (and that they all serve).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("kiln_server.workers")

WORKER_INDEX_ENV = "KILN_WORKER_INDEX"
METRICS_DIR_ENV = "KILN_METRICS_DIR"
_FATAL_CODES = (1, 2)
_MAX_RESTARTS, _RESTART_WINDOW_S = 5, 60.0
_SUM_GAUGES = frozenset({"kiln_inflight_requests"})
_MIN_GAUGES = frozenset({"kiln_model_ready"})
_SUMMED_TYPES = frozenset({"counter", "histogram", "summary", "untyped"})

Snapshot = list[list[Any]]  # [[name, type, doc, [[sample name, labels, value], ...]], ...]


def worker_index() -> int | None:
    """This process's worker index, or None when it is not a worker of a supervisor."""
    raw = os.environ.get(WORKER_INDEX_ENV)
    return int(raw) if raw is not None and raw.isdigit() else None


# --- metrics across workers ----------------------------------------------------------------


class _WorkerRequests(Collector):
    """`kiln_worker_requests{worker,pid}`: requests this worker answered (HTTP and gRPC)."""

    def __init__(self, index: int, count: Callable[[], float]) -> None:
        self.index = str(index)
        self.pid = str(os.getpid())
        self.count = count

    def collect(self) -> Iterator[Metric]:
        """One sample, labelled with this worker."""
        fam = CounterMetricFamily("kiln_worker_requests", "Requests answered, per server worker process.", labels=["worker", "pid"])
        fam.add_metric([self.index, self.pid], self.count())
        yield fam


def snapshot(registry: CollectorRegistry) -> Snapshot:
    """The registry's current samples as plain JSON-able lists."""
    out: Snapshot = []
    for fam in registry.collect():
        out.append([fam.name, fam.type, fam.documentation, [[s.name, s.labels, s.value] for s in fam.samples]])
    return out


def merge(live: list[Snapshot], retired: list[Snapshot]) -> list[Metric]:
    """One set of families from every worker's snapshot (rules in the module docstring)."""
    fams: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for snaps, is_retired in ((live, False), (retired, True)):
        for snap in snaps:
            for name, typ, doc, samples in snap:
                if is_retired and typ not in ("counter", "histogram"):
                    continue
                _, _, values = fams.setdefault(name, (typ, doc, {}))
                for sname, labels, value in samples:
                    key = (sname, tuple(sorted(labels.items())))
                    old = values.get(key)
                    values[key] = value if old is None else _combine(name, typ, old, value)
    metrics: list[Metric] = []
    for name, (typ, doc, values) in fams.items():
        m = Metric(name, doc, typ)
        for (sname, labels), value in values.items():
            m.add_sample(sname, dict(labels), value)
        metrics.append(m)
    return metrics


def _combine(name: str, typ: str, a: float, b: float) -> float:
    if typ in _SUMMED_TYPES or name in _SUM_GAUGES:
        return a + b
    if name in _MIN_GAUGES:
        return min(a, b)
    return max(a, b)


class _Merged:
    """A registry-like object `generate_latest` can render."""

    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        """The merged families."""
        yield from self.metrics


class SharedMetrics:
    """A worker's side of the pod-wide /metrics: write its snapshot, merge everyone's on a scrape."""

    def __init__(self, registry: CollectorRegistry, folder: str, index: int, count: Callable[[], float]) -> None:
        self.registry = registry
        self.folder = Path(folder)
        self.path = self.folder / f"worker-{index}.json"
        registry.register(_WorkerRequests(index, count))

    def write(self) -> None:
        """Write this worker's snapshot atomically (rename), so a reader never sees half a file."""
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(snapshot(self.registry)))
            tmp.replace(self.path)

    def render(self) -> bytes:
        """The pod's exposition text: this worker's live samples plus every other snapshot."""
        self.write()
        live: list[Snapshot] = []
        retired: list[Snapshot] = []
        for p in sorted(self.folder.glob("*.json")):
            try:
                snap = json.loads(p.read_text())
            except (OSError, ValueError):
                continue  # a worker being replaced; the next scrape sees it
            (retired if p.name.startswith("retired-") else live).append(snap)
        return generate_latest(_Merged(merge(live, retired)))


# --- the supervisor ------------------------------------------------------------------------


def _child_setup() -> None:  # pragma: no cover - runs in the forked child
    """In the child before exec: unblock the signals the supervisor waits on; die with the supervisor."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD})
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Supervisor:
    """Starts, watches, restarts and stops the workers."""

    def __init__(self, argv: list[str], workers: int, threads_each: int, graceful_timeout_s: float) -> None:
        self.argv = argv
        self.n = workers
        self.threads_each = threads_each
        self.graceful = graceful_timeout_s
        self.folder = tempfile.mkdtemp(prefix="kiln-metrics-")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.restarts: list[float] = []
        self.retired = 0

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        env = {**os.environ, WORKER_INDEX_ENV: str(index), METRICS_DIR_ENV: self.folder}
        if self.threads_each > 0:
            env["KILN_INTRA_OP_THREADS"] = str(self.threads_each)
        proc = subprocess.Popen([sys.executable, "-m", "kiln_server", *self.argv], env=env, preexec_fn=_child_setup)
        log.info("worker started", extra={"fields": {"event": "worker_started", "worker": index, "pid": proc.pid}})
        return proc

    def run(self) -> int:
        """Until SIGTERM/SIGINT (then drain all) or a fatal worker exit; returns the exit status."""
        sigs = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
        signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
        try:
            self.procs = [self._spawn(i) for i in range(self.n)]
            while True:
                info = signal.sigtimedwait(sigs, 1.0)
                if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                    return self._stop_all(0)
                code = self._reap()
                if code is not None:
                    return self._stop_all(code)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _reap(self) -> int | None:
        """Restart workers that died; a status to exit with when that cannot help."""
        for i, proc in enumerate(self.procs):
            rc = proc.poll()
            if rc is None:
                continue
            fields = {"event": "worker_exited", "worker": i, "pid": proc.pid, "exit_code": rc}
            if rc in _FATAL_CODES:
                log.error("worker exited; stopping the server", extra={"fields": fields})
                return rc
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < _RESTART_WINDOW_S] + [now]
            if len(self.restarts) > _MAX_RESTARTS:
                log.error("workers keep dying; stopping the server", extra={"fields": fields})
                return 1
            log.warning("worker died; restarting it", extra={"fields": fields})
            self._retire(i)
            self.procs[i] = self._spawn(i)
        return None

    def _retire(self, index: int) -> None:
        """Keep a dead worker's counters in the pod's sums (its snapshot becomes a retired one)."""
        path = Path(self.folder) / f"worker-{index}.json"
        self.retired += 1
        with contextlib.suppress(OSError):
            path.replace(path.with_name(f"retired-{index}-{self.retired}.json"))

    def _stop_all(self, code: int) -> int:
        """SIGTERM every worker, wait for their drain, SIGKILL what is left; `code`, or 1 if one failed."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.graceful + 10.0
        failed = False
        for proc in self.procs:
            try:
                rc = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
            failed = failed or rc not in (0, -signal.SIGTERM)
        if code == 0 and failed:
            code = 1
        log.info("stopped", extra={"fields": {"event": "stopped", "workers": self.n, "exit_code": code}})
        return code


def supervise(argv: list[str], workers: int, intra_op_threads: int, graceful_timeout_s: float) -> int:
    """Run `workers` server processes on the same ports; returns the exit status."""
    from kiln_server.model import available_cpus

    threads_each = 0 if intra_op_threads > 0 else max(1, available_cpus() // workers)
    log.info(
        "starting workers",
        extra={"fields": {"event": "workers", "workers": workers, "intra_op_threads": intra_op_threads or threads_each}},
    )
    return Supervisor(argv, workers, threads_each, graceful_timeout_s).run()
