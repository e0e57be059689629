"""`kiln run FILE`: the cluster-free mode. Does on this machine what the operator does in a cluster.

TrainingJobs in FILE are trained with the same trainer the training pods run; ModelDeployments (and
TrainingJobs with `spec.deploy`) are served with the same server the Deployments run, on 127.0.0.1,
with the same `kiln serve` arguments (kiln.serverargs). Same manifests, same schema, same code: only
the scheduler is missing.

The cluster's manifests run as they are: `pvc://CLAIM/PATH` is the folder `<--pvc-root>/CLAIM/PATH`,
documents of other API groups (PersistentVolumeClaims, ...) are skipped, and the fields only a cluster
acts on (resources, scheduling, replicas, ...) are named in one warning line.
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
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from kiln import DEFAULT_OUTPUT_DIR, objectstore
from kiln.labels import selector_matches
from kiln.manifests import Manifest, load_file
from kiln.schema import ManifestError
from kiln.serverargs import serve_args
from kiln.spec import ModelDeploymentSpec, ServingSpec, TrainingJobSpec

LOCAL_FIELDS = {
    "TrainingJob": {"dataset", "model", "training", "tuning", "output", "deploy", "command", "storage"},
    "ModelDeployment": {"model", "modelName", "batching", "limits", "startupTimeoutSeconds", "workers", "storage"},
}
"""The spec fields `kiln run` acts on (TrainingJob `command` is refused); any other field the user set is named."""
LOCAL_DEPLOY_FIELDS = {"model", "modelName", "name", "batching", "limits", "startupTimeoutSeconds", "workers", "storage"}
"""The same for a TrainingJob's `spec.deploy`."""
REMOTE_MODEL_SCHEMES = ("http://", "https://", "s3://")
"""Model URIs `kiln serve` downloads itself (into the run's folder)."""


class LocalError(RuntimeError):
    """A user-facing failure of the local run (printed without a traceback; `code` is the exit status)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Trained:
    name: str
    manifest: Manifest
    doc: dict[str, Any]
    result: dict[str, Any]
    output: Path | str
    pvc_root: Path


@dataclass
class Served:
    name: str
    model: str
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


def _local_path(uri: str, base: Path, pvc_root: Path) -> Path:
    """The local path of a file://, pvc:// or plain URI (pvc://CLAIM/PATH is PVC_ROOT/CLAIM/PATH)."""
    if uri.startswith("pvc://"):
        claim, _, rest = uri[len("pvc://"):].partition("/")
        if not claim or ".." in rest.split("/"):
            raise LocalError(f"{uri!r}: expected pvc://CLAIM/PATH inside the claim")
        return pvc_root / claim / rest
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise LocalError(f"{uri!r} is not a local path; the local mode reads file://, pvc:// and plain paths")
    path = Path(uri)
    return path if path.is_absolute() else (base / path)


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith(("file://", "pvc://"))


def output_dir(m: Manifest, override: str | None, pvc_root: Path) -> Path | str:
    """Where a TrainingJob's outputs go locally: --output/NAME, else spec.output.uri (file, path, pvc://
    or s3://, written to the store as in a cluster), else ./kiln-output/NAME (kiln.DEFAULT_OUTPUT_DIR)."""
    if override:
        return Path(override) / m.name
    uri = TrainingJobSpec.from_dict(m.doc.get("spec")).output.uri
    if uri and uri.startswith("s3://"):
        return str(uri)
    if uri and _is_local(uri):
        return _local_path(uri, m.base_dir, pvc_root)
    return Path.cwd() / DEFAULT_OUTPUT_DIR / m.name


def cluster_only(manifests: list[Manifest], outputs: dict[str, Path | str]) -> list[str]:
    """`Kind/name spec.field, ...` for every field set in a document that only a cluster acts on."""
    out = []
    for m in manifests:
        spec = m.raw.get("spec") or {}
        fields = [f"spec.{k}" for k in spec if k not in LOCAL_FIELDS[m.kind]]
        if m.kind == "TrainingJob":
            fields += [f"spec.deploy.{k}" for k in spec.get("deploy") or {} if k not in LOCAL_DEPLOY_FIELDS]
            uri = (spec.get("output") or {}).get("uri")
            if uri and not _is_local(uri) and m.name in outputs and outputs[m.name] != uri:
                fields.append(f"spec.output.uri (written to {outputs[m.name]})")
            if int((spec.get("tuning") or {}).get("parallelism") or 1) > 1:
                fields.append("spec.tuning.parallelism (the trials run one after another)")
        if (spec.get("storage") or {}).get("secretName"):
            fields.append("spec.storage.secretName (this shell's AWS_* variables are used)")
        if fields:
            out.append(f"{m.kind}/{m.name} {', '.join(fields)}")
    return out


