#!/usr/bin/env python
"""The GPU check behind bench/gpu_check.sh: Kiln's server on the CUDA provider, against the CPU provider.

Run by gpu_check.sh with the Python of a venv that has onnxruntime-gpu (or, with `--cpu-dry-run`,
the project's own venv and the CPU provider, to check the script itself on a machine without a GPU).

1. builds an MLP (1000 -> W -> W -> 10, W = --width, default 1024) and starts `kiln serve --providers cuda`;
2. checks the served model says it runs on CUDAExecutionProvider (metadata parameters) and that its
   answers for 64 random rows match ONNX Runtime's CPU provider (rtol 1e-3: GPUs may use TF32);
3. measures with wrk (one thread, 8 connections): req/s with batch-1 requests and with batch-64
   requests (rows/s = 64 x req/s), then, at 64 connections of batch-1 requests, the server with and
   without dynamic batching (`--max-batch-size 64 --max-latency-ms 2`): the batching gain.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "server"))

import run  # noqa: E402  (model builder, server launcher, wrk driver)
import wrk  # noqa: E402  (the one wrk driver: bench/server/wrk.py)


def served(server: run.Server, x: np.ndarray) -> np.ndarray:
    req = urllib.request.Request(server.url + server.infer_path, data=run.json_body(x), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        doc = json.loads(r.read())
    return np.array(doc["outputs"][0]["data"], dtype=np.float32).reshape(len(x), -1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--cpu-dry-run", action="store_true", help="CPU provider: check this script where there is no GPU")
    args = ap.parse_args()
    provider = "cpu" if args.cpu_dry_run else "cuda"
    expected_provider = "CPUExecutionProvider" if args.cpu_dry_run else "CUDAExecutionProvider"
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="kiln-gpu-check-") as tmp:
        work = Path(tmp)
        model = run.build_mlp(work / "mlp.onnx", hidden=args.width)
        x64 = np.random.default_rng(3).standard_normal((64, 1000)).astype(np.float32)
        reference = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input": x64})[0]
        rps: dict[str, float] = {}
        for label, extra in (("unbatched", ["--max-batch-size", "1"]), ("batched", ["--max-batch-size", "64", "--max-latency-ms", "2"])):
            server = run.start_kiln(model, work, None, "--providers", provider, *extra, label=f"kiln-{label}")
            try:
                with urllib.request.urlopen(server.url + "/v2/models/mlp", timeout=10) as r:
                    providers = json.loads(r.read())["parameters"]["execution_providers"]
                if not providers.startswith(expected_provider):
                    print(f"FAIL: the server runs on {providers}, not {expected_provider}")
                    return 1
                got = served(server, x64)
                np.testing.assert_allclose(got, reference, rtol=1e-3, atol=1e-4)
                print(f"{label}: providers {providers}; 64 rows match the CPU provider (max abs diff {np.abs(got - reference).max():.2e})")
                one, hdr = run.json_body(x64[:1]), {"Content-Type": "application/json"}
                if label == "unbatched":
                    p1 = wrk.run_wrk(server, one, hdr, 8, args.seconds, None, "b1", 1, work)
                    p64 = wrk.run_wrk(server, run.json_body(x64), hdr, 8, args.seconds, None, "b64", 64, work)
                    rps["b1"], rps["b64"] = p1.rps, p64.rps
                point = wrk.run_wrk(server, one, hdr, 64, args.seconds, None, f"c64-{label}", 1, work)
                rps[label] = point.rps
            finally:
                server.stop()
    print(f"batch 1:  {rps['b1']:,.0f} req/s ({rps['b1']:,.0f} rows/s)")
    print(f"batch 64: {rps['b64']:,.0f} req/s ({64 * rps['b64']:,.0f} rows/s; {64 * rps['b64'] / rps['b1']:.1f}x the rows/s of batch 1)")
    print(f"dynamic batching at 64 connections of batch-1 requests: {rps['unbatched']:,.0f} -> {rps['batched']:,.0f} req/s, "
          f"gain {rps['batched'] / rps['unbatched']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
