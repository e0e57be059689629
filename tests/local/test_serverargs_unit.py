"""One ModelDeployment -> `kiln serve` mapping (kiln.serverargs) for the operator and `kiln run`.

The expected argument lists are what `kiln render` printed for these manifests before the mapping moved
out of the operator: the operator must render exactly the same server pods.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kiln import cli
from kiln.manifests import load_file
from kiln.serverargs import serve_args

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
    assert rendered == RENDERED_BEFORE


def test_serve_args_is_the_operators_mapping(tmp_path: Path) -> None:
    (tmp_path / "mds.yaml").write_text(MANIFESTS)
    docs = {m.name: m.doc["spec"] for m in load_file(tmp_path / "mds.yaml")}
    for name, spec in docs.items():
        want = RENDERED_BEFORE[f"{name}-server"]
        model = want[want.index("--model") + 1]
        got = serve_args(spec, model=model, name=spec.get("modelName") or name, host="0.0.0.0", port=8080,
                         sha256=(spec["model"].get("sha256") or ""))
        assert got == want, name
