"""The trainer reports progress through the real API server, with the ServiceAccount the operator made for it."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kubelet import eventually

pytestmark = [pytest.mark.live, pytest.mark.training]

API = "kiln.dev/v1alpha1"
ROOT = Path(__file__).resolve().parents[2]


def test_trainer_patches_progress_with_its_own_token(api: Any, operator: Any, namespace: str, kubectl: Any, control_plane: Any,
                                                     tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    lines = ["a,b,c,d,label"] + [",".join(f"{v:.4f}" for v in row) + f",{label}" for row, label in zip(x, y, strict=True)]
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    doc = {
        "apiVersion": API, "kind": "TrainingJob", "metadata": {"name": "progress", "namespace": namespace},
        "spec": {"dataset": {"uri": "pvc://data/data.csv"}, "output": {"uri": "pvc://models/progress"},
                 "model": {"inputShape": [4], "layers": [{"type": "Dense", "units": 8, "activation": "relu"},
                                                         {"type": "Dense", "units": 2, "activation": "softmax"}]},
                 "training": {"epochs": 4, "batchSize": 32, "seed": 3}},
    }
    api.call("POST", api.path(API, "TrainingJob", namespace), doc)
    # The operator made the trainer's identity; take its token as the pod would have it mounted.
    secret_name = eventually(lambda: ((api.get("v1", "ServiceAccount", namespace, "progress-trainer") or {}).get("secrets") or [{}])[0].get("name"),
                             what="the trainer ServiceAccount's token")
    token = base64.b64decode(api.get("v1", "Secret", namespace, secret_name)["data"]["token"]).decode()
    (tmp_path / "token").write_text(token)
    # The spec file exactly as the pod's downward-API volume shows it (the Job's pod-template
    # annotation), with the data where the mounted PVC would be.
    job = eventually(lambda: api.get("batch/v1", "Job", namespace, "progress-train"), what="the Job")
    spec_file = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "spec")["downwardAPI"]["items"][0]
    annotation = spec_file["fieldRef"]["fieldPath"].split("'")[1]
    (tmp_path / "pvc" / "data").mkdir(parents=True)
    (tmp_path / "data.csv").rename(tmp_path / "pvc" / "data" / "data.csv")
    (tmp_path / "tj.yaml").write_text(job["spec"]["template"]["metadata"]["annotations"][annotation])
    env = {**os.environ, "KILN_TRAININGJOB": "progress", "KILN_NAMESPACE": namespace, "KILN_API_SERVER": control_plane.server,
           "KILN_API_TOKEN_FILE": str(tmp_path / "token"), "KILN_API_INSECURE": "1", "KILN_PVC_ROOT": str(tmp_path / "pvc"),
           "KILN_TERMINATION_LOG": str(tmp_path / "termination-log")}
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "train", str(tmp_path / "tj.yaml"), "--output", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "progress patch" not in proc.stderr.lower() or "fail" not in proc.stderr.lower(), proc.stderr[-2000:]
    progress = api.get(API, "TrainingJob", namespace, "progress")["status"]["progress"]
    assert progress["epoch"] == 4 and progress["epochs"] == 4 and progress["percent"] == 100
    assert "loss" in progress["metrics"] and progress["updateTime"]
    row = kubectl("get", "tj", "progress", namespace=namespace).stdout.splitlines()[1].split()
    assert row[2] == "100"
