#!/usr/bin/env python
"""Model server benchmark: Kiln, the floors of its stack and the servers a user would pick instead, one run, one machine.

Every server serves the same ONNX file (the reference MLP 1000 -> 64 -> 64 -> 10, onnx.helper,
random weights from seed 0) through ONNX Runtime on CPU with the same intra-op threads (Kiln's
default: the CPUs it may use). Rows: Kiln (batching off and on); the floors (floor_server.py: HTTP
only, + parse, + inline inference); MLServer 1.7.1, KServe 0.21, NVIDIA Triton through
nvidia-pytriton 0.7.0 (dynamic batching), all V2 JSON; BentoML 1.4.40 and LitServe 0.2.19, which
speak no V2 and get the same floats as a plain JSON list. Load comes from `wrk` (one thread, Lua
script for the POST body, bench/server/wrk.py) over loopback for a fixed duration per point; rounds
reverse the servers' order every other round. With `--pin` (default when the machine has 2+ CPUs)
the server and everything it starts run on CPU 0 and wrk on CPU 1 via `taskset`, so the load
generator does not steal the server's core. One answer of every server is checked before timing.

    bash bench/server/setup_envs.sh                  # once: the peers' venvs (not part of CI or make test)
    .venv/bin/python bench/server/run.py             # every point; updates the "## Model server" section
    .venv/bin/python bench/server/run.py --headline  # batch 1 at c=8, every server: the peers section
    .venv/bin/python bench/server/run.py --quick     # Kiln alone, V2 JSON batch 1, c=8 and c=1; writes nothing

Results: the "## Model server" section of docs/benchmarks.md and bench/results/server.json (full
run), or the "## Model server: floors and peers, one run" section and bench/results/server_peers.json
(--headline); only that section is rewritten. A server whose venv is missing is skipped and said so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from wrk import Plan, Point, median_points, run_wrk  # noqa: E402  (the one wrk driver of the benches)
from wrk import rounds as wrk_rounds  # noqa: E402

ROOT = HERE.parents[1]
ENVS = Path(os.environ.get("KILN_BENCH_ENVS", "~/.cache/kiln/bench")).expanduser()
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "bench" / "results"
"""Every bench's raw numbers, committed next to each other."""
SECTION = "## Model server"
SECTION_PEERS = "## Model server: floors and peers, one run"
LIST_REQUEST = '`{"inputs": [1000 floats]}` (plain JSON list, not V2)'
PEER_NOTES = [
    "The floors (bench/server/floor_server.py) are Kiln's own stack with parts removed: they bound what a server on "
    "httptools + uvloop + simdjson + ONNX Runtime can do per request; the HTTP-only and parse floors answer a fixed "
    "body (only their status was checked).",
    "Every server runs the same ONNX file through ONNX Runtime on CPU with the same intra-op threads, each in its "
    "documented custom-model path (bench/server/mlserver_runtime.py, kserve_model.py, pytriton_server.py, "
    "bentoml_service.py, litserve_api.py), one worker/process, otherwise with its defaults; access logs off where the "
    "server logs every request (BentoML, LitServe).",
    "NVIDIA Triton is the tritonserver that `nvidia-pytriton` bundles: it has only the Python backend, so the model is "
    "a Python callable in a separate process fed by Triton through ZeroMQ and shared memory (PyTriton's design), not Triton's C++ "
    "ONNX Runtime backend; Triton's HTTP front end, V2 protocol and dynamic batcher are its own C++. A Triton built "
    "with the onnxruntime backend would skip the Python hop.",
    "BentoML and LitServe speak no V2: they get the same 1000 floats as a plain JSON list (`{\"inputs\": [...]}`, "
    "about the same bytes as the V2 body without its envelope) on their own `/predict` route and answer "
    "`{\"probabilities\": [...]}`. LitServe runs inference in a separate worker process fed through queues.",
    "Kiln / server: Kiln's median over the server's in this run; for the floors it is Kiln's share of the floor.",
]
LABELS = {
    "floor-http": "floor: HTTP only (floor_server.py, httptools + uvloop, fixed answer)",
    "floor-parse": "floor: + simdjson parse of the body into FP32",
    "floor-infer": "floor: + inline ONNX Runtime and V2 reply (the minimal inline server)",
    "kiln": "**Kiln** (`kiln serve`, batching off)",
    "kiln-batching": "**Kiln** (`--max-batch-size 64 --max-latency-ms 2`)",
    "mlserver": "MLServer 1.7.1, custom ORT runtime, parallel_workers=0",
    "triton": "NVIDIA Triton (nvidia-pytriton 0.7.0: Python backend), dynamic batching (max 64, no queue delay)",
    "kserve": "KServe 0.21 Python server, custom ORT model",
    "bentoml": "BentoML 1.4.40, 1 worker, sync API",
    "litserve": "LitServe 0.2.19, 1 worker, batching off",
}
WIDE = 2048  # hidden width of the "wide" MLP used to show batching where compute dominates


# --- model -------------------------------------------------------------------------------------


