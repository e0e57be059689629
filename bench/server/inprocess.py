#!/usr/bin/env python
"""The server's in-process cost per V2 request, without sockets: Kiln's request path next to the floor's.

    .venv/bin/python bench/server/inprocess.py [--rounds 5] [--requests 8000] [--compiled] [--instructions]

One request (the reference MLP, V2 JSON batch 1, as bench/server/floors.py sends it) is fed again and
again to a connection's `data_received` with a fake transport: HTTP parsing, routing, V2 decoding
and validation, ONNX Runtime (inline on the loop, as for a lone request), the encoded answer and the
metrics, all on one thread and without a syscall. Each variant runs in its own process, pinned to
one CPU, and the rounds alternate the variants:
- `floor`: bench/server/floor_server.py's inline level (the minimal inline server);
- `kiln`: Kiln's protocol from the sources;
- `kiln-compiled` (`--compiled`): the same on images/server/build_compiled.py's build (the server image's).

Two measures:
- thread CPU time per request (`time.thread_time`; the min and median of the rounds are printed).
  On a shared host the min is the least disturbed round.
- `--instructions`: instructions per request under valgrind's cachegrind (deterministic: N=1100 minus
  N=100 requests, so start-up cancels). Instructions are not time: interpreter code runs at a lower
  IPC than simdjson's SIMD loops, so this weighs the Python part less than the clock does.

The socket layer (epoll, reads and writes, several requests per loop iteration under concurrency) is
what this leaves out; bench/server/floors.py measures it all over real HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


class FakeTransport:
    """Counts the writes; everything else a protocol calls on a transport is a no-op."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1

    def writelines(self, parts: Any) -> None:
        self.writes += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


async def _child(which: str, n: int, warmup: int) -> None:
    """In the measured process: build the protocol, warm up, feed `n` requests, print us per request."""
    import numpy as np
    import run  # bench/server/run.py: the reference MLP and its request body

    work = Path(tempfile.mkdtemp(prefix="kiln-inprocess-"))
    model = run.build_mlp(work / "mlp.onnx")
    x1 = np.random.default_rng(7).standard_normal((1, 1000)).astype(np.float32)
    body = run.json_body(x1)
    req = (b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n" % len(body)) + body
    batcher = None
    if which == "floor":
        import floor_server
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
        proto: Any = floor_server.Floor("infer", sess)
    else:
        import kiln_server
        from kiln_server import settings as settings_mod
        from kiln_server.__main__ import _Service
        from kiln_server.http import HttpProtocol

        port = run.free_port()
        svc = _Service(settings_mod.from_args(["--model", str(model), "--name", "mlp", "--port", str(port),
                                               "--intra-op-threads", "1"]))
        await svc.server.start("127.0.0.1", port)
        await svc.load()
        batcher = svc.state.batcher
        assert batcher is not None
        proto = HttpProtocol(svc.server)
        want = which == "kiln-compiled"
        if bool(kiln_server.compiled_modules()) != want:
            raise SystemExit(f"{which}: compiled modules {kiln_server.compiled_modules()}")
    transport = FakeTransport()
    proto.connection_made(transport)

    def feed(count: int) -> None:
        for _ in range(count):
            if batcher is not None:
                batcher.per_element_s = 1e-9  # always the inline path: a lone request on an idle loop
            proto.data_received(req)

    async def drive(count: int) -> None:
        for _ in range(count):
            feed(1)
            await asyncio.sleep(0)  # the loop iteration end, where Kiln's dispatch runs

    await drive(warmup)
    t0 = time.thread_time()
    await drive(n)
    us = (time.thread_time() - t0) / n * 1e6
    if transport.writes != warmup + n:
        raise SystemExit(f"{which}: {transport.writes} answers for {warmup + n} requests")
    print(f"RESULT {us:.3f}")
    shutil.rmtree(work, ignore_errors=True)
    os._exit(0)  # skip teardown: the inference thread and the loop are not worth stopping here


def _env(which: str, compiled: Path | None) -> dict[str, str]:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    if which == "kiln-compiled" and compiled is not None:
        env["PYTHONPATH"] = str(compiled)
    return env


def _run(which: str, n: int, warmup: int, compiled: Path | None, cpu: str | None, wrap: list[str] | None = None) -> str:
    cmd = [sys.executable, __file__, "--child", which, "--requests", str(n), "--warmup", str(warmup)]
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", cpu, *cmd]
    if wrap:
        cmd = [*wrap, *cmd]
    out = subprocess.run(cmd, env=_env(which, compiled), capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"{which} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return out.stdout + out.stderr


def _instructions(which: str, compiled: Path | None, work: Path) -> float:
    """Cachegrind instructions per request: (N=1100 - N=100) / 1000."""
    counts = []
    for n in (100, 1100):
        log = _run(which, n, 0, compiled, None, ["valgrind", "--tool=cachegrind", "--cache-sim=no",
                                                  f"--cachegrind-out-file={work}/cg.{which}.{n}"])
        m = re.search(r"I\s+refs:\s+([\d,]+)", log)
        if m is None:
            raise SystemExit(f"{which}: no instruction count in valgrind's output:\n{log[-2000:]}")
        counts.append(int(m.group(1).replace(",", "")))
    return (counts[1] - counts[0]) / 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=8000)
    ap.add_argument("--warmup", type=int, default=2000)
    ap.add_argument("--compiled", action="store_true", help="also Kiln on the compiled build (the server image's)")
    ap.add_argument("--instructions", action="store_true", help="also instructions per request under cachegrind")
    ap.add_argument("--cpu", default="1" if (os.cpu_count() or 1) >= 2 else None, help="taskset CPU of each run")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import uvloop

        uvloop.run(_child(args.child, args.requests, args.warmup))
        return 0
    variants = ["floor", "kiln"] + (["kiln-compiled"] if args.compiled else [])
    work = Path(tempfile.mkdtemp(prefix="kiln-inprocess-"))
    compiled = None
    try:
        if args.compiled:
            import floors

            compiled = work / "compiled"
            floors._build_compiled().build(compiled)
        times: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for v in order:
                log = _run(v, args.requests, args.warmup, compiled, args.cpu)
                times[v].append(float(re.search(r"RESULT ([\d.]+)", log).group(1)))  # type: ignore[union-attr]
        instr = {v: _instructions(v, compiled, work) for v in variants} if args.instructions else {}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    floor_min = min(times["floor"])
    print(f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} CPUs, "
          f"{args.requests} requests per run after {args.warmup}, {args.rounds} rounds alternating the order"
          + (f", each run on CPU {args.cpu}" if args.cpu else "") + ".\n")
    head = "| variant | thread CPU per request, us (min) | median | rounds | floor / variant (min) |"
    sep = "|---|---|---|---|---|"
    if instr:
        head += " instructions per request | floor / variant (instructions) |"
        sep += "---|---|"
    print(head)
    print(sep)
    for v in variants:
        row = (f"| {v} | {min(times[v]):.1f} | {statistics.median(times[v]):.1f} | "
               f"{', '.join(f'{t:.1f}' for t in times[v])} | {floor_min / min(times[v]):.0%} |")
        if instr:
            row += f" {instr[v]:,.0f} | {instr['floor'] / instr[v]:.0%} |"
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
