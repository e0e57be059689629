#!/usr/bin/env python
"""Kiln next to the floors of its own stack, one run: V2 JSON batch 1 on the reference MLP, wrk -c8.

Rows (bench/server/floor_server.py, all httptools + uvloop, one process):
- `http`: HTTP only (fixed answer);
- `parse`: + simdjson parse of the body into an FP32 array;
- `infer`: + ONNX Runtime inline on the loop and the V2 JSON reply (the minimal inline server);
- `kiln`: `kiln serve` with its defaults (batching off), from the sources;
- `kiln-compiled` (`--compiled`): the same on the Cython build of the request path that the server
  image ships (images/server/build_compiled.py, built into the run's temporary folder).
Rounds alternate the servers' order; each server's number is its median round. Server pinned to
CPU 0 and wrk to CPU 1 (taskset) when the machine has 2+ CPUs. The headline is Kiln's req/s as a
share of the `infer` floor's in the same run.

    .venv/bin/python bench/server/floors.py [--seconds 5] [--rounds 3]

Raw numbers: bench/results/server_floors.json (one entry per --label); the table is printed (copy it
to docs/benchmarks.md). The same floors are also rows of the peers run (`run.py --headline`), next
to MLServer, KServe, Triton, BentoML and LitServe; this script is for Kiln-vs-floor A/Bs (--kiln-args).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402  (model builder, wrk driver, process helpers of the main server bench)
import wrk  # noqa: E402  (the one wrk driver: bench/server/wrk.py)

LEVELS = ("http", "parse", "infer")


def paired_shares(points: list[wrk.Point], floor: str) -> dict[str, float]:
    """Each server's median over rounds of its req/s over the floor's in the same round.

    A round measures every server once, back to back, so the two numbers of a pair saw nearly the
    same machine; on a host whose speed drifts between rounds this is steadier than the ratio of
    the two medians.
    """
    by: dict[str, list[float]] = {}
    for p in points:
        by.setdefault(p.server, []).append(p.rps)
    base = by[floor]
    return {name: statistics.median(r / b for r, b in zip(rps, base, strict=True) if b) for name, rps in by.items()}


def _build_compiled() -> Any:
    """images/server/build_compiled.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_compiled", HERE.parents[1] / "images" / "server" / "build_compiled.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--kiln-args", action="append", default=None,
                    help="extra `kiln serve` flags, space-separated; repeat for several Kiln rows in the same run")
    ap.add_argument("--levels", default=",".join(LEVELS), help="which floors to run (comma-separated; infer is required)")
    ap.add_argument("--compiled", action="store_true",
                    help="also run Kiln (defaults) on the compiled request path, as the server image ships it")
    ap.add_argument("--label", default="default", help="key of this run in bench/results/server_floors.json")
    ap.add_argument("--server-cpus", default="0", help="taskset CPU list of every server (2+ CPUs only)")
    ap.add_argument("--wrk-cpus", default="1", help="taskset CPU list of wrk (2+ CPUs only)")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2
    variants = args.kiln_args or [""]
    levels = [lv for lv in args.levels.split(",") if lv]
    if "infer" not in levels or any(lv not in LEVELS for lv in levels):
        ap.error(f"--levels: a comma-separated subset of {','.join(LEVELS)} that includes infer")
    labels = {"floor-http": "HTTP only (httptools + uvloop)", "floor-parse": "+ simdjson parse",
              "floor-infer": "+ inline ONNX Runtime and V2 reply (the minimal inline server)"}
    pin = (os.cpu_count() or 1) >= 2
    srv_cpus, wrk_cpus = (args.server_cpus, args.wrk_cpus) if pin else (None, None)
    work = Path(tempfile.mkdtemp(prefix="kiln-floors-"))
    model = run.build_mlp(work / "mlp.onnx")
    x1, expected = run.reference_request(model)
    body = run.json_body(x1)
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(), "seconds": args.seconds,
        "rounds": args.rounds, "pinned": pin, "connections": args.connections, "kiln_args": variants,
        "compiled": args.compiled,
        "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    servers: dict[str, run.Server] = {}
    points: list[wrk.Point] = []
    try:
        for level in levels:
            servers[f"floor-{level}"] = run.start_floor(level, model, work, srv_cpus)
        for k, extra in enumerate(variants):
            name = "kiln" if k == 0 else f"kiln-{k + 1}"
            servers[name] = run.start_kiln(model, work, srv_cpus, *extra.split(), label=name)
            labels[name] = "**Kiln** (`kiln serve`" + (f" {extra}" if extra else "") + ")"
        if args.compiled:
            out = work / "compiled"
            _build_compiled().build(out)
            servers["kiln-compiled"] = run.start_kiln(model, work, srv_cpus, label="kiln-compiled", compiled=out)
            labels["kiln-compiled"] = "**Kiln, compiled** (`kiln serve`, the server image's Cython build)"
        for name in servers:
            if name == "floor-infer" or name.startswith("kiln"):
                run.check_answer(servers[name], body, expected)
        plan: wrk.Plan = {name: [("json-b1", body, {"Content-Type": "application/json"}, args.connections, 1)] for name in servers}
        points = wrk.rounds(servers, plan, args.rounds, args.seconds, wrk_cpus, work)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    meta["load_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    med = {p.server: p for p in wrk.median_points(run.copy_points(points))}
    floor = med["floor-infer"].rps
    lines = [
        f"Measured {meta['date']} on {meta['cpus']} CPUs, loopback, wrk 1 thread, c={args.connections}, "
        f"{args.seconds:g} s per point after a 2 s warm-up, {args.rounds} rounds alternating the order, median round; "
        + (f"server on CPU {srv_cpus}, wrk on CPU {wrk_cpus}. " if pin else "no pinning. ")
        + f"Load average before/after: {meta['load_before']} / {meta['load_after']}.",
        "",
        "| server | req/s (median) | rounds | server CPU per request (us) | p50 / p99 ms | share of the inline floor "
        "| same-round share (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    paired = paired_shares(points, "floor-infer")
    for name, p in med.items():
        rounds = ", ".join(f"{q.rps:,.0f}" for q in points if q.server == name)
        cpu_us = p.server_cpu_cores / p.rps * 1e6 if p.rps else 0.0
        lines.append(f"| {labels[name]} | {p.rps:,.0f} | {rounds} | {cpu_us:.1f} | {p.p50_ms:.2f} / {p.p99_ms:.2f} "
                     f"| {p.rps / floor:.0%} | {paired[name]:.0%} |")
    text = "\n".join(lines)
    print(text)
    out = run.RESULTS / "server_floors.json"
    saved = json.loads(out.read_text()) if out.exists() else {}
    saved[args.label] = {"meta": meta, "points": [p.__dict__ for p in points]}
    out.write_text(json.dumps(saved, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