def build_mlp(path: Path, seed: int = 0, hidden: int = 64) -> Path:
    """The reference MLP 1000 -> 64 -> 64 -> 10 with a symbolic batch dim, random weights (fixed seed).

    `hidden` widens the two hidden layers (the "wide" model where ONNX Runtime's compute, not HTTP
    and JSON, dominates a request).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def w(name: str, shape: tuple[int, ...]) -> Any:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)

    nodes = [
        helper.make_node("MatMul", ["input", "W1"], ["h1"]),
        helper.make_node("Add", ["h1", "B1"], ["h1b"]),
        helper.make_node("Relu", ["h1b"], ["r1"]),
        helper.make_node("MatMul", ["r1", "W2"], ["h2"]),
        helper.make_node("Add", ["h2", "B2"], ["h2b"]),
        helper.make_node("Relu", ["h2b"], ["r2"]),
        helper.make_node("MatMul", ["r2", "W3"], ["h3"]),
        helper.make_node("Add", ["h3", "B3"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1000])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        [
            w("W1", (1000, hidden)), w("B1", (hidden,)), w("W2", (hidden, hidden)), w("B2", (hidden,)),
            w("W3", (hidden, 10)), w("B3", (10,)),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# --- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready within {timeout} s")


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    infer_path: str
    log: Path
    notes: str = ""
    request: str = "v2"
    """'v2': V2 JSON bodies (json_body); 'list': `{"inputs": [floats]}` (list_body), for BentoML and LitServe."""
    metrics_url: str = ""
    """Triton's Prometheus endpoint: the mean batch its dynamic batcher formed (triton_mean_batch)."""
    computes: bool = True
    """False for the HTTP-only and parse floors: they answer a fixed body, so only their 200 is checked."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """CPU time of the server process and its children still running (all threads)."""
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        for pid in [self.proc.pid, *_children(self.proc.pid)]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError, ValueError):
                continue
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for k in kids:
        out.append(int(k))
        out.extend(_children(int(k)))
    return out


def _popen(
    cmd: list[str], log: Path, cpus: str | None, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    if cpus and shutil.which("taskset"):
        cmd = ["taskset", "-c", cpus, *cmd]
    with open(log, "wb") as f:
        return subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True
        )


def _launch(
    name: str, cmd: list[str], port: int, work: Path, cpus: str | None, ready: str, infer: str = "/v2/models/mlp/infer",
    *, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120.0, **fields: Any,
) -> Server:
    """Start `cmd` (own session, pinned to `cpus`, output in work/NAME.log) and wait until `ready` answers 200;
    a server that does not get ready is stopped, not left running."""
    log = work / f"{name}.log"
    server = Server(name, _popen(cmd, log, cpus, env=env, cwd=cwd), port, infer, log, **fields)
    try:
        wait_http(server.url + ready, timeout)
    except RuntimeError:
        server.stop()
        raise
    return server


def intra_op_threads(cpus: str | None) -> int:
    """ONNX Runtime intra-op threads as Kiln sets them by default: the CPUs the server may use
    (1 when pinned to CPU 0). Every peer server gets the same number."""
    if not cpus:
        return len(os.sched_getaffinity(0))
    n = 0
    for part in cpus.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def _env_python(env: str, exe: str = "python") -> Path:
    path = ENVS / env / "bin" / exe
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run bench/server/setup_envs.sh {env}")
    return path


def start_kiln(
    model: Path, work: Path, cpus: str | None, *extra: str, label: str = "kiln", name: str = "mlp",
    compiled: Path | None = None,
) -> Server:
    """`python -m kiln_server`; with `compiled` (a build_compiled.py output folder) on its compiled request path."""
    port = free_port()
    cmd = [sys.executable, "-m", "kiln_server", "--model", str(model), "--name", name, "--port", str(port), *extra]
    env = {"PYTHONPATH": str(compiled)} if compiled is not None else None
    notes = " ".join(extra) + (" (compiled)" if compiled is not None else "")
    return _launch(label, cmd, port, work, cpus, "/v2/health/ready", f"/v2/models/{name}/infer", env=env, notes=notes)


def start_mlserver(model: Path, work: Path, cpus: str | None) -> Server:
    py = _env_python("mlserver", "mlserver")
    d = work / "mlserver"
    (d / "mlp").mkdir(parents=True, exist_ok=True)
    port = free_port()
    settings = {"http_port": port, "grpc_port": free_port(), "metrics_port": free_port(), "parallel_workers": 0, "debug": False}
    (d / "settings.json").write_text(json.dumps(settings))
    (d / "mlp" / "model-settings.json").write_text(
        json.dumps({"name": "mlp", "implementation": "mlserver_runtime.OnnxRuntimeModel", "parameters": {"uri": str(model)}})
    )
    shutil.copy(HERE / "mlserver_runtime.py", d / "mlserver_runtime.py")
    env = {"PYTHONPATH": str(d), "KILN_BENCH_THREADS": str(intra_op_threads(cpus))}
    return _launch("mlserver", [str(py), "start", str(d)], port, work, cpus, "/v2/models/mlp/ready", env=env, cwd=d,
                   notes="1.7.1, parallel_workers=0")


def start_kserve(model: Path, work: Path, cpus: str | None) -> Server:
    port = free_port()
    cmd = [
        str(_env_python("kserve")), str(HERE / "kserve_model.py"), "--model_name", "mlp", "--model_path", str(model),
        "--http_port", str(port), "--grpc_port", str(free_port()), "--enable_grpc", "false", "--workers", "1",
    ]
    return _launch("kserve", cmd, port, work, cpus, "/v2/models/mlp/ready", env={"KILN_BENCH_THREADS": str(intra_op_threads(cpus))},
                   notes="0.21, 1 worker")


def start_floor(level: str, model: Path, work: Path, cpus: str | None) -> Server:
    """One floor server of Kiln's stack (floor_server.py: HTTP only, + parse, + inline ONNX Runtime)."""
    port = free_port()
    cmd = [sys.executable, str(HERE / "floor_server.py"), "--level", level, "--model", str(model), "--port", str(port)]
    return _launch(f"floor-{level}", cmd, port, work, cpus, "/v2/health/ready", computes=level == "infer")


