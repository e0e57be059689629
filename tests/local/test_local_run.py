"""`kiln run`: the local, cluster-free mode, as a user runs it (a real process, real training, real server)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import models
from support.fetchrules import LOOPBACK_FETCH

pytestmark = [pytest.mark.training, pytest.mark.server]

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_trains_serves_and_scores(kiln_cli: Any, tmp_path: Path) -> None:
    proc = kiln_cli("run", "examples/quickstart/digits.yaml", "--once", "--output", str(tmp_path), "--min-accuracy", "0.95",
                    timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    served = re.search(r"served model digits: accuracy ([0-9.]+) on (\d+) held-out rows", out)
    assert served, out
    assert float(served.group(1)) >= 0.95 and int(served.group(2)) > 300
    assert re.search(r"serving digits at http://127\.0\.0\.1:\d+/v2/models/digits", out)
    assert "curl -s http://127.0.0.1:" in out and '"shape": [1, 64]' in out
    assert (tmp_path / "digits" / "model.onnx").exists()


def _write(tmp_path: Path, docs: list[dict[str, Any]]) -> Path:
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump_all(docs))
    return f


def test_user_errors_name_the_document_and_field(kiln_cli: Any, tmp_path: Path) -> None:
    good = yaml.safe_load_all((ROOT / "examples" / "quickstart" / "digits.yaml").read_text())
    tj, md = list(good)
    unknown = _write(tmp_path, [{"apiVersion": "kiln.dev/v1alpha1", "kind": "Notebook", "metadata": {"name": "x"}, "spec": {}}])
    proc = kiln_cli("run", str(unknown), "--once")
    assert proc.returncode == 2 and "document 1" in proc.stderr and "unknown kind 'Notebook'" in proc.stderr

    tj_bad = {**tj, "spec": {**tj["spec"], "training": {**tj["spec"]["training"], "epochs": -1}}}
    invalid = _write(tmp_path, [tj_bad, md])
    proc = kiln_cli("run", str(invalid), "--once")
    assert proc.returncode == 2 and "TrainingJob/digits" in proc.stderr and "spec.training.epochs" in proc.stderr

    missing = {**tj, "spec": {**tj["spec"], "dataset": {**tj["spec"]["dataset"], "uri": "nowhere.csv"}}}
    proc = kiln_cli("run", str(_write(tmp_path, [missing])), "--once", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "TrainingJob/digits: spec.dataset.uri" in proc.stderr and "nowhere.csv" in proc.stderr

    orphan = {**md, "spec": {"model": {"trainingJob": "elsewhere"}}}
    proc = kiln_cli("run", str(_write(tmp_path, [orphan])), "--once")
    assert proc.returncode == 2 and "spec.model.trainingJob 'elsewhere'" in proc.stderr

    unmatched = {**md, "spec": {"model": {"trainingJobSelector": {"matchLabels": {"kiln.dev/model": "nothing"}}}}}
    proc = kiln_cli("run", str(_write(tmp_path, [unmatched])), "--once")
    assert proc.returncode == 2 and "spec.model.trainingJobSelector matches no TrainingJob" in proc.stderr
    assert "Traceback" not in proc.stderr


def _cluster_digits(tmp_path: Path, **extra: dict[str, Any]) -> Path:
    """examples/cluster/digits.yaml, 3 epochs (quick), plus `extra` spec fields per kind, after a PVC document."""
    tj, md = yaml.safe_load_all((ROOT / "examples" / "cluster" / "digits.yaml").read_text())
    tj["spec"]["training"]["epochs"] = 3
    tj["spec"].update(extra.get("TrainingJob", {}))
    md["spec"].update(extra.get("ModelDeployment", {}))
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "kiln-data"},
           "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}
    f = tmp_path / "digits.yaml"
    f.write_text(yaml.safe_dump_all([pvc, tj, md], sort_keys=False))
    return f


def _run(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`kiln run ARGS` from tmp_path (its ./kiln-output stays there)."""
    return subprocess.run([sys.executable, "-m", "kiln.cli", "run", *args], cwd=tmp_path, text=True,
                          capture_output=True, timeout=timeout)


