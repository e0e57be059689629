"""Model server soak: a bounded run of at least 200,000 requests against one `kiln serve` process.

Reports errors (non-2xx and socket errors) and resident memory (VmRSS of the server and its children)
after warm-up vs at the end, sampled every few seconds in between, so a leak shows as a trend.
Loopback only; wrk from Debian's package. Run: .venv/bin/python bench/server_soak.py [--requests N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "server"))

import wrk
from run import _children, build_mlp, json_body, start_kiln


def rss_mb(pid: int) -> float:
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=200_000)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--chunk-seconds", type=int, default=10)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-soak-"))
    model = build_mlp(work / "mlp.onnx")
    server = start_kiln(model, work, None, "--max-batch-size", "32", "--max-latency-ms", "1")
    body = json_body(np.random.default_rng(1).standard_normal((1, 1000)).astype("float32"))
    script = wrk.post_script(work, "soak", body, {"Content-Type": "application/json"})
    url = server.url + server.infer_path
    try:
        wrk.once(url, script, args.connections, 3, latency=False)  # warm-up: allocator pools, ORT arenas, connection buffers
        start = rss_mb(server.proc.pid)
        samples = [start]
        total = errors = 0
        t0 = time.monotonic()
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(2):
                samples.append(rss_mb(server.proc.pid))

        threading.Thread(target=sample, daemon=True).start()
        while total < args.requests:
            res = wrk.once(url, script, args.connections, args.chunk_seconds, latency=False)
            total += res.requests
            errors += res.errors
        stop.set()
        elapsed = time.monotonic() - t0
        end = rss_mb(server.proc.pid)
        alive = server.proc.poll() is None
    finally:
        server.stop()
    print(f"requests: {total:,} in {elapsed:.0f} s ({total / elapsed:,.0f} req/s), errors: {errors}, server alive: {alive}")
    print(f"RSS after warm-up: {start:.1f} MB, at the end: {end:.1f} MB, max while running: {max(samples):.1f} MB, "
          f"growth: {end - start:+.1f} MB ({(end - start) / start * 100:+.1f}%)")
    return 0 if errors == 0 and alive else 1


if __name__ == "__main__":
    sys.exit(main())