def start_triton(model: Path, work: Path, cpus: str | None) -> Server:
    """NVIDIA Triton through PyTriton (pytriton_server.py), dynamic batching up to 64 rows, no queue delay.

    Ready means `/v2/models/mlp/ready`: the server's own `/v2/health/ready` answers before the model is loaded.
    """
    port, metrics = free_port(), free_port()
    cmd = [str(_env_python("pytriton")), str(HERE / "pytriton_server.py"), "--model", str(model), "--http-port", str(port),
           "--grpc-port", str(free_port()), "--metrics-port", str(metrics), "--threads", str(intra_op_threads(cpus)),
           "--workspace", str(work / "triton-workspace")]
    return _launch("triton", cmd, port, work, cpus, "/v2/models/mlp/ready", cwd=work, timeout=300,
                   notes="nvidia-pytriton 0.7.0, Python backend, dynamic batching (max 64, delay 0)",
                   metrics_url=f"http://127.0.0.1:{metrics}/metrics")


def triton_mean_batch(server: Server) -> float:
    """Rows per model execution so far (nv_inference_count / nv_inference_exec_count): how much Triton's
    dynamic batcher merged."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()

    def total(metric: str) -> float:
        return sum(float(v) for v in re.findall(rf'^{metric}{{[^}}]*model="mlp"[^}}]*}} (\S+)$', text, re.M))

    execs = total("nv_inference_exec_count")
    return total("nv_inference_count") / execs if execs else 0.0


def start_bentoml(model: Path, work: Path, cpus: str | None) -> Server:
    """BentoML 1.4 (bentoml_service.py), one worker, its own request shape (list_body)."""
    port = free_port()
    cmd = [str(_env_python("bentoml", "bentoml")), "serve", "bentoml_service:Mlp", "--working-dir", str(HERE),
           "--host", "127.0.0.1", "--port", str(port)]
    env = {"KILN_BENCH_MODEL": str(model), "KILN_BENCH_THREADS": str(intra_op_threads(cpus)),
           "BENTOML_DO_NOT_TRACK": "True", "BENTOML_HOME": str(work / "bentoml-home")}
    return _launch("bentoml", cmd, port, work, cpus, "/readyz", "/predict", env=env, cwd=work, timeout=180,
                   notes="1.4.40, 1 worker", request="list")


def start_litserve(model: Path, work: Path, cpus: str | None) -> Server:
    """LitServe 0.2 (litserve_api.py), one CPU worker, batching off, its own request shape (list_body)."""
    port = free_port()
    cmd = [str(_env_python("litserve")), str(HERE / "litserve_api.py"), "--model", str(model), "--port", str(port),
           "--threads", str(intra_op_threads(cpus))]
    return _launch("litserve", cmd, port, work, cpus, "/health", "/predict", cwd=work, timeout=180,
                   notes="0.2.19, 1 worker", request="list")


# --- load --------------------------------------------------------------------------------------

def reference_request(model: Path, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """The benches' one-row request (random, fixed seed) and ONNX Runtime's answer to it in this process:
    what every server must answer before it is timed."""
    import onnxruntime as ort

    x = np.random.default_rng(seed).standard_normal((1, 1000)).astype(np.float32)
    return x, ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def json_body(x: np.ndarray) -> bytes:
    doc = {"id": "bench", "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    return json.dumps(doc).encode()


def binary_body(x: np.ndarray) -> tuple[bytes, int]:
    head = json.dumps(
        {
            "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return head + x.astype("<f4").tobytes(), len(head)


def list_body(x: np.ndarray) -> bytes:
    """The same rows as a plain JSON list, `{"inputs": [1000 floats]}` for one row: BentoML's and LitServe's
    own API shape (they speak no V2)."""
    data = x.ravel().tolist() if x.shape[0] == 1 else x.tolist()
    return json.dumps({"inputs": data}).encode()


def check_answer(server: Server, body: bytes, expected: np.ndarray) -> None:
    """Every server must give the same probabilities (and so the same argmax) before it is timed.

    V2 servers answer `outputs[0].data`; BentoML and LitServe `{"probabilities": [...]}`.
    """
    req = urllib.request.Request(server.url + server.infer_path, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        doc = json.loads(r.read())
    if not server.computes:
        return
    data = doc["outputs"][0]["data"] if server.request == "v2" else doc["probabilities"]
    got = np.array(data, dtype=np.float32).reshape(expected.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    if not np.array_equal(got.argmax(axis=-1), expected.argmax(axis=-1)):
        raise AssertionError(f"{server.name}: argmax {got.argmax(axis=-1)} != {expected.argmax(axis=-1)}")


def raw_ort_floor(model: Path, seconds: float = 3.0, rows: int = 1, intra_op_threads: int = 0) -> float:
    """Runs per second of ONNX Runtime alone (`rows` rows per call), in this process: no HTTP, no JSON.

    `intra_op_threads` 0 is ONNX Runtime's default; 1 is how a server pinned to one CPU runs it.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((rows, 1000)).astype(np.float32)
    for _ in range(200):
        sess.run(None, {"input": x})
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(100):
            sess.run(None, {"input": x})
        n += 100
    return n / (time.perf_counter() - t0)


