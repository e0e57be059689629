"""`kiln run FILE`: the cluster-free mode. Does on this machine what the operator does in a cluster.

TrainingJobs in FILE are trained with the same trainer the training pods run; ModelDeployments (and
TrainingJobs with `spec.deploy`) are served with the same server the Deployments run, on 127.0.0.1.
Same manifests, same schema, same code: only the scheduler is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from kiln.manifests import Manifest, load_file
from kiln.schema import ManifestError


class LocalError(RuntimeError):
    """A user-facing failure of the local run (printed without a traceback)."""


@dataclass
class Trained:
    name: str
    manifest: Manifest
    doc: dict[str, Any]
    result: dict[str, Any]
    output: Path


@dataclass
class Served:
    name: str
    model_path: Path
    url: str
    process: subprocess.Popen[bytes]
    trained: Trained | None = None
    log: Path = field(default_factory=Path)


class ProgressBar:
    """A one-line bar on a terminal; plain lines (one per epoch) anywhere else, e.g. in CI logs."""

    def __init__(self, name: str, stream: TextIO) -> None:
        self.name = name
        self.stream = stream
        self.tty = stream.isatty()

    def __call__(self, p: Any) -> None:
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(p.metrics.items()) if k in ("loss", "accuracy", "val_loss", "val_accuracy"))
        if self.tty:
            width = 30
            done = int(width * p.percent / 100)
            self.stream.write(f"\r  {self.name} [{'#' * done}{'.' * (width - done)}] {p.epoch}/{p.epochs} {metrics}\033[K")
            if p.epoch >= p.epochs:
                self.stream.write("\n")
            self.stream.flush()
        # Elsewhere the trainer's own line per epoch is the progress report.

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _local_path(uri: str, base: Path) -> Path:
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise LocalError(f"{uri!r} is not a local path; the local mode reads file:// and plain paths")
    path = Path(uri)
    return path if path.is_absolute() else (base / path)


def output_dir(m: Manifest, override: str | None) -> Path:
    """Where a TrainingJob's outputs go locally: --output/NAME, else spec.output.uri, else ./kiln-output/NAME."""
    if override:
        return Path(override) / m.name
    uri = ((m.doc.get("spec") or {}).get("output") or {}).get("uri")
    if uri and ("://" not in uri or uri.startswith("file://")):
        return _local_path(uri, m.base_dir)
    return Path.cwd() / "kiln-output" / m.name


