"""The CRD schemas on the real API server: bad manifests are rejected with the field named; kubectl works."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from kiln.schema import errors as local_errors

pytestmark = [pytest.mark.live]

ROOT = Path(__file__).resolve().parents[2]
API = "kiln.dev/v1alpha1"

TJ: dict[str, Any] = {
    "apiVersion": API, "kind": "TrainingJob", "metadata": {"name": "bad"},
    "spec": {
        "dataset": {"uri": "pvc://data/x.csv"},
        "model": {"inputShape": [4], "layers": [{"type": "Dense", "units": 3, "activation": "softmax"}]},
        "output": {"uri": "pvc://models/x"},
    },
}
MD: dict[str, Any] = {"apiVersion": API, "kind": "ModelDeployment", "metadata": {"name": "bad"}, "spec": {"model": {"uri": "pvc://m/model.onnx"}}}


def with_(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    node = out
    parts = path.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
    last = parts[-1]
    if value is DELETE:
        del node[last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return out


DELETE = object()

# (manifest, field the API server must name)
INVALID = [
    (with_(TJ, "spec.training", {"optimizer": {"name": "adagrad"}}), "spec.training.optimizer.name"),
    (with_(TJ, "spec.training", {"epochs": 0}), "spec.training.epochs"),
    (with_(TJ, "spec.training", {"batchSize": "32"}), "spec.training.batchSize"),
    (with_(TJ, "spec.model.layers.0.type", "Transformer"), "spec.model.layers.type"),
    (with_(TJ, "spec.model.layers.0.units", -3), "spec.model.layers.units"),
    (with_(TJ, "spec.model.inputShape", []), "spec.model.inputShape"),
    (with_(TJ, "spec.dataset.format", "xlsx"), "spec.dataset.format"),
    (with_(TJ, "spec.dataset.validationSplit", 1.5), "spec.dataset.validationSplit"),
    (with_(TJ, "spec.dataset.preprocessing", {"missingValues": "guess"}), "spec.dataset.preprocessing.missingValues"),
    (with_(TJ, "spec.dataset.preprocessing", {"normalization": "zscore"}), "spec.dataset.preprocessing.normalization"),
    (with_(TJ, "spec.resources", {"gpus": -1}), "spec.resources.gpus"),
    (with_(TJ, "spec.resources", {"memory": "lots"}), "spec.resources.memory"),
    (with_(TJ, "spec.runPolicy", {"backoffLimit": -1}), "spec.runPolicy.backoffLimit"),
    (with_(TJ, "spec.output.onnx", {"opset": 30}), "spec.output.onnx.opset"),
    (with_(TJ, "spec.workers", 0), "spec.workers"),
    (with_(TJ, "spec.scheduling", {"tolerations": [{"operator": "Maybe"}]}), "spec.scheduling.tolerations.operator"),
    (with_(TJ, "spec.dataset", DELETE), "spec"),
    (with_(MD, "spec.model", {"trainingJob": "a", "uri": "pvc://m/x.onnx"}), "spec.model"),
    (with_(MD, "spec.model", {}), "spec.model"),
    (with_(MD, "spec.replicas", -1), "spec.replicas"),
    (with_(MD, "spec.service", {"type": "Ingress"}), "spec.service.type"),
    (with_(MD, "spec.service", {"port": 70000}), "spec.service.port"),
    (with_(MD, "spec.autoscaling", {"minReplicas": 1}), "spec.autoscaling.maxReplicas"),
    (with_(MD, "spec.batching", {"maxBatchSize": 0}), "spec.batching.maxBatchSize"),
    (with_(MD, "spec.model.format", "pickle"), "spec.model.format"),
    (with_(MD, "spec.canary", {"model": {"uri": "pvc://m/y.onnx"}, "trafficPercent": 101}), "spec.canary.trafficPercent"),
    (with_(MD, "spec.canary", {"model": {"uri": "pvc://m/y.onnx"}}), "spec.canary.trafficPercent"),
    (with_(MD, "spec.canary", {"model": {"trainingJob": "a", "uri": "pvc://m/y.onnx"}, "trafficPercent": 5}), "spec.canary.model"),
    (with_(MD, "spec.canary", {"trafficPercent": 5}), "spec.canary.model"),
    (with_(MD, "spec.service", {"gateway": {"namespace": "gw"}}), "spec.service.gateway.name"),
    (with_(MD, "spec.service", {"gateway": {"name": "Not_A_Name"}}), "spec.service.gateway.name"),
    (with_(TJ, "spec.model.inputShape", [0]), "spec.model.inputShape"),
    (with_(TJ, "spec.model.inputShape", [2, 2, 2, 2, 2]), "spec.model.inputShape"),
    (with_(TJ, "spec.model.inputShape", [1048577]), "spec.model.inputShape"),
    (with_(TJ, "spec.model.layers", []), "spec.model.layers"),
    (with_(TJ, "spec.model.layers.0.rate", 1.0), "spec.model.layers.rate"),
    (with_(TJ, "spec.training", {"loss": "hinge"}), "spec.training.loss"),
    (with_(TJ, "spec.training", {"optimizer": {"learningRate": 0}}), "spec.training.optimizer.learningRate"),
    (with_(TJ, "spec.scheduling", {"queueName": "Not A Label"}), "spec.scheduling.queueName"),
]

# Valid for the schema, impossible for a cluster: the operator marks them Failed with the field named.
UNRUNNABLE = [
    ("file-output", {"output": {"uri": "file:///tmp/model"}}, "spec.output.uri"),
    ("no-output", {"output": {"onnx": {"opset": 17}}}, "spec.output.uri"),
    ("bad-claim", {"dataset": {"uri": "pvc:///data.csv"}}, "spec.dataset.uri"),
    ("two-workers", {"workers": 2}, "spec.workers"),
]


@pytest.mark.parametrize(("doc", "field"), INVALID, ids=[f"{d['kind']}:{f}:{i}" for i, (d, f) in enumerate(INVALID)])
def test_api_server_rejects_invalid_manifest(api: Any, namespace: str, doc: dict[str, Any], field: str) -> None:
    from kiln.kube import ApiError

    with pytest.raises(ApiError) as info:
        api.call("POST", api.path(API, doc["kind"], namespace), doc)
    assert info.value.status == 422
    message = json.loads(info.value.body)["message"]
    assert field in message, message
    # The CLI's local validation (kiln render/run) rejects the same document, naming the same field.
    local = local_errors(doc)
    assert local, f"local validation accepted what the API server rejected: {message}"
    flat = [re.sub(r"\[\d+\]", "", e.path) for e in local]
    assert any(p == field or p.startswith(field + ".") or field.startswith(p + ".") for p in flat), local


def test_valid_examples_apply_and_print_columns(api: Any, kubectl: Any, namespace: str, operator: Any) -> None:
    out = kubectl("apply", "-f", str(ROOT / "examples" / "gpu-trainingjob.yaml"), namespace=namespace).stdout
    assert "trainingjob.kiln.dev/digits-cnn created" in out
    kubectl("apply", "-f", "-", namespace=namespace, input=json.dumps(MD))
    from kubelet import eventually

    table = eventually(lambda: (lambda t: t if len(t.splitlines()[-1].split()) == 6 else None)(kubectl("get", "tj", namespace=namespace).stdout),
                       what="kubectl get tj shows every column")
    header = table.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "PROGRESS", "GPUS", "REASON", "AGE"]
    row = table.splitlines()[1].split()
    assert row[0] == "digits-cnn" and row[1] == "Pending" and row[2] == "0" and row[3] == "1"
    wide = kubectl("get", "trainingjobs.kiln.dev", "-o", "wide", namespace=namespace).stdout
    assert "digits-cnn-train" in wide
    md_table = kubectl("get", "md", namespace=namespace).stdout.splitlines()[0].split()
    assert md_table[:3] == ["NAME", "PHASE", "READY"]
    assert "digits-cnn" in kubectl("get", "kiln", namespace=namespace).stdout, "category 'kiln' lists both kinds"


def test_unrunnable_specs_fail_with_the_field_and_the_operator_goes_on(api: Any, operator: Any, namespace: str) -> None:
    from kubelet import eventually

    for name, patch, _ in UNRUNNABLE:
        doc = copy.deepcopy(TJ)
        doc["metadata"]["name"] = name
        doc["spec"].update(patch)
        api.call("POST", api.path(API, "TrainingJob", namespace), doc)
    good = copy.deepcopy(TJ)
    good["metadata"]["name"] = "good"
    api.call("POST", api.path(API, "TrainingJob", namespace), good)
    for name, _, field in UNRUNNABLE:
        st = eventually(lambda name=name: (lambda s: s if s.get("phase") == "Failed" else None)(
            api.get(API, "TrainingJob", namespace, name).get("status") or {}), what=f"{name} Failed")
        assert st["reason"] == "InvalidSpec" and st["message"].startswith(field + ":"), st
    jobs = eventually(lambda: api.list_objects("batch/v1", "Job", namespace), what="the good TrainingJob's Job")
    assert [j["metadata"]["name"] for j in jobs] == ["good-train"]
