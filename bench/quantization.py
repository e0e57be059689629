"""Float vs int8 ONNX in ONNX Runtime on this CPU: single-row latency and batch-64 throughput.

Both models come from `kiln train` itself (spec.output.formats [onnx, onnx-int8], so the int8 file is
exactly what a TrainingJob ships, preprocessing included): the reference MLP (1000 -> Dense 64 relu
-> Dense 64 relu -> Dense 10 softmax, examples/mlp data) and the digits example. Float and int8
sessions run side by side in one process, alternating (the order flips every round), each round
timing both; the table gives the median over rounds. One intra-op thread, as a server worker runs.

Usage: .venv/bin/python bench/quantization.py [--rounds 5] [--single 2000] [--batches 300] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "mlp"))
sys.path.insert(0, str(ROOT / "images" / "trainer"))
from make_data import make  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "2")
SECTION = "## Float vs int8 ONNX"
COMMAND = ".venv/bin/python bench/quantization.py --write-docs"


def train(name: str, doc: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Train with the built-in trainer, float and int8 ONNX; returns result.json."""
    from kiln_trainer import api

    doc["spec"]["output"] = {"uri": "out", "formats": ["onnx", "onnx-int8"], "formatTolerance": -1}
    print(f"training {name} ...", flush=True)
    return api.train_doc(doc, folder)


def models(work: Path) -> dict[str, tuple[dict[str, Any], np.ndarray, Path]]:
    """(result, sample rows, output dir) for the reference MLP and digits."""
    mlp_dir, digits_dir = work / "mlp", work / "digits"
    mlp_dir.mkdir()
    digits_dir.mkdir()
    x, y = make(20000)
    np.savez(mlp_dir / "data.npz", x=x, y=y)
    mlp = yaml.safe_load((ROOT / "examples" / "mlp" / "trainingjob.yaml").read_text())
    mlp["spec"]["training"]["epochs"] = 10
    digits = yaml.safe_load((ROOT / "examples" / "digits" / "trainingjob.yaml").read_text())
    digits["spec"]["training"]["epochs"] = 15
    (digits_dir / "digits.csv").write_bytes((ROOT / "examples" / "digits" / "digits.csv").read_bytes())
    import pandas as pd

    dx = pd.read_csv(digits_dir / "digits.csv").drop(columns="label").to_numpy("float32")
    return {"reference MLP (1000-64-64-10)": (train("mlp", mlp, mlp_dir), x, mlp_dir / "out"),
            "digits (64-64-10)": (train("digits", digits, digits_dir), dx, digits_dir / "out")}


def session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def single(sess: Any, rows: np.ndarray, n: int) -> list[float]:
    """Per-call seconds of `n` one-row requests (cycling through `rows`)."""
    feed = [{"input": rows[i % len(rows)][None, :]} for i in range(n)]
    out = []
    for f in feed:
        t = time.perf_counter()
        sess.run(None, f)
        out.append(time.perf_counter() - t)
    return out


def throughput(sess: Any, rows: np.ndarray, batches: int, size: int = 64) -> float:
    """Rows per second over `batches` calls of `size` rows."""
    feed = [{"input": rows[(i * size) % (len(rows) - size):][:size]} for i in range(batches)]
    t = time.perf_counter()
    for f in feed:
        sess.run(None, f)
    return batches * size / (time.perf_counter() - t)


def measure(paths: dict[str, Path], rows: np.ndarray, rounds: int, n_single: int,
            n_batches: int) -> dict[str, dict[str, float]]:
    """Alternating rounds over float/int8; medians of each round's p50, p99 and rows/s."""
    sessions = {k: session(p) for k, p in paths.items()}
    for s in sessions.values():  # warm-up: first calls allocate
        single(s, rows, 50)
        throughput(s, rows, 10)
    per: dict[str, dict[str, list[float]]] = {k: {"p50": [], "p99": [], "rps": []} for k in sessions}
    keys = list(sessions)
    for r in range(rounds):
        for k in keys if r % 2 == 0 else keys[::-1]:
            lat = np.asarray(single(sessions[k], rows, n_single)) * 1e6
            per[k]["p50"].append(float(np.percentile(lat, 50)))
            per[k]["p99"].append(float(np.percentile(lat, 99)))
            per[k]["rps"].append(throughput(sessions[k], rows, n_batches))
    return {k: {m: statistics.median(v) for m, v in d.items()} for k, d in per.items()}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| model | format | size | held-out accuracy (delta) | p50 1 row | p99 1 row | batch 64 rows/s |\n"
            "|---|---|---:|---:|---:|---:|---:|\n")
    return head + "".join(
        f"| {r['model']} | {r['format']} | {r['size'] / 1024:.1f} KiB | {r['metric']:.4f} ({r['delta']:+.4f}) | "
        f"{r['p50']:.1f} µs | {r['p99']:.1f} µs | {r['rps']:,.0f} |\n" for r in rows)