# --- report ------------------------------------------------------------------------------------


def render(points: list[Point], floor: float, meta: dict[str, Any], command: str, raw: list[Point] | None = None) -> str:
    def get(server: str, scenario: str, conns: int) -> Point | None:
        return next((p for p in points if p.server == server and p.scenario == scenario and p.connections == conns), None)

    lines = [SECTION, ""]
    lines.append(
        f"Measured {meta['date']} on {meta['cpus']} CPUs ({meta['cpu_model']}), loopback, wrk 1 thread, "
        f"{meta['seconds']:g} s per point after a 2 s warm-up, {meta['rounds']} rounds with the servers alternating; "
        "each number is the median round (latencies from that round). "
        + (
            "Server (and all its threads) pinned to CPU 0 and wrk to CPU 1 with taskset. "
            if meta["pinned"]
            else "No CPU pinning. "
        )
        + f"Load average before/after: {meta['load_before']} / {meta['load_after']}; 'others' below is CPU "
        "used by other processes during each point (the machine is shared with other engineers' tests)."
    )
    lines.append("")
    lines.append("Model: reference MLP 1000 -> 64 -> 64 -> 10 (onnx.helper, seed 0), ONNX Runtime CPU, same file for all.")
    lines.append("")
    lines.append("### V2 JSON, batch 1 (one row per request)")
    lines.append("")
    lines.append(
        "| server | req/s c=8 | p50 / p99 ms c=8 | server CPU c=8 (cores) | req/s per server core c=8 "
        "| req/s c=1 | p50 / p99 ms c=1 | others, max (cores) |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    for name, label in LABELS.items():
        scenario = "list-b1" if get(name, "list-b1", 8) else "json-b1"
        c8, c1 = get(name, scenario, 8), get(name, scenario, 1)
        if c8 is None:
            continue
        label += " (plain JSON list body, not V2)" if scenario == "list-b1" else ""
        c1s = f"{c1.rps:,.0f} | {c1.p50_ms:.2f} / {c1.p99_ms:.2f}" if c1 else "- | -"
        lines.append(
            f"| {label} | {c8.rps:,.0f} | {c8.p50_ms:.2f} / {c8.p99_ms:.2f} | {c8.server_cpu_cores:.2f} | "
            f"{c8.per_core:,.0f} | {c1s} | {c8.other_cpu_cores:.2f} |"
        )
    lines.append(f"| raw ONNX Runtime `run()` in-process, no HTTP (floor) | {floor:,.0f} runs/s | | | | | | |")
    lines.append("")
    kiln, kb = get("kiln", "json-b1", 8), get("kiln-batching", "json-b1", 8)
    mls, ks = get("mlserver", "json-b1", 8), get("kserve", "json-b1", 8)
    for who, k in (("batching off", kiln), ("dynamic batching on", kb)):
        if k is None:
            continue
        ratios = []
        if mls:
            ratios.append(
                f"Kiln / MLServer = **{k.rps / mls.rps:.1f}x** req/s, **{k.per_core / mls.per_core:.1f}x** per server core"
                " (target >= 5x)"
            )
        if ks:
            ratios.append(
                f"Kiln / KServe = **{k.rps / ks.rps:.1f}x** req/s, **{k.per_core / ks.per_core:.1f}x** per server core"
                " (target >= 8x)"
            )
        if ratios:
            lines.append(f"Batch-1 JSON at c=8, Kiln with {who}: " + "; ".join(ratios) + ".")
            lines.append("")
    if raw:
        rounds = sorted({p.extra.get("round", 0) for p in raw})
        lines.append("Per round, V2 JSON batch 1 at c=8 (req/s; the load from other processes changed between rounds):")
        lines.append("")
        lines.append("| round | Kiln | Kiln, batching | MLServer | KServe | Kiln / MLServer | Kiln / KServe | others, mean (cores) |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for r in rounds:
            def at(server: str, r: int = r) -> Point | None:
                return next(
                    (p for p in raw if p.extra.get("round") == r and p.server == server
                     and p.scenario == "json-b1" and p.connections == 8),
                    None,
                )

            k, kb, m, ks = at("kiln"), at("kiln-batching"), at("mlserver"), at("kserve")
            if not (k and m and ks):
                continue
            here = [p for p in raw if p.extra.get("round") == r]
            others = sum(p.other_cpu_cores for p in here) / len(here)
            lines.append(
                f"| {r} | {k.rps:,.0f} | {kb.rps if kb else 0:,.0f} | {m.rps:,.0f} | {ks.rps:,.0f} | "
                f"{k.rps / m.rps:.1f}x | {k.rps / ks.rps:.1f}x | {others:.2f} |"
            )
        lines.append("")
    lines.append("### Throughput features (Kiln)")
    lines.append("")
    lines.append("| scenario | req/s | rows/s | p50 / p99 ms | ratio |")
    lines.append("|---|---|---|---|---|")
    ub, b = get("kiln", "json-b1", 64), get("kiln-batching", "json-b1", 64)
    if ub and b:
        lines.append(
            f"| JSON batch 1, c=64, batching off | {ub.rps:,.0f} | {ub.rows_per_s:,.0f} | {ub.p50_ms:.2f} / {ub.p99_ms:.2f} | 1.0x |"
        )
        lines.append(
            f"| JSON batch 1, c=64, dynamic batching (64 rows, 2 ms) | {b.rps:,.0f} | {b.rows_per_s:,.0f} | "
            f"{b.p50_ms:.2f} / {b.p99_ms:.2f} | **{b.rows_per_s / ub.rows_per_s:.1f}x** (target >= 3x) |"
        )
    wu, wb = get("kiln-wide", "json-b1", 64), get("kiln-wide-batching", "json-b1", 64)
    if wu and wb:
        lines.append(
            f"| wide MLP (1000 -> {WIDE} -> {WIDE} -> 10), JSON batch 1, c=64, batching off | {wu.rps:,.0f} | "
            f"{wu.rows_per_s:,.0f} | {wu.p50_ms:.2f} / {wu.p99_ms:.2f} | 1.0x |"
        )
        lines.append(
            f"| wide MLP, JSON batch 1, c=64, dynamic batching (64 rows, 2 ms) | {wb.rps:,.0f} | {wb.rows_per_s:,.0f} | "
            f"{wb.p50_ms:.2f} / {wb.p99_ms:.2f} | **{wb.rows_per_s / wu.rows_per_s:.1f}x** |"
        )
    j64, bin64 = get("kiln", "json-b64", 8), get("kiln", "binary-b64", 8)
    if j64 and bin64:
        lines.append(f"| JSON batch 64, c=8 | {j64.rps:,.0f} | {j64.rows_per_s:,.0f} | {j64.p50_ms:.2f} / {j64.p99_ms:.2f} | 1.0x |")
        lines.append(
            f"| binary tensors batch 64, c=8 | {bin64.rps:,.0f} | {bin64.rows_per_s:,.0f} | "
            f"{bin64.p50_ms:.2f} / {bin64.p99_ms:.2f} | **{bin64.rows_per_s / j64.rows_per_s:.1f}x** (target >= 3x) |"
        )
    lines.append("")
    lines.append("Notes:")
    lines.append("")
    if ub and ub.server_cpu_cores > 0 and floor > 0:
        per_request_us = 1e6 * ub.server_cpu_cores / ub.rps
        ort_us = 1e6 / floor
        bound = per_request_us / max(per_request_us - ort_us, 1e-9)
        lines.append(
            f"- Dynamic batching cannot multiply throughput on the reference MLP, by Amdahl's law: unbatched at "
            f"c=64 the server spends {per_request_us:.0f} us of CPU per request, of which one ONNX Runtime call "
            f"is {ort_us:.0f} us (the raw floor above); the rest is reading, parsing and answering a 1000-float "
            f"JSON request, which batching cannot merge. Even free inference would give at most "
            f"{bound:.2f}x, so the 3x target is out of reach for any server that decodes JSON per request on this model; batching's own "
            "bookkeeping costs about what it saves. Where ONNX Runtime's compute dominates a request (the wide "
            "MLP), the same setting multiplies rows/s (row above). Batched results equal unbatched ones "
            "(tests/server/test_batching.py)."
        )
    lines.append(
        "- With batching on, the 2 ms window is skipped whenever every open connection already waits for "
        "inference (no further request can arrive), so c=8 batch-1 latency stays near the unbatched one."
    )
    lines.append(
        "- MLServer and KServe run their documented custom-runtime path (bench/server/mlserver_runtime.py, "
        "bench/server/kserve_model.py) in their own virtual environments, otherwise with defaults; "
        "MLServer with parallel_workers=0 (its fastest mode here)."
    )
    lines.append(
        "- 'req/s per server core' divides by the CPU time the server process actually got, which makes "
        "servers comparable when other processes took part of CPU 0 during a point."
    )
    busiest = max((p.other_cpu_cores for p in points), default=0.0)
    lines.append(
        f"- Other processes took up to {busiest:.2f} of the machine's 2 cores during these points; between "
        "rounds the same server still varies by up to 1.5x (MLServer most), hence the per-round table. Kiln hands "
        "every ONNX Runtime call to an inference thread (the event loop never blocks), which costs it more "
        "under CPU contention (each hand-off waits for the scheduler) than MLServer/KServe running ONNX "
        "Runtime inline; the per-core column removes most of that effect."
    )
    lines.append("")
    errors = sum(p.errors for p in points)
    lines.append(f"Errors (non-2xx or socket) over all points: {errors}.")
    lines.append("")
    lines.append("Reproduce:")
    lines.append("")
    lines.append("```sh")
    lines.append("apt-get install -y wrk            # Debian package")
    lines.append("bash bench/server/setup_envs.sh   # the peers' venvs: MLServer, KServe, PyTriton, BentoML, LitServe")
    lines.append(command)
    lines.append("```")
    lines.append("")
    lines.append("Raw numbers: `bench/results/server.json`.")
    lines.append("")
    return "\n".join(lines)


def render_peers(points: list[Point], raw: list[Point], meta: dict[str, Any], command: str) -> str:
    """The headline run: every server's batch-1 req/s at c=8, floors first, then Kiln, then the peers by req/s."""
    c8 = {p.server: p for p in points if p.connections == 8 and p.scenario in ("json-b1", "list-b1")}
    kiln = c8.get("kiln")
    order = [n for n in LABELS if n.startswith("floor-") or n.startswith("kiln")]
    order += sorted((n for n in c8 if n not in order), key=lambda n: -c8[n].rps)
    load = max(float(meta["load_before"].split()[0]), float(meta["load_after"].split()[0]))
    lines = [SECTION_PEERS, "", (
        f"Measured {meta['date']} on {meta['cpus']} CPUs ({meta['cpu_model']}), loopback, the reference MLP "
        f"(1000 -> 64 -> 64 -> 10, seed 0) through ONNX Runtime on CPU in every server, with "
        f"{meta['intra_op_threads']} intra-op thread(s) in each (Kiln's default on its CPUs). One request shape: one row "
        f"per request, wrk 1 thread, 8 connections, {meta['seconds']:g} s per point after a 2 s warm-up, "
        f"{meta['rounds']} rounds with the servers' order reversed every other round; each number is the server's median "
        "round. " + ("Server and all its processes pinned to CPU 0, wrk to CPU 1 (taskset). " if meta["pinned"] else "No pinning. ")
        + f"Load average before/after: {meta['load_before']} / {meta['load_after']}. One answer of every server was checked "
        "against ONNX Runtime in-process (same probabilities within 1e-5, same argmax) before it was timed."), "",
        "| server | request | req/s c=8 | rounds (req/s) | p50 / p99 ms | server CPU (cores) | req/s per server core "
        "| Kiln / server (req/s) | Kiln / server (per core) |",
        "|---|---|---|---|---|---|---|---|---|"]
    for name in order:
        p = c8.get(name)
        if p is None:
            continue
        rounds = ", ".join(f"{v:,}" for v in p.extra.get("rounds_rps", []))
        ratio = f"{kiln.rps / p.rps:.2f}x | {kiln.per_core / p.per_core:.2f}x" if kiln and p.rps and p.per_core else "- | -"
        lines.append(f"| {LABELS.get(name, name)} | {LIST_REQUEST if p.scenario == 'list-b1' else 'V2 JSON'} | {p.rps:,.0f} | "
                     f"{rounds} | {p.p50_ms:.2f} / {p.p99_ms:.2f} | {p.server_cpu_cores:.2f} | {p.per_core:,.0f} | {ratio} |")
    lines += ["", f"Errors (non-2xx or socket) over all points: {sum(p.errors for p in raw)}. Others' CPU during the points "
              f"(processes other than the server and wrk): up to {max((p.other_cpu_cores for p in raw), default=0):.2f} cores."]
    if meta.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in meta["skipped"].items()) + "."]
    lines += ["", "Notes:", ""] + [f"- {note}" for note in PEER_NOTES]
    lines += [f"- {remark}" for remark in meta.get("remarks", [])]  # hand-written, kept in the results file
    if meta.get("triton_mean_batch"):
        lines.append(f"- Triton's dynamic batcher merged {meta['triton_mean_batch']:.2f} requests per model execution on "
                     "average over the run (its metrics: nv_inference_count / nv_inference_exec_count; with 8 connections "
                     "at most 8 requests can wait at once).")
    if load > (meta["cpus"] or 1):
        lines += ["", (f"**Caveat: the machine was overloaded during this run** (load average up to {load:.1f} on {meta['cpus']} "
                       "CPUs, from other work on it): each server got only part of CPU 0, so absolute req/s are below what "
                       "these servers do on a quiet core and rounds vary; compare the ratios within this run and the per-core "
                       "column.")]
    lines += ["", "Reproduce:", "", "```sh", "apt-get install -y wrk", "bash bench/server/setup_envs.sh   # the peers' venvs under "
              "~/.cache/kiln/bench (PyTriton's from Debian's /usr/bin/python3.11)", command, "```", "",
              "Raw numbers: `bench/results/server_peers.json`.", ""]
    return "\n".join(lines)


