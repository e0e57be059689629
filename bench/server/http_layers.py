#!/usr/bin/env python
"""Why the server has its own HTTP layer: Kiln's transport vs uvicorn and granian over the same application.

Three servers, one application: `kiln serve` (kiln_server/http.py on httptools + uvloop), and the
same `App`, handlers, batcher and metrics behind raw ASGI (bench/server/asgi_app.py) served by
uvicorn (`--http httptools --loop uvloop`) and by granian (`--interface asgi --loop uvloop`,
HTTP/1 only, one worker, one runtime thread). Same model (the reference MLP of bench/server/run.py),
same request (V2 JSON batch 1), same load (wrk, one thread), server pinned to CPU 0 and wrk to
CPU 1 with taskset; rounds alternate the servers' order. Each server's number is its median round.

    .venv/bin/pip install -r bench/server/requirements-http.txt   # uvicorn, granian (bench only)
    .venv/bin/python bench/server/http_layers.py                  # ~2.5 minutes

Rewrites only the "## Why the server has its own HTTP layer" section of docs/benchmarks.md and
the raw numbers in bench/results/http_layers.json (`--no-doc`: print only, write nothing).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402  (model builder, wrk driver, process helpers of the main server bench)
import wrk  # noqa: E402  (the one wrk driver: bench/server/wrk.py)

SECTION = "## Why the server has its own HTTP layer"
LABELS = {
    "kiln": "Kiln's own HTTP layer (`kiln serve`)",
    "uvicorn": "uvicorn {v}, raw ASGI, `--http httptools --loop uvloop`",
    "granian": "granian {v}, ASGI, `--loop uvloop --http 1`, 1 worker, 1 runtime thread",
}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def start_asgi(kind: str, model: Path, work: Path, cpus: str | None) -> run.Server:
    """uvicorn or granian serving bench/server/asgi_app.py (Kiln's App over ASGI) on a free port."""
    port = run.free_port()
    env = {"KILN_MODEL": str(model), "KILN_MODEL_NAME": "mlp"}
    if kind == "uvicorn":
        cmd = [
            sys.executable, "-m", "uvicorn", "asgi_app:app", "--app-dir", str(HERE), "--host", "127.0.0.1",
            "--port", str(port), "--http", "httptools", "--loop", "uvloop", "--no-access-log", "--log-level", "warning",
        ]
    else:
        cmd = [
            str(Path(sys.executable).parent / "granian"), "--interface", "asgi", "--loop", "uvloop", "--http", "1",
            "--no-ws", "--workers", "1", "--runtime-threads", "1", "--no-access-log", "--log-level", "warning",
            "--host", "127.0.0.1", "--port", str(port), "--working-dir", str(HERE), "asgi_app:app",
        ]
    log = work / f"{kind}.log"
    proc = run._popen(cmd, log, cpus, env=env)
    server = run.Server(kind, proc, port, "/v2/models/mlp/infer", log)
    run.wait_http(server.url + "/v2/health/ready")
    return server


def measure(seconds: float, rounds: int, conns: list[int], pin: bool) -> dict[str, Any]:
    """Start the servers, check their answers, run the rounds; returns meta and every point."""
    srv_cpus, wrk_cpus = ("0", "1") if pin else (None, None)
    work = Path(tempfile.mkdtemp(prefix="kiln-http-"))
    model = run.build_mlp(work / "mlp.onnx")
    x1, expected = run.reference_request(model)
    body = run.json_body(x1)
    versions = {"uvicorn": _version("uvicorn"), "granian": _version("granian")}
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(), "seconds": seconds,
        "rounds": rounds, "pinned": pin, "versions": versions, "skipped": {},
        "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    servers: dict[str, run.Server] = {}
    points: list[wrk.Point] = []
    try:
        servers["kiln"] = run.start_kiln(model, work, srv_cpus)
        for kind in ("uvicorn", "granian"):
            if versions[kind] is None:
                meta["skipped"][kind] = "not installed (pip install -r bench/server/requirements-http.txt)"
                continue
            try:
                servers[kind] = start_asgi(kind, model, work, srv_cpus)
            except RuntimeError as exc:
                meta["skipped"][kind] = str(exc)
        for server in servers.values():
            run.check_answer(server, body, expected)
        plan: wrk.Plan = {name: [("json-b1", body, {"Content-Type": "application/json"}, c, 1) for c in conns] for name in servers}
        points = wrk.rounds(servers, plan, rounds, seconds, wrk_cpus, work)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    meta["load_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return {"meta": meta, "points": [p.__dict__ for p in points]}


def _median(points: list[wrk.Point]) -> wrk.Point:
    ranked = sorted(points, key=lambda p: p.rps)
    return ranked[len(ranked) // 2]


def _median_cpu(points: list[wrk.Point]) -> float:
    """Median server CPU microseconds per request over the rounds."""
    values = sorted(1e6 * p.server_cpu_cores / p.rps for p in points if p.rps)
    return values[len(values) // 2] if values else 0.0


def _verdict(kiln: wrk.Point | None, medians: dict[str, tuple[wrk.Point, float]], c: int) -> list[str]:
    """What the figures say about keeping the hand-written layer (written from the numbers, either way)."""
    if kiln is None or "kiln" not in medians or len(medians) < 2:
        return []
    kcpu = medians["kiln"][1]
    others = {n: v for n, v in medians.items() if n != "kiln"}
    parts = [
        f"{n} costs {cpu / kcpu:.2f}x Kiln's CPU per request (Kiln answers {kiln.rps / p.rps:.2f}x its req/s)"
        for n, (p, cpu) in others.items()
    ]
    lowest = min(cpu / kcpu for _p, cpu in others.values())
    size = len((run.ROOT / "images" / "server" / "kiln_server" / "http.py").read_text().splitlines())
    text = f"At c={c}, the same application through " + "; through ".join(parts) + ". "
    text += (
        "The ASGI side includes the adapter (a dozen lines of Python per request, as any ASGI route has; a framework "
        "such as Starlette or FastAPI would add its own layers on top). "
    )
    if lowest >= 1.1:
        text += (
            "That is why kiln_server has its own HTTP layer: per request an ASGI server builds a scope dict, header lists "
            "and a message dict per `receive`/`send` and runs the app as a coroutine on a task, while Kiln's transport "
            "hands the parser's fields to the app as one `Request` and writes the answer with one `write` from the "
            f"`Deferred`'s callback. The price is the code: {size} lines in http.py that do keep-alive, pipelining, "
            "body limits, 100-continue, timeouts and the SIGTERM drain themselves (tests/server covers them)."
        )
    else:
        text += (
            "At these figures the hand-written layer saves less than 10% of a request's CPU over the best ASGI server "
            f"measured, which would not pay for maintaining the {size} lines of http.py."
        )
    return [text, ""]


def render(result: dict[str, Any], command: str) -> str:
    """The docs section: per-server medians, Kiln's ratios, and every round."""
    meta = result["meta"]
    points = [wrk.Point(**p) for p in result["points"]]
    names = list(dict.fromkeys(p.server for p in points))
    conns = sorted({p.connections for p in points}, reverse=True)

    def at(name: str, c: int) -> list[wrk.Point]:
        return [p for p in points if p.server == name and p.connections == c]

    def cpu_us(p: wrk.Point) -> float:
        return 1e6 * p.server_cpu_cores / p.rps if p.rps else 0.0

    lines = [SECTION, ""]
    lines.append(
        f"Measured {meta['date']} on {meta['cpus']} CPUs, loopback, wrk 1 thread, {meta['seconds']:g} s per point after "
        f"a 2 s warm-up, {meta['rounds']} rounds alternating the servers' order, median round per server. "
        + ("Server pinned to CPU 0, wrk to CPU 1 (taskset). " if meta["pinned"] else "No CPU pinning. ")
        + f"Load average before/after: {meta['load_before']} / {meta['load_after']} (shared machine)."
    )
    lines.append("")
    lines.append(
        "One application, three transports: the same `App`, V2 handler, batcher (off) and metrics, served by Kiln's "
        "own layer (`images/server/kiln_server/http.py`) and through a thin raw-ASGI adapter "
        "(`bench/server/asgi_app.py`, no framework) by uvicorn and by granian. Model: the reference MLP "
        "1000 -> 64 -> 64 -> 10; request: V2 JSON, batch 1 (1000 floats)."
    )
    lines.append("")
    head = "| server |" + "".join(f" req/s c={c} | p50 / p99 ms c={c} |" for c in conns)
    head += f" server CPU per request c={conns[0]} (us) | Kiln / this, req/s c={conns[0]} | this / Kiln, CPU per request |"
    head += " others, mean (cores) |"
    lines.append(head)
    lines.append("|" + "---|" * (1 + 2 * len(conns) + 4))
    kiln = _median(at("kiln", conns[0])) if at("kiln", conns[0]) else None
    for name in names:
        row = f"| {LABELS[name].format(v=meta['versions'].get(name))} |"
        for c in conns:
            pts = at(name, c)
            if not pts:
                row += " - | - |"
                continue
            m = _median(pts)
            row += f" {m.rps:,.0f} | {m.p50_ms:.2f} / {m.p99_ms:.2f} |"
        m = _median(at(name, conns[0]))
        cpu_sorted = sorted(cpu_us(p) for p in at(name, conns[0]))
        med_cpu = cpu_sorted[len(cpu_sorted) // 2]
        if kiln is not None:
            kcpu = sorted(cpu_us(p) for p in at("kiln", conns[0]))[len(at("kiln", conns[0])) // 2]
            ratio = f"**{kiln.rps / m.rps:.2f}x** | **{med_cpu / kcpu:.2f}x**" if name != "kiln" else "1.00x | 1.00x"
        else:
            ratio = "- | -"
        others = [p.other_cpu_cores for p in points if p.server == name]
        row += f" {med_cpu:.0f} | {ratio} | {sum(others) / len(others):.2f} |"
        lines.append(row)
    lines.append("")
    lines.extend(_verdict(kiln, {n: (_median(at(n, conns[0])), _median_cpu(at(n, conns[0]))) for n in names}, conns[0]))
    for kind, why in meta.get("skipped", {}).items():
        lines.append(f"{kind}: not measured: {why}.")
        lines.append("")
    lines.append(
        f"'this / Kiln, CPU per request' is that server's CPU time per request (all its processes and threads) divided by "
        f"Kiln's, median rounds at c={conns[0]}: how much more of the server's core the same answer costs through that "
        "transport. It depends less than req/s on how much of CPU 0 other processes took during a point ('others': CPU "
        "used by other processes, the machine is shared). granian's HTTP handling runs in its Rust runtime thread "
        "next to the Python thread that runs the app; pinned to one CPU, as here and as in a pod limited to one "
        "CPU, the two share it."
    )
    lines.append("")
    lines.append(f"Per round, req/s at c={conns[0]}:")
    lines.append("")
    lines.append("| round | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for r in sorted({p.extra.get("round", 0) for p in points}):
        vals = []
        for name in names:
            p = next((q for q in at(name, conns[0]) if q.extra.get("round") == r), None)
            vals.append(f"{p.rps:,.0f}" if p else "-")
        lines.append(f"| {r} | " + " | ".join(vals) + " |")
    lines.append("")
    errors = sum(p.errors for p in points)
    lines.append(f"Errors (non-2xx or socket) over all points: {errors}.")
    lines.append("")
    lines.append("Reproduce:")
    lines.append("")
    lines.append("```sh")
    lines.append("apt-get install -y wrk")
    lines.append(".venv/bin/pip install -r bench/server/requirements-http.txt   # uvicorn, granian: bench only")
    lines.append(command)
    lines.append("```")
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    """Measure (or re-render from http_layers.json) and write the docs section."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each measured point")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the servers' order alternates")
    ap.add_argument("--connections", default="8,1", help="wrk connection counts, comma-separated (first: the headline)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the server and wrk to separate CPUs")
    ap.add_argument("--no-doc", action="store_true", help="print only; write neither docs nor http_layers.json")
    ap.add_argument("--render-only", action="store_true", help="re-render the section from bench/results/http_layers.json")
    args = ap.parse_args()
    out = HERE.parent / "results" / "http_layers.json"
    if args.render_only:
        result = json.loads(out.read_text())
    else:
        if not shutil.which("wrk"):
            print("wrk not found: apt-get install -y wrk", file=sys.stderr)
            return 2
        pin = not args.no_pin and (os.cpu_count() or 1) >= 2
        conns = [int(c) for c in args.connections.split(",")]
        result = measure(args.seconds, args.rounds, conns, pin)
        command = ".venv/bin/python bench/server/http_layers.py"
        command += f" --seconds {args.seconds:g}" if args.seconds != 5 else ""
        command += f" --rounds {args.rounds}" if args.rounds != 3 else ""
        command += f" --connections {args.connections}" if args.connections != "8,1" else ""
        result["meta"]["command"] = command
    text = render(result, result["meta"]["command"])
    print()
    print(text)
    if not args.no_doc:
        if not args.render_only:
            out.write_text(json.dumps(result, indent=2) + "\n")
        run.write_section(text, SECTION)
        print(f"updated docs/benchmarks.md section '{SECTION}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