def test_the_cluster_manifest_runs_with_a_pvc_root(tmp_path: Path) -> None:
    manifest = _cluster_digits(tmp_path, TrainingJob={
        "resources": {"cpu": "2", "memory": "2Gi"}, "workers": 2, "runPolicy": {"backoffLimit": 1},
        "scheduling": {"nodeSelector": {"pool": "cpu"}}, "serviceAccountName": "trainer", "imagePullSecrets": [{"name": "regcred"}],
    }, ModelDeployment={"autoscaling": {"minReplicas": 1, "maxReplicas": 3}, "service": {"type": "ClusterIP", "port": 80}})
    claims = tmp_path / "claims"
    (claims / "kiln-data").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "digits" / "digits.csv", claims / "kiln-data" / "digits.csv")
    proc = _run(tmp_path, str(manifest), "--once", "--pvc-root", str(claims))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("kiln run: warning:")]
    assert warnings == [
        "kiln run: warning: cluster-only, ignored here: TrainingJob/digits spec.resources, spec.workers, spec.runPolicy, "
        "spec.scheduling, spec.serviceAccountName, spec.imagePullSecrets; ModelDeployment/digits spec.replicas, "
        "spec.autoscaling, spec.service; PersistentVolumeClaim/kiln-data (not a Kiln kind)"
    ], proc.stderr
    # pvc://kiln-data/digits.csv was read from, and pvc://kiln-models/digits written to, the pvc root.
    assert "read 1797 rows from pvc://kiln-data/digits.csv" in proc.stdout
    assert (claims / "kiln-models" / "digits" / "model.onnx").exists()
    served = re.search(r"served model digits: accuracy ([0-9.]+) on (\d+) held-out rows", proc.stdout)
    assert served and float(served.group(1)) > 0.8, proc.stdout


def test_a_missing_claim_folder_is_a_clear_error(tmp_path: Path) -> None:
    proc = _run(tmp_path, str(_cluster_digits(tmp_path)), "--once", timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    where = tmp_path / "pvc" / "kiln-data" / "digits.csv"  # the default --pvc-root is ./pvc
    assert f"spec.dataset.uri: pvc://kiln-data/digits.csv is {where} on this machine, which does not exist" in proc.stderr
    assert "--pvc-root" in proc.stderr


@pytest.fixture
def model_over_http(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(URL, sha256) of the reference MLP (1000 inputs) served by a plain HTTP server on 127.0.0.1."""
    folder = tmp_path / "www"
    folder.mkdir()
    path = models.mlp(folder / "mlp.onnx")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/mlp.onnx", hashlib.sha256(path.read_bytes()).hexdigest()
    httpd.shutdown()


def _post(url: str, rows: int) -> int:
    body = {"inputs": [{"name": "input", "shape": [rows, 1000], "datatype": "FP32", "data": [0.5] * (rows * 1000)}]}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_model_uri_is_served_with_its_sha256_and_limits(tmp_path: Path, model_over_http: tuple[str, str]) -> None:
    """`kiln run` used to drop spec.limits and spec.model.sha256; the server now gets the operator's flags."""
    url, sha = model_over_http
    md = {"apiVersion": "kiln.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "mlp"},
          "spec": {"model": {"uri": url, "sha256": sha}, "limits": {"maxElements": 1500}}}
    f = tmp_path / "md.yaml"
    f.write_text(yaml.safe_dump(md))
    # The test's model server is plain http on 127.0.0.1: opted in explicitly (the fetch rules refuse both by default).
    proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "run", str(f)], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **LOOPBACK_FETCH})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        served = re.match(r"serving mlp at (http://127\.0\.0\.1:\d+/v2/models/mlp) ", line)
        assert served, line + proc.stdout.read() + (proc.stderr.read() if proc.stderr else "")
        infer = served.group(1) + "/infer"
        assert _post(infer, 1) == 200
        assert _post(infer, 2) == 413  # 2000 elements > spec.limits.maxElements
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert (tmp_path / "kiln-output" / "models" / "mlp.onnx").exists()  # downloaded into the run's folder

    md["spec"]["model"]["sha256"] = "0" * 64
    f.write_text(yaml.safe_dump(md))
    proc2 = _run(tmp_path, str(f), "--once", timeout=120)
    assert proc2.returncode == 2 and "Traceback" not in proc2.stderr
    assert "the model server for mlp exited with 1" in proc2.stderr and "sha256" in proc2.stderr