def write_section(text: str, section: str = SECTION) -> None:
    """Replace (or append) only one section of docs/benchmarks.md: by default '## Model server'."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    current = DOC.read_text() if DOC.exists() else "# Benchmarks\n\n"
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(current):
        updated = pattern.sub(lambda _m: text + "\n", current, count=1)
    else:
        updated = current.rstrip("\n") + "\n\n" + text + "\n"
    DOC.write_text(updated.rstrip("\n") + "\n")


def quick(seconds: float, rounds: int, pin: bool) -> int:
    """Kiln alone, the headline request only: for before/after checks of a server change (no files written)."""
    if not shutil.which("wrk"):
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2
    pin = pin and (os.cpu_count() or 1) >= 2
    srv_cpus, wrk_cpus = ("0", "1") if pin else (None, None)
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    model = build_mlp(work / "mlp.onnx")
    x1, expected1 = reference_request(model)
    body1 = json_body(x1)
    jh = {"Content-Type": "application/json"}
    print(f"quick: Kiln alone, V2 JSON batch 1; pinned={pin}; load {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    server = start_kiln(model, work, srv_cpus)
    results: dict[int, list[Point]] = {8: [], 1: []}
    try:
        check_answer(server, body1, expected1)
        for rnd in range(rounds):
            print(f"round {rnd + 1}/{rounds}", flush=True)
            for conns in results:
                results[conns].append(run_wrk(server, body1, jh, conns, seconds, wrk_cpus, "json-b1", 1, work))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    for conns, pts in results.items():
        rps = sorted(p.rps for p in pts)
        per_core = sorted(p.rps / p.server_cpu_cores for p in pts if p.server_cpu_cores > 0)
        print(
            f"kiln json-b1 c={conns}: median {rps[len(rps) // 2]:,.0f} req/s (rounds {', '.join(f'{p.rps:,.0f}' for p in pts)}); "
            f"median per server core {per_core[len(per_core) // 2] if per_core else 0:,.0f}; "
            f"errors {sum(p.errors for p in pts)}",
            flush=True,
        )
    return 0


def load_points(path: Path) -> tuple[dict[str, Any], list[Point], list[Point]]:
    """A saved run: (the whole file, the median points, every round's points)."""
    saved = json.loads(path.read_text())
    names = set(Point.__dataclass_fields__)
    pts = [Point(**{k: v for k, v in p.items() if k in names}) for p in saved["points"]]
    per_round = len(pts) // max(1, int(saved["meta"].get("rounds", 1)))
    for i, p in enumerate(pts):
        p.extra.setdefault("round", i // per_round + 1)
    raw = copy_points(pts)
    return saved, median_points(pts), raw


def copy_points(points: list[Point]) -> list[Point]:
    """Copies that keep every round's own numbers (median_points annotates the median ones in place)."""
    out = [Point(**dict(p.__dict__.items())) for p in points]
    for a, b in zip(out, points, strict=True):
        a.extra = dict(b.extra)
    return out


SERVERS = "kiln,floor,mlserver,kserve,triton,bentoml,litserve"


def make_plan(x1: np.ndarray, x64: np.ndarray, headline: bool) -> Plan:
    """What each server is loaded with; `headline`: V2 JSON (or the plain list) batch 1 at c=8 only."""
    body1, body64, list1 = json_body(x1), json_body(x64), list_body(x1)
    bin64, bin64_head = binary_body(x64)
    jh = {"Content-Type": "application/json"}
    bh = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(bin64_head)}
    b1 = [("json-b1", body1, jh, 8, 1), ("json-b1", body1, jh, 1, 1)]
    lb1 = [("list-b1", list1, jh, 8, 1), ("list-b1", list1, jh, 1, 1)]
    plan: Plan = {
        "kiln": [*b1, ("json-b1", body1, jh, 64, 1), ("json-b64", body64, jh, 8, 64), ("binary-b64", bin64, bh, 8, 64)],
        "kiln-batching": [("json-b1", body1, jh, 64, 1), ("json-b1", body1, jh, 8, 1)],
        "kiln-wide": [("json-b1", body1, jh, 64, 1)],
        "kiln-wide-batching": [("json-b1", body1, jh, 64, 1)],
        **{f"floor-{level}": b1 for level in ("http", "parse", "infer")},
        "mlserver": b1, "kserve": b1, "triton": b1, "bentoml": lb1, "litserve": lb1,
    }
    if headline:
        plan = {name: [e for e in entries if e[3] == 8 and e[0] in ("json-b1", "list-b1")] for name, entries in plan.items()
                if "wide" not in name}
    return plan


def starters(model: Path, wide: Path, work: Path, cpus: str | None) -> dict[str, Any]:
    """Server label -> a function starting it (the order of the first round)."""
    batching = ("--max-batch-size", "64", "--max-latency-ms", "2")
    return {
        "kiln": lambda: start_kiln(model, work, cpus),
        "kiln-batching": lambda: start_kiln(model, work, cpus, *batching, label="kiln-batching"),
        "kiln-wide": lambda: start_kiln(wide, work, cpus, label="kiln-wide", name="wide"),
        "kiln-wide-batching": lambda: start_kiln(wide, work, cpus, *batching, label="kiln-wide-batching", name="wide"),
        **{f"floor-{level}": (lambda level=level: start_floor(level, model, work, cpus)) for level in ("http", "parse", "infer")},
        "mlserver": lambda: start_mlserver(model, work, cpus),
        "kserve": lambda: start_kserve(model, work, cpus),
        "triton": lambda: start_triton(model, work, cpus),
        "bentoml": lambda: start_bentoml(model, work, cpus),
        "litserve": lambda: start_litserve(model, work, cpus),
    }


def measure(plan: Plan, start: dict[str, Any], checks: dict[str, tuple[bytes, np.ndarray]], rounds: int, seconds: float,
            wrk_cpus: str | None, work: Path, meta: dict[str, Any]) -> list[Point]:
    """Start every planned server, check one answer of each, then `rounds` rounds in alternating order.

    A server that cannot start (no venv, not ready in time) is skipped and said so in meta['skipped'];
    one that answers wrongly stops the run.
    """
    servers: dict[str, Server] = {}
    points: list[Point] = []
    meta.setdefault("skipped", {})
    try:
        for name in plan:
            try:
                servers[name] = start[name]()
            except (FileNotFoundError, RuntimeError) as exc:
                meta["skipped"][name] = str(exc)
                print(f"  {name}: skipped ({exc})", flush=True)
                continue
            body, expected = checks["wide" if "wide" in name else servers[name].request]
            check_answer(servers[name], body, expected)
            print(f"  {name}: answer checked", flush=True)
        points = wrk_rounds(servers, plan, rounds, seconds, wrk_cpus, work)
        if "triton" in servers:
            meta["triton_mean_batch"] = round(triton_mean_batch(servers["triton"]), 2)
    finally:
        for server in servers.values():
            server.stop()
    return points


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="duration of each measured point")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the servers' order alternates between rounds")
    ap.add_argument("--only", default=SERVERS, help="servers to run, comma-separated (kiln also selects kiln-batching, ...)")
    ap.add_argument("--headline", action="store_true",
                    help=f"batch 1 at c=8 only, every server: writes the '{SECTION_PEERS}' section and server_peers.json")
    ap.add_argument("--no-pin", action="store_true", help="do not pin server and wrk to separate CPUs")
    ap.add_argument("--no-doc", action="store_true", help="print only; do not touch docs/benchmarks.md")
    ap.add_argument("--render-only", action="store_true", help="re-render the section from the saved raw numbers")
    ap.add_argument(
        "--quick", action="store_true",
        help="Kiln alone (batching off), V2 JSON batch 1 at c=8 and c=1, --rounds rounds of --seconds; "
        "prints req/s per round and the median, writes neither docs nor results (needs no other envs)",
    )
    args = ap.parse_args()
    if args.quick:
        return quick(args.seconds, args.rounds, not args.no_pin)
    out = RESULTS / ("server_peers.json" if args.headline else "server.json")
    if args.render_only:
        saved, pts, raw = load_points(out)
        meta = saved["meta"]
        cmd = meta.get("command", ".venv/bin/python bench/server/run.py")
        text = render_peers(pts, raw, meta, cmd) if args.headline else render(pts, saved["raw_ort_runs_per_s"], meta, cmd, raw)
        print(text)
        if not args.no_doc:
            write_section(text, SECTION_PEERS if args.headline else SECTION)
        return 0
    if not shutil.which("wrk"):
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2
    return bench(args, out)


