#!/usr/bin/env python
"""gRPC next to REST: the same Kiln process, the same model, the same machine, one run.

One `kiln serve --grpc-port` process serves the reference MLP (1000 -> 64 -> 64 -> 10, as
bench/server/run.py). Batch-1 requests at 8 concurrent requests, in four forms:

- REST V2 JSON and REST V2 binary tensors, load from `wrk` (HTTP/1.1, 8 connections);
- gRPC `ModelInfer` with `raw_input_contents` (what tritonclient sends) and with typed
  `fp32_contents`, load from `h2load` (HTTP/2, 8 connections, 1 stream each, the serialized
  protobuf in gRPC framing).

The server is pinned to CPU 0 and the load generator to CPU 1 (taskset). Each form's answer is
checked against ONNX Runtime before it is timed, and after each gRPC point the server's own
`kiln_grpc_requests_total{code="OK"}` must have grown by h2load's count of answered calls (h2load
checks the HTTP status, not grpc-status). Rounds alternate the forms; each number is the median
round. Writes bench/results/grpc_rest.json and the "## gRPC and REST" section of docs/benchmarks.md.

    bash bench/server/setup_envs.sh             # once: h2load (Debian's nghttp2-client, unpacked privately)
    .venv/bin/python bench/server/grpc_rest.py [--seconds 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402  (the server bench's model builder, server launcher, wrk driver and report helpers)
import wrk  # noqa: E402  (the one wrk driver: bench/server/wrk.py)

SECTION = "## gRPC and REST"
H2LOAD_ROOT = run.ENVS / "h2load" / "root"
CONNS = 8


def h2load_cmd() -> list[str]:
    """h2load from the private unpack of Debian's nghttp2-client (setup_envs.sh), or from PATH."""
    private = H2LOAD_ROOT / "usr" / "bin" / "h2load"
    if private.exists():
        return ["env", f"LD_LIBRARY_PATH={H2LOAD_ROOT / 'usr/lib/x86_64-linux-gnu'}", str(private)]
    return ["h2load"]


def grpc_body(x: np.ndarray, raw: bool) -> bytes:
    """One ModelInferRequest in gRPC framing (flag byte, 4-byte big-endian length, message)."""
    from tritonclient.grpc import service_pb2

    req = service_pb2.ModelInferRequest(model_name="mlp", id="bench")
    t = req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    if raw:
        req.raw_input_contents.append(x.astype("<f4").tobytes())
    else:
        t.contents.fp32_contents.extend(x.ravel().tolist())
    msg = req.SerializeToString()
    return b"\0" + len(msg).to_bytes(4, "big") + msg


def check_grpc(port: int, x: np.ndarray, expected: np.ndarray) -> None:
    """tritonclient's answer must match ONNX Runtime's."""
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with grpcclient.InferenceServerClient(url=f"127.0.0.1:{port}") as c:
        got = c.infer("mlp", [inp]).as_numpy("probabilities")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def grpc_ok_count(server: run.Server) -> float:
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(r'^kiln_grpc_requests_total\{code="OK",method="ModelInfer"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def run_h2load(
    server: run.Server, gport: int, body: bytes, seconds: float, cpus: str | None, scenario: str, work: Path, check: bool = True
) -> wrk.Point:
    """One gRPC point: h2load for `seconds` after a 2 s warm-up; server CPU measured as wrk's points are."""
    body_file = work / f"{scenario}.bin"
    body_file.write_bytes(body)
    url = f"http://127.0.0.1:{gport}/inference.GRPCInferenceService/ModelInfer"
    cmd = [*h2load_cmd(), "-c", str(CONNS), "-m", "1", "-t", "1", "-D", f"{seconds:g}", "--warm-up-time", "2",
           "-d", str(body_file), "-H", "content-type: application/grpc", "-H", "te: trailers", url]
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    before = grpc_ok_count(server) if check else 0.0
    srv0 = server.cpu_seconds()
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    elapsed = time.monotonic() - t0
    srv_cpu = server.cpu_seconds() - srv0
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    assert done is not None, out
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
    ok = grpc_ok_count(server) - before if check else float(done.group(2))
    # the warm-up's calls count on the server too: the server must have answered at least h2load's measured ones with OK
    assert ok >= int(done.group(2)) and int(done.group(3)) == 0 and int(done.group(4)) == 0, out
    point = wrk.Point("kiln", scenario, CONNS, 1, rps, wrk.ms(mean.group(1)) if mean else float("nan"), float("nan"),
                      0, srv_cpu / elapsed, 0.0)
    print(f"  {scenario:14s} {rps:9.0f} req/s mean {point.p50_ms:6.2f} ms server {point.server_cpu_cores:.2f} cores", flush=True)
    return point