@contextlib.contextmanager
def _pvc_root_env(pvc_root: Path) -> Iterator[None]:
    """The trainer resolves pvc:// under $KILN_PVC_ROOT (the pod's mount root in a cluster)."""
    old = os.environ.get("KILN_PVC_ROOT")
    os.environ["KILN_PVC_ROOT"] = str(pvc_root)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("KILN_PVC_ROOT", None)
        else:
            os.environ["KILN_PVC_ROOT"] = old


@contextlib.contextmanager
def _env_vars(values: dict[str, str]) -> Iterator[None]:
    """Set `values` in os.environ for the in-process trainer, then restore what was there."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def train(m: Manifest, out: Path | str, stream: TextIO, pvc_root: Path) -> Trained:
    """Train one TrainingJob in this process with the built-in trainer."""
    doc = json.loads(json.dumps(m.doc))
    spec = doc["spec"]
    where = f"{m.source}: TrainingJob/{m.name}"
    if spec.get("command"):
        raise LocalError(f"{where}: spec.command (bring your own code) runs only in a cluster")
    data_uri = (spec.get("dataset") or {}).get("uri") or ""
    if data_uri.startswith("pvc://"):
        path = _local_path(data_uri, m.base_dir, pvc_root)
        if not path.exists():
            raise LocalError(f"{where}: spec.dataset.uri: {data_uri} is {path} on this machine, which does not exist "
                             f"(copy the data there, or point --pvc-root at the folder holding {data_uri[6:].split('/')[0]}/)")
    training = spec.setdefault("training", {})
    # A fixed seed makes the held-out split reproducible, so --once can check the served model on it.
    training.setdefault("seed", 0)
    from kiln_trainer.api import train_doc

    stream.write(f"training {m.name} ({TrainingJobSpec.from_dict(spec).training.epochs} epochs) -> {out}\n")
    bar = ProgressBar(m.name, stream)
    if bar.tty:  # the bar replaces the trainer's per-epoch log lines
        logging.getLogger("kiln_trainer.progress").setLevel(logging.WARNING)
    from kiln_trainer.errors import TrainerError

    try:
        with _pvc_root_env(pvc_root), _env_vars(objectstore.storage_env(TrainingJobSpec.from_dict(spec).storage)):
            result = train_doc(doc, m.base_dir, output=str(out), progress=bar)
    except TrainerError as exc:
        raise LocalError(f"{where}: {exc}", code=exc.exit_code) from exc
    metrics = result.get("metrics") or {}
    shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if isinstance(v, (int, float)))
    stream.write(f"trained {m.name}: {shown}\n  model: {result.get('modelUri')} (parity max abs diff "
                 f"{result.get('parityMaxAbsDiff')})\n")
    return Trained(m.name, m, doc, result, out, pvc_root)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command(name: str, model: str, port: int, spec: ServingSpec, sha256: str, cache_dir: Path) -> list[str]:
    """`kiln serve` for one ModelDeployment spec on 127.0.0.1: the operator's arguments (kiln.serverargs)."""
    argv = [sys.executable, "-m", "kiln.cli", "serve",
            *serve_args(spec, model=model, name=name, host="127.0.0.1", port=port, sha256=sha256)]
    if model.startswith(REMOTE_MODEL_SCHEMES):
        argv += ["--cache-dir", str(cache_dir)]
    return argv


def serve(name: str, model: str, port: int, spec: ServingSpec, log: Path, sha256: str = "", timeout: float = 120) -> Served:
    """Start `kiln serve` on 127.0.0.1 and wait until the model is ready."""
    argv = server_command(name, model, port, spec, sha256, log.parent / "models")
    env = {**os.environ, **objectstore.storage_env(spec.storage)}
    with open(log, "ab") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=f, stdin=subprocess.DEVNULL, env=env)
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
    """The rows the trainer held out of a local run."""
    spec = t.doc["spec"]
    uri = spec["dataset"]["uri"]
    if uri.startswith("s3://"):  # the trainer's own download (one object or a prefix of parts)
        from kiln_trainer import storage

        with _env_vars(objectstore.storage_env(TrainingJobSpec.from_dict(spec).storage)):
            return heldout_rows(spec, storage.fetch(storage.resolve(uri, t.manifest.base_dir, "spec.dataset.uri"), "spec.dataset.uri"))
    return heldout_rows(spec, _local_path(uri, t.manifest.base_dir, t.pvc_root))


