"""One ModelDeployment -> `kiln serve` mapping (kiln.serverargs) for the operator and `kiln run`.

The expected argument lists are what `kiln render` printed for these manifests before the mapping moved
out of the operator: the operator must render exactly the same server pods.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln import cli, local
from kiln.manifests import load_file
from kiln.schema import ManifestError
from kiln.serverargs import serve_args
from kiln.spec import ModelDeploymentSpec

pytestmark = [pytest.mark.unit]

ROOT = Path(__file__).resolve().parents[2]
SHA_A = "a" * 64
SHA_B = "b" * 64
POD = ["--host", "0.0.0.0", "--port", "8080", "--exit-on-load-failure"]

MANIFESTS = f"""
apiVersion: kiln.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: full}}
spec:
  model: {{uri: "s3://bucket/m.onnx", sha256: "{SHA_A}"}}
  modelName: fancy
  batching: {{maxBatchSize: 8, maxLatencyMs: 3}}
  limits: {{maxBodyBytes: 100000, maxElements: 50}}
---
apiVersion: kiln.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: pvcmodel}}
spec:
  model: {{uri: "pvc://models/a/model.onnx"}}
  limits: {{maxElements: 7}}
---
apiVersion: kiln.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: filemodel}}
spec:
  model: {{uri: "file:///srv/m.onnx", sha256: "{SHA_B}"}}
  batching: {{}}
---
apiVersion: kiln.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: plain}}
spec:
  model: {{uri: "pvc://models/plain.onnx"}}
  replicas: 2
"""

RENDERED_BEFORE = {
    "digits-server": ["--model", "/kiln/pvc/kiln-models/digits/model.onnx", "--name", "digits", *POD,
                      "--max-batch-size", "32", "--max-latency-ms", "2"],
    "full-server": ["--model", "/models/model.onnx", "--name", "fancy", *POD, "--sha256", SHA_A,
                    "--max-batch-size", "8", "--max-latency-ms", "3", "--max-body-bytes", "100000", "--max-elements", "50"],
    "pvcmodel-server": ["--model", "/kiln/pvc/models/a/model.onnx", "--name", "pvcmodel", *POD,
                        "--max-body-bytes", "67108864", "--max-elements", "7"],
    "filemodel-server": ["--model", "/srv/m.onnx", "--name", "filemodel", *POD, "--sha256", SHA_B,
                         "--max-batch-size", "32", "--max-latency-ms", "5"],
    "plain-server": ["--model", "/kiln/pvc/models/plain.onnx", "--name", "plain", *POD],
}


def server_args_rendered(capsys: pytest.CaptureFixture[str], *files: Path) -> dict[str, list[str]]:
    """`kiln render FILES`: the server container's args of each Deployment, by Deployment name."""
    capsys.readouterr()
    assert cli.main(["render", *map(str, files)]) == 0
    out = {}
    for doc in yaml.safe_load_all(capsys.readouterr().out):
        if doc and doc["kind"] == "Deployment":
            container = next(c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == "server")
            assert container["command"] == ["kiln", "serve"]
            out[doc["metadata"]["name"]] = container["args"]
    return out


def test_the_operator_renders_the_args_it_rendered_before(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "mds.yaml").write_text(MANIFESTS)
    rendered = server_args_rendered(capsys, ROOT / "examples" / "cluster" / "digits.yaml", tmp_path / "mds.yaml")
    # the pods also serve gRPC on their own container port (an operator-only flag: `kiln run` serves REST),
    # and name their model's revision for the metrics (the digest's first 12 hex digits, else the URI's)
    assert all(args[-2] == "--revision" for args in rendered.values())
    assert rendered["full-server"][-1] == SHA_A[:12] and rendered["plain-server"][-1].startswith("uri-")
    assert {name: args[:-2] for name, args in rendered.items()} == {name: [*args, "--grpc-port", "9000"] for name, args in RENDERED_BEFORE.items()}


def test_serve_args_is_the_operators_mapping(tmp_path: Path) -> None:
    (tmp_path / "mds.yaml").write_text(MANIFESTS)
    docs = {m.name: m.doc["spec"] for m in load_file(tmp_path / "mds.yaml")}
    for name, spec in docs.items():
        want = RENDERED_BEFORE[f"{name}-server"]
        model = want[want.index("--model") + 1]
        got = serve_args(ModelDeploymentSpec.from_dict(spec), model=model, name=spec.get("modelName") or name, host="0.0.0.0", port=8080,
                         sha256=(spec["model"].get("sha256") or ""))
        assert got == want, name