def floor_points(x: np.ndarray, seconds: float, rounds: int, work: Path) -> list[wrk.Point]:
    """The grpc.aio floor (grpc_floor.py: a fixed answer, no decoding, no inference), pinned like the server."""
    port = run.free_port()
    proc = run._popen([sys.executable, str(HERE / "grpc_floor.py"), str(port)], work / "grpc-floor.log", "0")
    floor = run.Server("grpc-floor", proc, port, "", work / "grpc-floor.log")
    body = grpc_body(x, True)
    body_file = work / "grpc-floor.bin"
    body_file.write_bytes(body)
    points = []
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([*h2load_cmd(), "-n", "1", "-d", str(body_file), "-H", "content-type: application/grpc", "-H", "te: trailers",
                              f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ModelInfer"],
                             capture_output=True, text=True).stdout.count("1 succeeded") == 0:
            if time.monotonic() > deadline:
                raise RuntimeError("grpc floor server did not start")
            time.sleep(0.2)
        for _ in range(rounds):
            points.append(run_h2load(floor, port, body, seconds, "1", "grpc-floor", work, check=False))
    finally:
        floor.stop()
    return points


def measure(seconds: float, rounds: int, work: Path) -> tuple[list[wrk.Point], dict[str, Any]]:
    """All four forms, `rounds` times, alternating; the server on CPU 0, the load on CPU 1."""
    model = run.build_mlp(work / "mlp.onnx")
    x = np.random.default_rng(1).standard_normal((1, 1000)).astype(np.float32)
    import onnxruntime as ort

    expected = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    gport = run.free_port()
    server = run.start_kiln(model, work, "0", "--grpc-port", str(gport), "--intra-op-threads", "1")
    points: list[wrk.Point] = []
    try:
        json_body = run.json_body(x)
        run.check_answer(server, json_body, expected)
        check_grpc(gport, x, expected)
        binary, head_len = run.binary_body(x)
        bodies = {"grpc-raw": grpc_body(x, True), "grpc-typed": grpc_body(x, False)}
        for r in range(rounds):
            print(f"round {r + 1}/{rounds}", flush=True)
            points.append(wrk.run_wrk(server, json_body, {"Content-Type": "application/json"}, CONNS, seconds, "1", "rest-json", 1, work))
            points.append(wrk.run_wrk(server, binary, {"Content-Type": "application/octet-stream",
                                                       "Inference-Header-Content-Length": str(head_len)},
                                      CONNS, seconds, "1", "rest-binary", 1, work))
            for scenario, body in bodies.items():
                points.append(run_h2load(server, gport, body, seconds, "1", scenario, work))
    finally:
        server.stop()
    points += floor_points(x, seconds, rounds, work)
    meta = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "seconds": seconds, "rounds": rounds,
            "load": " ".join(f"{v:.2f}" for v in os.getloadavg())}
    return wrk.median_points(points), meta


def render(points: list[wrk.Point], meta: dict[str, Any], command: str) -> str:
    by = {p.scenario: p for p in points}
    json_rps = by["rest-json"].rps
    lines = [SECTION, "", (
        f"Measured {meta['date']} on {meta['cpus']} CPUs, one `kiln serve --grpc-port` process pinned to CPU 0 "
        f"(`--intra-op-threads 1`), the load generator pinned to CPU 1, {CONNS} connections with one request in "
        f"flight each, batch-1 requests of the reference MLP, {meta['seconds']:g} s per point after a 2 s warm-up, "
        f"{meta['rounds']} rounds alternating the forms (median round; load average at the end {meta['load']}). "
        "REST load from wrk (HTTP/1.1), gRPC load from h2load (HTTP/2, the same serialized `ModelInferRequest` "
        "each call); every form's answer was checked against ONNX Runtime first, and the server's "
        "`kiln_grpc_requests_total{code=\"OK\"}` confirmed every gRPC call succeeded. Latency: REST median, gRPC mean "
        "(h2load reports no percentiles)."), "",
        "| form | req/s | vs REST JSON | latency ms | server CPU (cores) | req/s per server core | rounds (req/s) |",
        "|---|---|---|---|---|---|---|"]
    labels = {"rest-json": "REST V2 JSON", "rest-binary": "REST V2 binary tensors",
              "grpc-raw": "gRPC `raw_input_contents`", "grpc-typed": "gRPC typed `fp32_contents`",
              "grpc-floor": "floor: grpc.aio answering a fixed response (no decoding, no inference; grpc_floor.py)"}
    for scenario, label in labels.items():
        p = by.get(scenario)
        if p is None:
            continue
        lines.append(f"| {label} | {p.rps:,.0f} | {p.rps / json_rps:.2f}x | {p.p50_ms:.2f} | {p.server_cpu_cores:.2f} | "
                     f"{p.per_core:,.0f} | {', '.join(str(v) for v in p.extra.get('rounds_rps', []))} |")
    load = float(meta["load"].split()[0])
    if load > (meta["cpus"] or 1):
        lines += ["", (f"**Caveat: the machine was overloaded during this run** (load average {load:.1f} on {meta['cpus']} CPUs, "
                       "from other work on it): the server got a fraction of its CPU, so absolute req/s are far below what "
                       "it serves on a quiet machine; the ratios and the per-core column are the comparable numbers.")]
    lines += ["", f"Command: `{command}`",
              "Raw numbers: `bench/results/grpc_rest.json`.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if (os.cpu_count() or 1) < 2:
        print("needs 2 CPUs (server on one, load generator on the other)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="kiln-bench-grpc-") as tmp:
        points, meta = measure(args.seconds, args.rounds, Path(tmp))
    command = f".venv/bin/python bench/server/grpc_rest.py --seconds {args.seconds:g} --rounds {args.rounds}"
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    (run.RESULTS / "grpc_rest.json").write_text(json.dumps(
        {"meta": meta, "command": command, "points": [{**p.__dict__, "per_core": p.per_core} for p in points]}, indent=1) + "\n")
    run.write_section(render(points, meta, command), SECTION)
    print(render(points, meta, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