def bench(args: argparse.Namespace, out: Path) -> int:
    """Measure, save the raw numbers to `out`, render and write the section."""
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    srv_cpus, wrk_cpus = ("0", "1") if pin else (None, None)
    only = set(args.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    model = build_mlp(work / "mlp.onnx")
    wide = build_mlp(work / "wide.onnx", seed=1, hidden=WIDE)
    x1, expected1 = reference_request(model)
    _, wide_expected1 = reference_request(wide)
    x64 = np.random.default_rng(8).standard_normal((64, 1000)).astype(np.float32)
    checks = {"v2": (json_body(x1), expected1), "list": (list_body(x1), expected1), "wide": (json_body(x1), wide_expected1)}
    cpu_model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
        "unknown CPU",
    )
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(), "cpu_model": cpu_model,
        "seconds": args.seconds, "rounds": args.rounds, "pinned": pin, "intra_op_threads": intra_op_threads(srv_cpus),
        "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    print(f"work dir {work}; pinned={pin}; load {meta['load_before']}", flush=True)
    floor = raw_ort_floor(model, intra_op_threads=intra_op_threads(srv_cpus))
    print(f"  raw ORT floor: {floor:,.0f} runs/s (batch 1, in-process)", flush=True)
    plan = {name: e for name, e in make_plan(x1, x64, args.headline).items() if name.split("-")[0] in only}
    points = measure(plan, starters(model, wide, work, srv_cpus), checks, args.rounds, args.seconds, wrk_cpus, work, meta)
    meta["load_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    command = ".venv/bin/python bench/server/run.py" + (" --headline" if args.headline else "")
    command += f" --seconds {args.seconds:g}" if args.seconds != 10 else ""
    command += f" --rounds {args.rounds}" if args.rounds != 3 else ""
    command += f" --only {args.only}" if args.only != SERVERS else ""
    meta["command"] = command
    raw = copy_points(points)
    summary = median_points(points)
    text = render_peers(summary, raw, meta, command) if args.headline else render(summary, floor, meta, command, raw)
    print()
    print(text)
    RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "raw_ort_runs_per_s": floor,
                               "points": [p.__dict__ | {"rows_per_s": p.rows_per_s} for p in raw]}, indent=2) + "\n")
    if not args.no_doc:
        section = SECTION_PEERS if args.headline else SECTION
        write_section(text, section)
        print(f"updated {DOC.relative_to(ROOT)} section '{section}'")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