def ratios(rows: list[dict[str, Any]]) -> str:
    """One line per model: what int8 changes relative to float (size, batch throughput, single-row p50)."""
    lines = []
    for name in dict.fromkeys(r["model"] for r in rows):
        f, q = (next(r for r in rows if r["model"] == name and r["format"] == fmt) for fmt in ("onnx", "onnx-int8"))
        lines.append(f"- {name}: int8 is {q['size'] / f['size']:.0%} of the float size, batch-64 throughput "
                     f"x{q['rps'] / f['rps']:.2f}, single-row p50 x{q['p50'] / f['p50']:.2f}, accuracy "
                     f"{q['metric'] - f['metric']:+.4f}.\n")
    return "".join(lines)


def write_docs(text: str, path: Path = ROOT / "docs" / "benchmarks.md") -> None:
    """Replace (or append) only this section of docs/benchmarks.md; other sections stay untouched."""
    doc = path.read_text()
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(doc):
        doc = pattern.sub(lambda _: text, doc, count=1)
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    path.write_text(doc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--single", type=int, default=2000, help="one-row calls per round and format")
    p.add_argument("--batches", type=int, default=300, help="batch-64 calls per round and format")
    p.add_argument("--write-docs", action="store_true", help=f"write the '{SECTION}' section of docs/benchmarks.md")
    p.add_argument("--json", help="also write the numbers here (e.g. bench/results/quantization.json)")
    a = p.parse_args()
    import onnxruntime as ort

    rows_out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-quant-") as tmp:
        for name, (result, x, out) in models(Path(tmp)).items():
            entries = {f["format"]: f for f in result["formats"]}
            paths = {fmt: out / entries[fmt]["file"] for fmt in ("onnx", "onnx-int8")}
            print(f"measuring {name} ...", flush=True)
            numbers = measure(paths, x.astype("float32"), a.rounds, a.single, a.batches)
            for fmt in paths:
                e = entries[fmt]
                rows_out.append({"model": name, "format": fmt, "size": e["sizeBytes"], "metric": e["metric"],
                                 "delta": e["delta"], **numbers[fmt]})
    text = table(rows_out)
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps(rows_out, indent=2) + "\n")
    if a.write_docs:
        write_docs(
            f"{SECTION}\n\n"
            f"`model.onnx` against `model-int8.onnx` (ONNX Runtime dynamic quantization, int8 weights, what\n"
            f"`spec.output.formats: [onnx, onnx-int8]` ships), both trained by `kiln train` in the same run.\n"
            f"ONNX Runtime {ort.__version__}, CPU execution provider, 1 intra-op thread, on {cpu_name()}\n"
            f"({os.cpu_count()} cores visible, shared with other work). Float and int8 sessions alternate in one\n"
            f"process; {a.rounds} rounds, each {a.single} single-row calls and {a.batches} batch-64 calls per\n"
            f"format; each figure is the median over rounds. Accuracy is the trainer's held-out figure\n"
            f"(`status.result.formats[].metric`, delta vs. the float Keras model).\n\n"
            f"{text}\n{ratios(rows_out)}\n"
            f"Single-row calls are dominated by per-call overhead at these sizes, and dynamic quantization\n"
            f"adds a quantize step per call: expect int8 to pay off in bytes, and in batch throughput where\n"
            f"the weight matrices are large, rather than in single-row latency. p99 on a shared machine is\n"
            f"noisy; compare p50 and rows/s.\n\n"
            f"Command: `{COMMAND}`\n\n")
        print(f"wrote the '{SECTION}' section of docs/benchmarks.md")


if __name__ == "__main__":
    main()