def heldout_rows(spec: dict[str, Any], path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The rows a TrainingJob with `spec` held out of the dataset at `path`, reproduced with the trainer's
    own loader and split (the e2e tier checks a model served in a cluster with them too)."""
    from kiln_trainer import data
    from kiln_trainer.trainer import split_indices

    typed = TrainingJobSpec.from_dict(spec)
    if typed.dataset is None or typed.training.seed is None:
        raise LocalError("held-out rows need spec.dataset and spec.training.seed")
    ds = data.load(path, str(path), typed)
    _, va = split_indices(len(ds.x), typed.dataset.validation_split, typed.training.seed)
    return ds.x[va], ds.y[va]


def check(s: Served, stream: TextIO, limit: int = 512) -> float:
    """Send held-out rows through the served model and measure what it gets right."""
    assert s.trained is not None
    x, y = heldout(s.trained)
    x, y = x[:limit], y[:limit]
    with urllib.request.urlopen(f"{s.url}/v2/models/{s.name}", timeout=10) as r:
        meta = json.loads(r.read())
    pred = np.concatenate([infer(s.url, s.name, x[i:i + 64].astype("float32"), meta) for i in range(0, len(x), 64)])
    loss = TrainingJobSpec.from_dict(s.trained.doc["spec"]).training.loss
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


@dataclass
class Wanted:
    """A model server to start: for a ModelDeployment, or for a TrainingJob's `spec.deploy`."""

    name: str
    spec: ServingSpec
    trained: Trained | None
    model: str
    sha256: str
    timeout: float


def _startup_timeout(raw_spec: dict[str, Any]) -> float:
    """`startupTimeoutSeconds` when the user set it (the CRD default, 600 s, is for a pod's image pull too)."""
    return float(raw_spec.get("startupTimeoutSeconds") or 120)


def _wanted(path: str, manifests: list[Manifest], trained: dict[str, Trained], root: Path) -> list[Wanted]:
    """The servers to start: one per ModelDeployment, and one per trained `spec.deploy` not already served."""
    wanted: list[Wanted] = []
    for m in manifests:
        if m.kind != "ModelDeployment":
            continue
        spec = ModelDeploymentSpec.from_dict(m.doc["spec"])
        name, ref, where = spec.model_name or m.name, spec.model, f"{path}: ModelDeployment/{m.name}"
        timeout = _startup_timeout(m.raw.get("spec") or {})
        if ref.training_job_selector is not None:
            # The newest match is the last one in the file (they train in file order).
            matching = [t for t in trained.values()
                        if selector_matches(ref.training_job_selector.to_dict(), (t.manifest.raw.get("metadata") or {}).get("labels"))]
            if not matching:
                raise LocalError(f"{where}: spec.model.trainingJobSelector matches no TrainingJob in this file")
            wanted.append(Wanted(name, spec, matching[-1], *_model_file(matching[-1], ref.format), timeout))
        elif ref.training_job:
            t = trained.get(ref.training_job)
            if t is None:
                raise LocalError(f"{where}: spec.model.trainingJob {ref.training_job!r} is not a TrainingJob in this file")
            wanted.append(Wanted(name, spec, t, *_model_file(t, ref.format), timeout))
        elif (ref.uri or "").startswith("gs://"):
            raise LocalError(f"{where}: spec.model.uri: {objectstore.GS_REFUSED}")
        elif (ref.uri or "").startswith(REMOTE_MODEL_SCHEMES):
            wanted.append(Wanted(name, spec, None, ref.uri or "", ref.sha256 or "", timeout))
        else:
            try:
                model = _local_path(ref.uri or "", m.base_dir, root)
            except LocalError as exc:
                raise LocalError(f"{where}: spec.model.uri: {exc}") from exc
            wanted.append(Wanted(name, spec, None, str(model), ref.sha256 or "", timeout))
    for t in trained.values():
        deploy = TrainingJobSpec.from_dict(t.doc["spec"]).deploy
        if deploy is not None and not any(w.trained is t for w in wanted):
            raw_deploy = (t.manifest.raw.get("spec") or {}).get("deploy") or {}
            wanted.append(Wanted(deploy.model_name or deploy.name or t.name, deploy, t,
                                 *_model_file(t, deploy.model.format), _startup_timeout(raw_deploy)))
    return wanted


def run(path: str, *, once: bool, port: int | None, output: str | None, stream: TextIO = sys.stdout,
        min_score: float | None = None, pvc_root: str | None = None, warn: TextIO | None = None) -> int:
    foreign: list[str] = []
    manifests = load_file(path, foreign=foreign)
    workdir = Path(output or (Path.cwd() / DEFAULT_OUTPUT_DIR))
    workdir.mkdir(parents=True, exist_ok=True)
    root = Path(pvc_root or (Path.cwd() / "pvc")).resolve()
    outputs = {m.name: output_dir(m, output, root) for m in manifests if m.kind == "TrainingJob"}
    ignored = cluster_only(manifests, outputs) + [f"{d} (not a Kiln kind)" for d in foreign]
    if ignored:
        warn = warn or sys.stderr
        warn.write(f"kiln run: warning: cluster-only, ignored here: {'; '.join(ignored)}\n")
        warn.flush()
    trained: dict[str, Trained] = {}
    for m in manifests:
        if m.kind == "TrainingJob":
            trained[m.name] = train(m, outputs[m.name], stream, root)
    wanted = _wanted(path, manifests, trained, root)
    if not wanted:
        stream.write("nothing to serve (no ModelDeployment and no spec.deploy in the file)\n")
        return 0
    servers: list[Served] = []
    code = 0
    try:
        for i, w in enumerate(wanted):
            p = port + i if port else free_port()
            s = serve(w.name, w.model, p, w.spec, workdir / f"{w.name}-server.log", sha256=w.sha256, timeout=w.timeout)
            s.trained = w.trained
            servers.append(s)
            stream.write(f"serving {w.name} at {s.url}/v2/models/{w.name} (V2; V1 at {s.url}/v1/models/{w.name})\n")
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
        # Handlers that set an Event, not sigwait: a signal delivered in the instant before sigwait (the C handler
        # takes it, the Python one has not run yet) was lost and kiln run waited forever (seen in CI). Python runs
        # a pending handler at its next check, and it is ours once installed, so no stop can be lost.
        stop = threading.Event()
        handlers = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            stream.write("press Ctrl-C to stop\n")
            stream.flush()
            while not stop.wait(0.5):  # the timeout lets the main thread run a pending handler promptly
                pass
        finally:
            for sig, old in handlers.items():
                signal.signal(sig, old)
        return 0
    except KeyboardInterrupt:
        # Ctrl-C while the servers were still starting (or being tried): a stop like any other, no traceback.
        return 130 if once else 0
    finally:
        for s in servers:
            if s.process.poll() is None:
                s.process.send_signal(signal.SIGTERM)
                try:
                    s.process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    s.process.kill()


def _model_file(t: Trained, fmt: str) -> tuple[str, str]:
    """(local path, sha256) of the model a TrainingJob produced in format `fmt` (as the operator resolves it)."""
    if fmt == "onnx":
        uri, sha = t.result.get("modelUri") or "", t.result.get("onnxSha256") or ""
    else:
        entry = next((f for f in t.result.get("formats") or [] if f.get("format") == fmt), None)
        if entry is None:
            raise LocalError(f"TrainingJob/{t.name} produced no {fmt!r} model: add it to spec.output.formats")
        uri, sha = entry.get("uri") or "", entry.get("sha256") or ""
    if uri.startswith("s3://"):  # served from the store, fetched by `kiln serve` with the sha256 check
        return uri, sha
    return str(_local_path(uri, t.manifest.base_dir, t.pvc_root)), sha


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kiln run", description="Train and serve the manifests in FILE on this machine, no cluster.")
    p.add_argument("file", help="YAML with TrainingJob and ModelDeployment documents (the cluster's manifests run too)")
    p.add_argument("--once", action="store_true", help="check the served model on held-out rows, then exit")
    p.add_argument("--port", type=int, help="first server port (default: free ports)")
    p.add_argument("--output", help=f"folder for outputs and logs (default ./{DEFAULT_OUTPUT_DIR})")
    p.add_argument("--min-accuracy", type=float, help="with --once: exit 1 when the served accuracy is lower")
    p.add_argument("--pvc-root", help="folder standing in for the cluster's claims: pvc://CLAIM/PATH is PVC_ROOT/CLAIM/PATH "
                                      "(default ./pvc)")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return run(args.file, once=args.once, port=args.port, output=args.output, min_score=args.min_accuracy,
                   pvc_root=args.pvc_root)
    except ManifestError as exc:
        print(f"kiln run: {exc}", file=sys.stderr)
        return 2
    except LocalError as exc:
        print(f"kiln run: {exc}", file=sys.stderr)
        return exc.code
