"""Object storage on the real node: a TrainingJob reads its dataset from and writes its model to S3
(SeaweedFS on the host side of the node, bound to the pods' bridge address), and a ModelDeployment
serves that model through the fetch init container; a fetch from a store that stalls fails with the
reason in the ModelDeployment's status instead of hanging.

Pods reach the host only at the bridge gateway (10.244.0.1; no default route), so that is where the S3
server listens. Credentials travel in a Secret named by `spec.storage.secretName`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from support.node import ROOT, Kube, eventually
from support.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedFS, proxy
from test_node import DIGITS_CSV, MD, accuracy, heldout, wait_finished

pytestmark = [pytest.mark.e2e]
NODE_IP = "10.244.0.1"
"""scripts/cluster.sh's bridge gateway: the node IP, the one host address pods can reach."""


@pytest.fixture(scope="module")
def store(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs-node"), host=NODE_IP).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_namespace(kube: Kube, chart: dict[str, str]) -> Iterator[str]:
    name = kube.create_namespace(f"e2e-s3-{uuid.uuid4().hex[:4]}")
    kube.run("create", "secret", "generic", "kiln-s3", f"--from-literal=AWS_ACCESS_KEY_ID={ACCESS_KEY}",
             f"--from-literal=AWS_SECRET_ACCESS_KEY={SECRET_KEY}", namespace=name)
    yield name
    kube.run("delete", "namespace", name, "--wait=false", check=False)


def s3_docs(bucket: str, endpoint: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """examples/s3/digits.yaml pointed at this bucket and endpoint."""
    tj, md = yaml.safe_load_all((ROOT / "examples" / "s3" / "digits.yaml").read_text())
    tj["spec"]["dataset"]["uri"] = f"s3://{bucket}/data/digits.csv"
    tj["spec"]["output"]["uri"] = f"s3://{bucket}/models/digits"
    tj["spec"]["runPolicy"] = {"backoffLimit": 0}
    for doc in (tj, md):
        doc["spec"]["storage"]["endpoint"] = endpoint
    return tj, md


def test_trains_from_s3_to_s3_and_serves_from_s3(kube: Kube, store: SeaweedFS, s3_namespace: str) -> None:
    ns, bucket = s3_namespace, store.bucket(f"e2e-{uuid.uuid4().hex[:6]}")
    store.client().upload_file(str(DIGITS_CSV), bucket, "data/digits.csv")
    tj, md = s3_docs(bucket, store.endpoint)
    kube.apply(yaml.safe_dump_all([tj, md]), namespace=ns)
    status = wait_finished(kube, ns, "digits-s3", 600)
    assert status["phase"] == "Succeeded", status
    assert status["result"]["modelUri"] == f"s3://{bucket}/models/digits/model.onnx"
    keys = store.keys(bucket, "models/digits/")
    assert {"models/digits/model.onnx", "models/digits/result.json"} <= set(keys), keys
    assert any(k.startswith("models/digits/logs/") for k in keys), keys
    assert not any(k.startswith(("models/digits/checkpoints/", "models/digits/.kiln-staging/")) for k in keys), keys

    served = eventually(lambda: (s := kube.status(MD, "digits-s3", ns)).get("phase") == "Ready" and s, 300,
                        "ModelDeployment digits-s3 Ready")
    assert served["model"]["uri"] == f"s3://{bucket}/models/digits/model.onnx"
    pod = kube.items("pods", ns, "kiln.dev/modeldeployment=digits-s3")[0]
    init = pod["status"]["initContainerStatuses"][0]
    assert init["name"] == "fetch-model" and init["state"]["terminated"]["exitCode"] == 0, init
    server_env = {e["name"] for e in pod["spec"]["containers"][0].get("env", [])}
    assert not any(n.startswith("AWS_") for n in server_env), server_env  # the Secret stays in the init container
    svc = kube.get("service", "digits-s3", ns)
    assert svc is not None
    x, y = heldout(tj)
    url = f"http://{svc['spec']['clusterIP']}:{svc['spec']['ports'][0]['port']}"
    score = eventually(lambda: accuracy(url, "digits-s3", x, y), 60, "the ClusterIP to answer")
    assert score >= 0.9, score


def test_a_stalled_model_fetch_fails_with_its_reason(kube: Kube, store: SeaweedFS, s3_namespace: str) -> None:
    ns, bucket = s3_namespace, store.bucket(f"e2e-{uuid.uuid4().hex[:6]}")
    store.client().put_object(Bucket=bucket, Key="m/model.onnx", Body=b"not reached")
    with proxy((NODE_IP, store.s3_port), "stall", host=NODE_IP) as stall:
        md = {"apiVersion": "kiln.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "stalled"},
              "spec": {"model": {"uri": f"s3://{bucket}/m/model.onnx"},
                       "storage": {"secretName": "kiln-s3", "endpoint": stall.endpoint}}}
        kube.apply(md, namespace=ns)
        # The fetch gives up after 5 attempts of 30 s (plus 15 s of backoff): the reason reaches the status.
        status = eventually(lambda: "Timeout" in (s := kube.status(MD, "stalled", ns)).get("message", "") and s, 420,
                            "the stalled fetch's Timeout in the ModelDeployment status")
        assert stall.connections >= 5
    assert "did not answer in time" in status["message"] and f"s3://{bucket}/m/model.onnx" in status["message"], status
    assert status.get("phase") != "Ready"
    pod = kube.items("pods", ns, "kiln.dev/modeldeployment=stalled")[0]
    term = pod["status"]["initContainerStatuses"][0]
    last = (term.get("lastState") or {}).get("terminated") or term["state"].get("terminated") or {}
    assert last.get("exitCode") == 1 and "Timeout" in last.get("message", ""), term