def test_kiln_run_starts_the_server_with_the_same_args(tmp_path: Path) -> None:
    """Local mode no longer drops `limits` and `sha256`: the server on 127.0.0.1 gets the operator's flags."""
    (tmp_path / "mds.yaml").write_text(MANIFESTS)
    spec = ModelDeploymentSpec.from_dict(next(m.doc["spec"] for m in load_file(tmp_path / "mds.yaml") if m.name == "full"))
    argv = local.server_command("fancy", "/tmp/m.onnx", 9000, spec, SHA_A, tmp_path / "cache")
    assert argv[:4] == [sys.executable, "-m", "kiln.cli", "serve"]
    assert argv[4:] == ["--model", "/tmp/m.onnx", "--name", "fancy", "--host", "127.0.0.1", "--port", "9000",
                        "--exit-on-load-failure", "--sha256", SHA_A, "--max-batch-size", "8", "--max-latency-ms", "3",
                        "--max-body-bytes", "100000", "--max-elements", "50"]
    remote = local.server_command("fancy", "https://example.invalid/m.onnx", 9000, spec, SHA_A, tmp_path / "cache")
    assert remote[-2:] == ["--cache-dir", str(tmp_path / "cache")]


def _doc(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "kiln.dev/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}


def test_cluster_only_fields_are_named_and_defaults_are_not(tmp_path: Path) -> None:
    tj = {"dataset": {"uri": "pvc://data/d.csv"}, "model": {"inputShape": [4], "layers": [{"type": "Dense", "units": 3}]},
          "output": {"uri": "s3://bucket/out"}, "resources": {"cpu": "2"}, "workers": 2, "runPolicy": {"backoffLimit": 1},
          "serviceAccountName": "sa", "deploy": {"replicas": 3, "batching": {"maxBatchSize": 4}, "service": {"port": 81}},
          "tuning": {"parallelism": 3, "parameters": {"training.epochs": [1, 2]}}}
    md = {"model": {"trainingJob": "t"}, "autoscaling": {"maxReplicas": 3}, "scheduling": {"nodeSelector": {"a": "b"}},
          "limits": {"maxElements": 10}, "startupTimeoutSeconds": 30}
    quiet = {"model": {"uri": "m.onnx"}}  # replicas, progressDeadlineSeconds, ... only have their CRD defaults
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"}, "spec": {}}
    f = tmp_path / "all.yaml"
    f.write_text(yaml.safe_dump_all([pvc, _doc("TrainingJob", "t", tj), _doc("ModelDeployment", "m", md),
                                     _doc("ModelDeployment", "quiet", quiet)], sort_keys=False))
    foreign: list[str] = []
    manifests = load_file(f, foreign=foreign)
    assert foreign == ["PersistentVolumeClaim/data"]
    assert [m.name for m in manifests] == ["t", "m", "quiet"]
    named = local.cluster_only(manifests, {"t": tmp_path / "kiln-output" / "t"})
    assert named == [
        f"TrainingJob/t spec.resources, spec.workers, spec.runPolicy, spec.serviceAccountName, spec.deploy.replicas, "
        f"spec.deploy.service, spec.output.uri (written to {tmp_path / 'kiln-output' / 't'}), "
        "spec.tuning.parallelism (the trials run one after another)",
        "ModelDeployment/m spec.autoscaling, spec.scheduling",
    ]
    with pytest.raises(ManifestError, match="unknown kind 'Notebook'"):
        (tmp_path / "typo.yaml").write_text(yaml.safe_dump(_doc("Notebook", "x", {})))
        load_file(tmp_path / "typo.yaml", foreign=[])


def test_pvc_uris_map_under_the_pvc_root(tmp_path: Path) -> None:
    assert local._local_path("pvc://kiln-data/a/b.csv", tmp_path, tmp_path / "pvc") == tmp_path / "pvc" / "kiln-data" / "a" / "b.csv"
    for bad in ("pvc:///x.csv", "pvc://claim/../../etc/passwd"):
        with pytest.raises(local.LocalError, match="pvc://CLAIM/PATH"):
            local._local_path(bad, tmp_path, tmp_path / "pvc")