def train(m: Manifest, out: Path, stream: TextIO) -> Trained:
    """Train one TrainingJob in this process with the built-in trainer."""
    doc = json.loads(json.dumps(m.doc))
    spec = doc["spec"]
    if spec.get("command"):
        raise LocalError(f"{m.source}: TrainingJob/{m.name}: spec.command (bring your own code) runs only in a cluster")
    training = spec.setdefault("training", {})
    # A fixed seed makes the held-out split reproducible, so --once can check the served model on it.
    training.setdefault("seed", 0)
    from kiln_trainer.api import train_doc

    stream.write(f"training {m.name} ({training.get('epochs', 10)} epochs) -> {out}\n")
    bar = ProgressBar(m.name, stream)
    if bar.tty:  # the bar replaces the trainer's per-epoch log lines
        logging.getLogger("kiln_trainer.progress").setLevel(logging.WARNING)
    result = train_doc(doc, m.base_dir, output=str(out), progress=bar)
    metrics = result.get("metrics") or {}
    shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if isinstance(v, (int, float)))
    stream.write(f"trained {m.name}: {shown}\n  model: {result.get('modelUri')} (parity max abs diff "
                 f"{result.get('parityMaxAbsDiff')})\n")
    return Trained(m.name, m, doc, result, out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(name: str, model: Path, port: int, spec: dict[str, Any], log: Path, timeout: float = 120) -> Served:
    """Start `kiln serve` on 127.0.0.1 and wait until the model is ready."""
    argv = [sys.executable, "-m", "kiln.cli", "serve", "--model", str(model), "--name", name,
            "--host", "127.0.0.1", "--port", str(port)]
    batching = spec.get("batching") or {}
    if batching:
        argv += ["--max-batch-size", str(batching.get("maxBatchSize", 32)), "--max-latency-ms", str(batching.get("maxLatencyMs", 5))]
    with open(log, "ab") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=f, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LocalError(f"the model server for {name} exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/v2/models/{name}/ready", timeout=2) as r:
                if r.status == 200:
                    return Served(name, model, url, proc, log=log)
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    proc.kill()
    raise LocalError(f"the model server for {name} was not ready after {timeout:.0f}s; see {log}")


def infer(url: str, name: str, rows: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """One V2 JSON request; returns the first output as an array."""
    inp = meta["inputs"][0]
    body = {"inputs": [{"name": inp["name"], "shape": list(rows.shape), "datatype": inp["datatype"],
                        "data": rows.reshape(-1).tolist()}]}
    req = urllib.request.Request(f"{url}/v2/models/{name}/infer", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        out = json.loads(r.read())["outputs"][0]
    return np.asarray(out["data"], dtype="float64").reshape(out["shape"])


def heldout(t: Trained) -> tuple[np.ndarray, np.ndarray]:
    """The rows the trainer held out, reproduced with the trainer's own loader and split."""
    from kiln_trainer import data
    from kiln_trainer.trainer import split_indices

    spec = t.doc["spec"]
    path = _local_path(spec["dataset"]["uri"], t.manifest.base_dir)
    ds = data.load(path, str(path), spec)
    _, va = split_indices(len(ds.x), float(spec["dataset"].get("validationSplit", 0.2)), int(spec["training"]["seed"]))
    return ds.x[va], ds.y[va]


def check(s: Served, stream: TextIO, limit: int = 512) -> float:
    """Send held-out rows through the served model and measure what it gets right."""
    assert s.trained is not None
    x, y = heldout(s.trained)
    x, y = x[:limit], y[:limit]
    with urllib.request.urlopen(f"{s.url}/v2/models/{s.name}", timeout=10) as r:
        meta = json.loads(r.read())
    pred = np.concatenate([infer(s.url, s.name, x[i:i + 64].astype("float32"), meta) for i in range(0, len(x), 64)])
    loss = s.trained.doc["spec"].get("training", {}).get("loss", "sparse_categorical_crossentropy")
    if loss in ("sparse_categorical_crossentropy", "categorical_crossentropy"):
        labels = y if y.ndim == 1 else y.argmax(axis=1)
        score = float((pred.argmax(axis=1) == labels).mean())
        stream.write(f"served model {s.name}: accuracy {score:.4f} on {len(x)} held-out rows sent over HTTP (V2)\n")
    elif loss == "binary_crossentropy":
        score = float(((pred.reshape(-1) > 0.5) == (y.reshape(-1) > 0.5)).mean())
        stream.write(f"served model {s.name}: accuracy {score:.4f} on {len(x)} held-out rows sent over HTTP (V2)\n")
    else:
        score = float(np.abs(pred.reshape(len(x), -1) - y.reshape(len(x), -1)).mean())
        stream.write(f"served model {s.name}: mean absolute error {score:.4f} on {len(x)} held-out rows\n")
    return score


def curl_example(s: Served) -> str:
    """A ready-to-paste request with a real row of the model's input shape."""
    shape = [1]
    inp = {"name": "input", "datatype": "FP32"}
    try:
        with urllib.request.urlopen(f"{s.url}/v2/models/{s.name}", timeout=10) as r:
            meta = json.loads(r.read())
        inp = meta["inputs"][0]
        shape = [1 if d == -1 else int(d) for d in inp["shape"]]
    except (urllib.error.URLError, OSError, KeyError, ValueError):
        pass
    if s.trained is not None:
        row = heldout(s.trained)[0][:1].reshape(-1).tolist()
    else:
        row = [0.0] * int(np.prod(shape))
    body = json.dumps({"inputs": [{"name": inp["name"], "shape": shape, "datatype": inp["datatype"], "data": row}]})
    return f"curl -s {s.url}/v2/models/{s.name}/infer -H 'Content-Type: application/json' -d '{body}'"


def run(path: str, *, once: bool, port: int | None, output: str | None, stream: TextIO = sys.stdout,
        min_score: float | None = None) -> int:
    manifests = load_file(path)
    workdir = Path(output or (Path.cwd() / "kiln-output"))
    workdir.mkdir(parents=True, exist_ok=True)
    trained: dict[str, Trained] = {}
    for m in manifests:
        if m.kind == "TrainingJob":
            trained[m.name] = train(m, output_dir(m, output), stream)
    wanted: list[tuple[str, dict[str, Any], Trained | None, Path]] = []
    for m in manifests:
        if m.kind == "ModelDeployment":
            spec = m.doc["spec"]
            name = spec.get("modelName") or m.name
            ref = spec["model"]
            if ref.get("trainingJob"):
                t = trained.get(ref["trainingJob"])
                if t is None:
                    raise LocalError(f"{path}: ModelDeployment/{m.name}: spec.model.trainingJob {ref['trainingJob']!r} "
                                     f"is not a TrainingJob in this file")
                wanted.append((name, spec, t, _model_file(t, ref.get("format", "onnx"))))
            else:
                wanted.append((name, spec, None, _local_path(ref["uri"], m.base_dir)))
    for t in trained.values():
        deploy = t.doc["spec"].get("deploy")
        if deploy is not None and not any(w[2] is t for w in wanted):
            wanted.append((deploy.get("modelName") or deploy.get("name") or t.name, deploy, t,
                           _model_file(t, (deploy.get("model") or {}).get("format", "onnx"))))
    if not wanted:
        stream.write("nothing to serve (no ModelDeployment and no spec.deploy in the file)\n")
        return 0
    servers: list[Served] = []
    code = 0
    try:
        for i, (name, spec, t, model) in enumerate(wanted):
            p = port + i if port else free_port()
            s = serve(name, model, p, spec, workdir / f"{name}-server.log")
            s.trained = t
            servers.append(s)
            stream.write(f"serving {name} at {s.url}/v2/models/{name} (V2; V1 at {s.url}/v1/models/{name})\n")
            stream.write(f"  try: {curl_example(s)}\n")
        if once:
            for s in servers:
                if s.trained is None:
                    continue
                score = check(s, stream)
                if min_score is not None and score < min_score:
                    stream.write(f"served model {s.name}: {score:.4f} is below --min-accuracy {min_score}\n")
                    code = 1
            return code
        stream.write("press Ctrl-C to stop\n")
        stream.flush()
        with contextlib.suppress(KeyboardInterrupt):
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    finally:
        for s in servers:
            if s.process.poll() is None:
                s.process.send_signal(signal.SIGTERM)
                try:
                    s.process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    s.process.kill()


def _model_file(t: Trained, fmt: str) -> Path:
    if fmt == "onnx":
        uri = t.result.get("modelUri") or ""
    else:
        entry = next((f for f in t.result.get("formats") or [] if f.get("format") == fmt), None)
        if entry is None:
            raise LocalError(f"TrainingJob/{t.name} produced no {fmt!r} model: add it to spec.output.formats")
        uri = entry.get("uri") or ""
    return _local_path(uri, t.manifest.base_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kiln run", description="Train and serve the manifests in FILE on this machine, no cluster.")
    p.add_argument("file", help="YAML with TrainingJob and ModelDeployment documents")
    p.add_argument("--once", action="store_true", help="check the served model on held-out rows, then exit")
    p.add_argument("--port", type=int, help="first server port (default: free ports)")
    p.add_argument("--output", help="folder for outputs and logs (default ./kiln-output)")
    p.add_argument("--min-accuracy", type=float, help="with --once: exit 1 when the served accuracy is lower")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return run(args.file, once=args.once, port=args.port, output=args.output, min_score=args.min_accuracy)
    except (ManifestError, LocalError) as exc:
        print(f"kiln run: {exc}", file=sys.stderr)
        return 2
