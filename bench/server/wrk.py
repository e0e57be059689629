"""The one wrk driver of the server benchmarks: Lua POST script, command line, output parsing, a measured point.

Every bench under bench/ that loads a server with wrk goes through here (run.py, floors.py,
http_layers.py, grpc_rest.py's REST forms, workers_bench.py, batching_sweep.py, gpu_check.py,
server_soak.py), so the warm-up, the CPU accounting and the error count mean the same in all.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

LUA = """
local f = io.open("{body}", "rb")
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
{headers}
"""


class Target(Protocol):
    """What wrk loads: a named server with a URL, an infer path and a CPU-time reading (run.Server)."""

    name: str
    infer_path: str

    @property
    def url(self) -> str: ...

    def cpu_seconds(self) -> float: ...


@dataclass
class Point:
    server: str
    scenario: str
    connections: int
    rows_per_request: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    server_cpu_cores: float
    other_cpu_cores: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.rps * self.rows_per_request

    @property
    def per_core(self) -> float:
        """Requests per second per CPU-second the server used: comparable even when the server was
        not given a whole core (shared machine)."""
        return self.extra.get("median_per_core") or (self.rps / self.server_cpu_cores if self.server_cpu_cores else 0.0)


@dataclass(frozen=True)
class Result:
    """What one wrk run printed."""

    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def ms(value: str) -> float:
    """wrk's '812.00us' / '1.20ms' / '2.00s' in milliseconds (nan for anything else)."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", value)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]


def parse(out: str) -> Result:
    """Requests, req/s, p50/p99 (nan without --latency) and errors (non-2xx plus socket errors)."""
    total = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if total is None or rps is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(g) for g in m.groups())
    return Result(int(total.group(1)), float(rps.group(1)), ms(p50.group(1)) if p50 else float("nan"),
                  ms(p99.group(1)) if p99 else float("nan"), errors)


def post_script(work: Path, name: str, body: bytes, headers: dict[str, str]) -> Path:
    """A Lua script that POSTs `body` (kept in a file next to it) with `headers`."""
    body_file = work / f"body-{name}.bin"
    body_file.write_bytes(body)
    hdr = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    script = work / f"post-{name}.lua"
    script.write_text(LUA.format(body=body_file, headers=hdr))
    return script


def command(url: str, script: Path, conns: int, seconds: float, cpus: str | None = None, latency: bool = True) -> list[str]:
    """wrk with one thread, pinned to `cpus` with taskset where given."""
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", *(["--latency"] if latency else []), "-s", str(script), url]
    if cpus and shutil.which("taskset"):
        cmd = ["taskset", "-c", cpus, *cmd]
    return cmd


def once(url: str, script: Path, conns: int, seconds: float, cpus: str | None = None, latency: bool = True) -> Result:
    """One wrk run, parsed."""
    out = subprocess.run(command(url, script, conns, seconds, cpus, latency), capture_output=True, text=True,
                         timeout=seconds + 60, check=True).stdout
    return parse(out)


def _proc_stat_busy() -> float:
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    vals = [int(v) for v in parts]
    idle = vals[3] + vals[4]
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_wrk(
    server: Target, body: bytes, headers: dict[str, str], conns: int, seconds: float, cpus: str | None,
    scenario: str, rows: int, work: Path,
) -> Point:
    """One measured point: a 2 s warm-up, then `seconds` of load, with the server's CPU and everyone else's."""
    script = post_script(work, f"{server.name}-{scenario}", body, headers)
    url = server.url + server.infer_path
    # warm-up (JIT-free, but fills caches, connection pools and ORT arenas)
    subprocess.run(command(url, script, conns, 2, cpus, latency=False), capture_output=True, timeout=60)
    busy0, srv0 = _proc_stat_busy(), server.cpu_seconds()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    res = once(url, script, conns, seconds, cpus)
    elapsed = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy1, srv1 = _proc_stat_busy(), server.cpu_seconds()
    wrk_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    srv_cpu = srv1 - srv0
    other = max(0.0, (busy1 - busy0) - srv_cpu - wrk_cpu) / elapsed
    point = Point(server.name, scenario, conns, rows, res.rps, res.p50_ms, res.p99_ms, res.errors, srv_cpu / elapsed, other)
    print(
        f"  {server.name:10s} {scenario:18s} c={conns:<3d} {res.rps:9.0f} req/s {point.rows_per_s:10.0f} rows/s "
        f"p50 {res.p50_ms:7.2f} ms p99 {res.p99_ms:7.2f} ms errors {res.errors} server {point.server_cpu_cores:.2f} cores "
        f"others {other:.2f} cores",
        flush=True,
    )
    return point


Plan = dict[str, list[tuple[str, bytes, dict[str, str], int, int]]]
"""Per server label: (scenario, body, headers, connections, rows per request) of each point."""


def rounds(servers: dict[str, Any], plan: Plan, n: int, seconds: float, cpus: str | None, work: Path) -> list[Point]:
    """`n` rounds over every server's planned points, the servers' order reversed every other round;
    each point carries its round in extra['round']."""
    points = []
    for rnd in range(n):
        print(f"round {rnd + 1}/{n}", flush=True)
        for name in round_order(list(servers), rnd):
            for scenario, body, headers, conns, rows in plan[name]:
                point = run_wrk(servers[name], body, headers, conns, seconds, cpus, scenario, rows, work)
                point.extra["round"] = rnd + 1
                points.append(point)
    return points


def round_order(names: list[str], rnd: int) -> list[str]:
    """The servers' order in round `rnd` (0-based): as given in even rounds, reversed in odd ones, so
    drift in the other processes' load hits the first and the last server alike."""
    return list(names) if rnd % 2 == 0 else list(reversed(names))


def median_points(points: list[Point]) -> list[Point]:
    """One point per (server, scenario, connections): the median round by req/s (latencies from that round)."""
    groups: dict[tuple[str, str, int], list[Point]] = {}
    for p in points:
        groups.setdefault((p.server, p.scenario, p.connections), []).append(p)
    out = []
    for group in groups.values():
        ranked = sorted(group, key=lambda p: p.rps)
        mid = ranked[len(ranked) // 2]
        mid.extra["rounds_rps"] = [round(p.rps) for p in group]
        per_core = sorted(p.rps / p.server_cpu_cores for p in group if p.server_cpu_cores > 0)
        if per_core:
            mid.extra["median_per_core"] = per_core[len(per_core) // 2]
        mid.other_cpu_cores = max(p.other_cpu_cores for p in group)
        out.append(mid)
    return out
