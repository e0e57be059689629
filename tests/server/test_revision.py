"""A canary and its stable model behind one Service: the servers' metrics carry the model's revision, so the
two tracks' series can be told apart and compared (real server processes, with the args the operator renders)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from kiln_operator.modeldeployment.render import ModelRef, build_modeldeployment
from kiln_operator.settings import OperatorSettings
from support import models
from support.server import start_server

pytestmark = pytest.mark.server


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def _series(text: str, name: str) -> dict[str, float]:
    """`revision` label -> value of one family's samples (summed over its other labels)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(rf'^{name}\{{(.*)\}} (\S+)$', line)
        rev = re.search(r'revision="([^"]*)"', m.group(1)) if m else None
        if m and rev:
            out[rev.group(1)] = out.get(rev.group(1), 0.0) + float(m.group(2))
    return out


def test_the_two_tracks_metrics_are_labelled_by_revision(tmp_path: Path) -> None:
    stable_file, canary_file = models.mlp(tmp_path / "v1.onnx", seed=1), models.mlp(tmp_path / "v2.onnx", seed=2)
    stable_sha, canary_sha = _sha(stable_file), _sha(canary_file)
    md = {"apiVersion": "kiln.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "m", "namespace": "ns", "uid": "u"},
          "spec": {"model": {"uri": f"file://{stable_file}", "sha256": stable_sha},
                   "canary": {"model": {"uri": f"file://{canary_file}", "sha256": canary_sha}, "trafficPercent": 25}, "replicas": 4}}
    deployments = [c for c in build_modeldeployment(md, OperatorSettings(), None, canary=None) if c["kind"] == "Deployment"]
    assert len(deployments) == 1, "no canary Deployment before the controller resolved the canary's model"
    children = build_modeldeployment(md, OperatorSettings(), ModelRef(f"file://{stable_file}", stable_sha),
                                     canary=ModelRef(f"file://{canary_file}", canary_sha))
    args = {c["metadata"]["name"]: c["spec"]["template"]["spec"]["containers"][0]["args"] for c in children if c["kind"] == "Deployment"}
    assert set(args) == {"m-server", "m-canary"}
    revisions = {name: _arg(a, "--revision") for name, a in args.items()}
    assert revisions == {"m-server": stable_sha[:12], "m-canary": canary_sha[:12]}
    servers = {name: start_server(_arg(a, "--model"), "m", tmp_path, "--sha256", _arg(a, "--sha256"), "--revision", revisions[name])
               for name, a in args.items()}
    try:
        body = {"inputs": [{"name": "input", "shape": [1, 1000], "datatype": "FP32", "data": [0.5] * 1000}]}
        for _ in range(3):
            assert servers["m-server"].infer(body).status_code == 200
        assert servers["m-canary"].infer(body).status_code == 200
        stable_text, canary_text = servers["m-server"].metrics(), servers["m-canary"].metrics()
        # Prometheus scrapes both pods: summed by revision, the two models' request counts stay apart.
        scraped = stable_text + "\n" + canary_text
        infers = _series(scraped, "kiln_requests_total")
        assert _series(stable_text, "kiln_requests_total").keys() == {stable_sha[:12]}
        assert _series(canary_text, "kiln_requests_total").keys() == {canary_sha[:12]}
        assert f'code="200",revision="{stable_sha[:12]}",route="/v2/models/{{model}}/infer"}} 3.0' in stable_text
        assert f'code="200",revision="{canary_sha[:12]}",route="/v2/models/{{model}}/infer"}} 1.0' in canary_text
        assert infers[stable_sha[:12]] >= 3 and infers[canary_sha[:12]] >= 1
        assert _series(scraped, "kiln_request_duration_seconds_count").keys() == {stable_sha[:12], canary_sha[:12]}
        assert f'kiln_model_ready{{model="m",revision="{canary_sha[:12]}",version="1"}} 1.0' in canary_text
        assert _series(canary_text, "kiln_batch_size_count") == {canary_sha[:12]: 1.0}
    finally:
        for s in servers.values():
            s.stop()


def test_a_hand_started_server_has_no_revision_label(tmp_path: Path) -> None:
    s = start_server(models.mlp(tmp_path / "m.onnx"), "m", tmp_path)
    try:
        assert "revision=" not in s.metrics()
        assert 'kiln_model_ready{model="m",version="1"} 1.0' in s.metrics()
    finally:
        s.stop()
