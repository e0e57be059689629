"""`kiln run` with the cluster's s3:// manifest (examples/s3/digits.yaml): data read from, model written to and
served from the real S3 server; `spec.storage.endpoint` is honoured, `secretName` named as cluster-only."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support.seaweed import SeaweedFS

pytestmark = [pytest.mark.s3, pytest.mark.training, pytest.mark.server]

ROOT = Path(__file__).resolve().parents[2]


def test_kiln_run_the_s3_example(s3: SeaweedFS, tmp_path: Path) -> None:
    bucket = s3.test_bucket
    s3.client().upload_file(str(ROOT / "examples" / "digits" / "digits.csv"), bucket, "data/digits.csv")
    tj, md = yaml.safe_load_all((ROOT / "examples" / "s3" / "digits.yaml").read_text())
    tj["spec"]["training"]["epochs"] = 3
    tj["spec"]["dataset"]["uri"] = f"s3://{bucket}/data/digits.csv"
    tj["spec"]["output"]["uri"] = f"s3://{bucket}/models/digits"
    for doc in (tj, md):
        doc["spec"]["storage"]["endpoint"] = s3.endpoint  # the only place the endpoint is given
    manifest = tmp_path / "digits.yaml"
    manifest.write_text(yaml.safe_dump_all([tj, md], sort_keys=False))
    env = {k: v for k, v in {**os.environ, **s3.env()}.items() if not k.startswith("AWS_ENDPOINT_URL")}
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "run", str(manifest), "--once"], cwd=tmp_path, env=env,
                          text=True, capture_output=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"read 1797 rows from s3://{bucket}/data/digits.csv" in proc.stdout
    assert "spec.storage.secretName (this shell's AWS_* variables are used)" in proc.stderr
    assert {"models/digits/model.onnx", "models/digits/result.json"} <= set(s3.keys(bucket, "models/digits/"))
    assert not (tmp_path / "kiln-output" / "digits-s3" / "model.onnx").exists()  # written to the store, not here
    served = re.search(r"served model digits-s3: accuracy ([0-9.]+) on (\d+) held-out rows", proc.stdout)
    assert served and float(served.group(1)) > 0.8, proc.stdout


def test_kiln_run_refuses_gs_models(tmp_path: Path) -> None:
    md = {"apiVersion": "kiln.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "g"},
          "spec": {"model": {"uri": "gs://bucket/model.onnx"}}}
    manifest = tmp_path / "g.yaml"
    manifest.write_text(yaml.safe_dump(md))
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "run", str(manifest), "--once"], cwd=tmp_path,
                          text=True, capture_output=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "ModelDeployment/g: spec.model.uri: gs:// is not supported" in proc.stderr
