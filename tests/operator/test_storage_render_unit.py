"""`spec.storage` (secretName, endpoint, region): the AWS_* variables reach exactly the pods that touch S3."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from kiln_operator.modeldeployment.render import ModelRef, build_modeldeployment
from kiln_operator.settings import Features, OperatorSettings
from kiln_operator.templating import RenderError
from kiln_operator.trainingjob.render import build_deployment, build_trainingjob

from kiln.schema import ManifestError, validate

pytestmark = [pytest.mark.unit]

NEW = OperatorSettings(features=Features(job_suspend=True, indexed_jobs=True, hpa_v2=True, server_version="v1.30.0"))
STORAGE = {"secretName": "kiln-s3", "endpoint": "http://minio.storage:9000", "region": "eu-west-1"}


def _tj(**spec: Any) -> dict[str, Any]:
    return validate({"apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "demo", "namespace": "ml", "uid": "1"},
                     "spec": {"dataset": {"uri": "s3://data/d.csv"}, "output": {"uri": "s3://models/demo"},
                              "model": {"inputShape": [4], "layers": [{"type": "Dense", "units": 3, "activation": "softmax"}]}, **spec}})


def _md(**spec: Any) -> dict[str, Any]:
    return validate({"apiVersion": "kiln.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "srv", "namespace": "ml", "uid": "2"},
                     "spec": {"model": {"uri": "s3://models/demo/model.onnx"}, **spec}})


def _aws(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", []) if e["name"].startswith("AWS_")}


def test_trainer_gets_the_secret_keys_endpoint_and_region() -> None:
    docs = build_trainingjob(_tj(storage=STORAGE), NEW)
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    job = next(d for d in docs if d["kind"] == "Job")
    env = _aws(job["spec"]["template"]["spec"]["containers"][0])
    ref = {"secretKeyRef": {"name": "kiln-s3", "key": "AWS_ACCESS_KEY_ID", "optional": False}}
    assert env["AWS_ACCESS_KEY_ID"] == ref
    assert env["AWS_SECRET_ACCESS_KEY"]["secretKeyRef"]["optional"] is False
    assert env["AWS_SESSION_TOKEN"]["secretKeyRef"]["optional"] is True
    # The spec's endpoint and region win over the Secret's keys (which are then not referenced at all).
    assert env["AWS_ENDPOINT_URL_S3"] == "http://minio.storage:9000" and "AWS_ENDPOINT_URL" not in env
    assert env["AWS_REGION"] == "eu-west-1"


def test_without_storage_no_aws_variables_are_set() -> None:
    """The no-secret path: the AWS default chain (IRSA's web identity token, an instance role) applies."""
    job = next(d for d in build_trainingjob(_tj(), NEW) if d["kind"] == "Job")
    assert _aws(job["spec"]["template"]["spec"]["containers"][0]) == {}
    job = next(d for d in build_trainingjob(_tj(storage={"secretName": "s"}), NEW) if d["kind"] == "Job")
    env = _aws(job["spec"]["template"]["spec"]["containers"][0])
    assert env["AWS_ENDPOINT_URL_S3"]["secretKeyRef"] == {"name": "s", "key": "AWS_ENDPOINT_URL_S3", "optional": True}


def test_only_the_fetch_init_container_gets_credentials() -> None:
    docs = build_modeldeployment(_md(storage=STORAGE), NEW, ModelRef("s3://models/demo/model.onnx", "a" * 64))
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    init = pod["initContainers"][0]
    assert init["command"][:4] == ["python", "-m", "kiln_server.fetch", "s3://models/demo/model.onnx"]
    assert _aws(init)["AWS_SECRET_ACCESS_KEY"]["secretKeyRef"]["name"] == "kiln-s3"
    assert _aws(init)["AWS_ENDPOINT_URL_S3"] == "http://minio.storage:9000"
    assert _aws(pod["containers"][0]) == {}  # the server itself never sees the secret
    https = build_modeldeployment(_md(storage=STORAGE), NEW, ModelRef("https://example.org/m.onnx"))
    init = next(d for d in https if d["kind"] == "Deployment")["spec"]["template"]["spec"]["initContainers"][0]
    assert _aws(init) == {}  # an https:// model is not S3: no credentials sent along


def test_gs_models_are_refused_with_a_reason() -> None:
    with pytest.raises(RenderError, match=r"gs:// is not supported: use s3://"):
        build_modeldeployment(_md(model={"uri": "gs://b/m.onnx"}), NEW, ModelRef("gs://b/m.onnx"))


def test_spec_deploy_inherits_the_trainingjobs_storage() -> None:
    made = build_deployment(_tj(storage=STORAGE, deploy={"replicas": 1}))
    assert made["spec"]["storage"] == STORAGE
    own = {"secretName": "other"}
    assert build_deployment(_tj(storage=STORAGE, deploy={"storage": own}))["spec"]["storage"] == own


@pytest.mark.parametrize(("storage", "where"), [
    ({"endpoint": "ftp://store"}, "spec.storage.endpoint"),
    ({"endpoint": "http://has space"}, "spec.storage.endpoint"),
    ({"secretName": "Not_A_Name"}, "spec.storage.secretName"),
    ({"region": "EU WEST"}, "spec.storage.region"),
    ({"bucket": "x"}, "spec.storage"),
])
def test_schema_rejects_bad_storage(storage: dict[str, Any], where: str) -> None:
    with pytest.raises(ManifestError, match=where.replace(".", r"\.")):
        _tj(storage=storage)
    with pytest.raises(ManifestError, match=where.replace(".", r"\.")):
        _md(storage=storage)
