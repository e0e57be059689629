"""Pure rendering: every manifest Kiln renders is valid Kubernetes (strict, 1.30) and carries the spec."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kiln_operator.modeldeployment.render import ModelRef, build_modeldeployment
from kiln_operator.settings import Features, OperatorSettings
from kiln_operator.templating import RenderError
from kiln_operator.trainingjob.render import build_trainingjob

from kiln.manifests import load_file
from kiln.schema import ManifestError, validate

pytestmark = [pytest.mark.unit]

ROOT = Path(__file__).resolve().parents[2]
NEW = OperatorSettings(features=Features(job_suspend=True, indexed_jobs=True, hpa_v2=True, server_version="v1.30.0"))
GPU = OperatorSettings(features=NEW.features, server_gpu_image="localhost/kiln/server-gpu:1")
OLD = OperatorSettings(features=Features(job_suspend=False, indexed_jobs=False, hpa_v2=False, server_version="v1.20.2"))


def tj(**spec: Any) -> dict[str, Any]:
    doc = {
        "apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob",
        "metadata": {"name": "demo", "namespace": "ml", "uid": "1234"},
        "spec": {"dataset": {"uri": "pvc://data/d.csv"}, "output": {"uri": "pvc://models/demo"},
                 "model": {"inputShape": [4], "layers": [{"type": "Dense", "units": 3, "activation": "softmax"}]}},
    }
    doc["spec"].update(spec)
    return validate(doc)


def md(**spec: Any) -> dict[str, Any]:
    doc = {"apiVersion": "kiln.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "srv", "namespace": "ml", "uid": "5678"},
           "spec": {"model": {"trainingJob": "demo"}, **spec}}
    return validate(doc)


def strict(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind)


CASES = {
    "minimal": {},
    "gpu": {"resources": {"gpus": 2, "cpu": "4", "memory": "16Gi"}, "scheduling": {"nodeSelector": {"gpu": "a100"}, "priorityClassName": "high",
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]}},
    "runpolicy": {"runPolicy": {"backoffLimit": 3, "activeDeadlineSeconds": 600, "ttlSecondsAfterFinished": 60, "restartPolicy": "OnFailure"}},
    "queue": {"scheduling": {"queueName": "team-a"}},
    "workers": {"workers": 3},
    "byo": {"command": ["python", "train.py"], "args": ["--epochs", "3"], "env": [{"name": "A", "value": "1"}], "image": "me/train:1"},
    "s3": {"output": {"uri": "s3://bucket/models/demo"}, "dataset": {"uri": "s3://bucket/data.csv"}},
}


@pytest.mark.parametrize("case", CASES)
def test_trainingjob_children_are_valid_kubernetes(case: str) -> None:
    docs = build_trainingjob(tj(**copy.deepcopy(CASES[case])), NEW)
    strict(docs)
    job = by_kind(docs, "Job")
    pod = job["spec"]["template"]["spec"]
    assert job["metadata"]["ownerReferences"][0] == {"apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob", "name": "demo",
                                                     "uid": "1234", "controller": True, "blockOwnerDeletion": True}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["KILN_SPEC"]["value"] == "/etc/kiln/trainingjob.yaml"
    # The spec reaches the trainer through the downward API: the file is the pod template's annotation.
    volume = next(v for v in pod["volumes"] if v["name"] == "spec")
    item = volume["downwardAPI"]["items"][0]
    assert item["path"] == "trainingjob.yaml"
    annotation = item["fieldRef"]["fieldPath"].split("'")[1]
    document = yaml.safe_load(job["spec"]["template"]["metadata"]["annotations"][annotation])
    assert document["metadata"]["name"] == "demo" and document["spec"]["model"] == tj(**CASES["minimal"])["spec"]["model"]
    assert annotation not in job["metadata"].get("annotations", {}), "only the pod template carries the spec"


def test_spec_too_large_for_an_annotation_is_a_clear_error() -> None:
    big = tj(**CASES["minimal"])
    big["spec"]["env"] = [{"name": f"V{i}", "value": "x" * 1000} for i in range(250)]
    with pytest.raises(RenderError, match=r"spec: .* bytes once serialized"):
        build_trainingjob(big, NEW)


def test_gpu_job_requests_gpus_and_tolerates_the_taint() -> None:
    pod = by_kind(build_trainingjob(tj(**CASES["gpu"]), NEW), "Job")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"] == {"limits": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": 2}, "requests": {"cpu": "4", "memory": "16Gi"}}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"gpu": "a100"} and pod["priorityClassName"] == "high"


def test_run_policy_and_queue_map_onto_the_job() -> None:
    job = by_kind(build_trainingjob(tj(**CASES["runpolicy"]), NEW), "Job")
    assert job["spec"]["backoffLimit"] == 3 and job["spec"]["activeDeadlineSeconds"] == 600
    assert job["spec"]["ttlSecondsAfterFinished"] == 60
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"
    queued = by_kind(build_trainingjob(tj(**CASES["queue"]), NEW), "Job")
    assert queued["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert queued["spec"]["suspend"] is True, "Kueue admits jobs that are created suspended"


def test_multi_worker_renders_an_indexed_job_and_headless_service() -> None:
    docs = build_trainingjob(tj(workers=3), NEW)
    job, svc = by_kind(docs, "Job"), by_kind(docs, "Service")
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 3 and job["spec"]["parallelism"] == 3
    assert svc["spec"]["clusterIP"] == "None"
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == svc["metadata"]["name"]
    hosts = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}["KILN_WORKER_HOSTS"]
    assert hosts.split(",") == [f"demo-train-{i}.demo-workers.ml.svc:2222" for i in range(3)]
    with pytest.raises(RenderError, match=r"spec\.workers"):
        build_trainingjob(tj(workers=3), OLD)


def test_cluster_needs_a_persistent_output() -> None:
    doc = tj()
    doc["spec"]["output"] = {"uri": "file:///tmp/out"}
    with pytest.raises(RenderError) as info:
        build_trainingjob(doc, NEW)
    assert info.value.field == "spec.output.uri"


@pytest.mark.parametrize("evil", ['x", "injected": "1', "a\nkind: Secret", "{{ 7*7 }}", "&anchor *alias", "---\napiVersion: v1", "'; rm -rf /"])
def test_values_cannot_break_out_of_the_yaml(evil: str) -> None:
    docs = build_trainingjob(tj(env=[{"name": "X", "value": evil}], command=["sh", "-c", evil], image=evil), NEW)
    job = by_kind(docs, "Job")
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e.get("value") for e in c["env"]}["X"] == evil
    assert c["image"] == evil and c["command"][-1] == evil
    assert [d["kind"] for d in docs] == ["ServiceAccount", "Role", "RoleBinding", "Job"]
    assert set(c) == {"name", "image", "imagePullPolicy", "command", "env", "resources", "securityContext",
                      "terminationMessagePath", "terminationMessagePolicy", "volumeMounts"}


def test_modeldeployment_renders_valid_objects() -> None:
    docs = build_modeldeployment(md(autoscaling={"maxReplicas": 4}, resources={"gpus": 1}, batching={"maxBatchSize": 8}), GPU,
                                 ModelRef("pvc://models/demo/model.onnx", "f" * 64, "demo"))
    strict(docs)
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "HorizontalPodAutoscaler", "NetworkPolicy"]
    dep = docs[0]
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert dep["spec"]["template"]["metadata"]["annotations"]["kiln.dev/model-sha256"] == "f" * 64
    old = build_modeldeployment(md(autoscaling={"maxReplicas": 4, "minReplicas": 2}), OLD, ModelRef("s3://b/m.onnx"))
    strict(old)
    assert [d["kind"] for d in old] == ["Deployment", "Service", "NetworkPolicy"] and old[0]["spec"]["replicas"] == 2
    assert old[0]["spec"]["template"]["spec"]["initContainers"][0]["name"] == "fetch-model"


def test_termination_grace_exceeds_prestop_plus_server_drain() -> None:
    """The kubelet kills at terminationGracePeriodSeconds, counting the preStop sleep and the server's
    drain (--graceful-timeout): the rendered number must stay above both, whatever either becomes."""
    from kiln_server.settings import Settings

    dep = build_modeldeployment(md(), NEW, ModelRef("s3://b/m.onnx"))[0]
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    drain = float(env.get("KILN_GRACEFUL_TIMEOUT") or Settings(model="m").graceful_timeout_s)
    pre = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(pre[1]) + drain, (pod["terminationGracePeriodSeconds"], pre, drain)


def test_local_validation_names_document_and_field(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump_all([
        {"apiVersion": "kiln.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "ok"}, "spec": {"model": {"uri": "file:///m.onnx"}}},
        {"apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "bad"},
         "spec": {"command": ["x"], "training": {"optimizer": {"name": "adagrad"}}, "trainingg": 1}},
    ]))
    with pytest.raises(ManifestError) as info:
        load_file(f)
    text = str(info.value)
    assert "document 2" in text and "TrainingJob/bad" in text
    assert "spec.training.optimizer.name" in text and "'adagrad' is not one of" in text
    assert "unknown field ('trainingg' was unexpected)" in text
    with pytest.raises(ManifestError, match="unknown kind 'Pipeline'"):
        validate({"apiVersion": "kiln.dev/v1alpha1", "kind": "Pipeline", "metadata": {"name": "x"}, "spec": {}})


def test_defaults_match_the_crd() -> None:
    full = validate({"apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "d"},
                     "spec": {"command": ["x"], "training": {"optimizer": {}}, "runPolicy": {}}})["spec"]
    assert full["training"]["optimizer"] == {"name": "adam", "learningRate": 0.001}
    assert full["runPolicy"] == {"backoffLimit": 0, "startTimeoutSeconds": 600, "suspend": False, "restartPolicy": "Never"}
    assert full["workers"] == 1


def test_generated_crds_are_up_to_date() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_crds.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_kiln_render_prints_the_gpu_job(kiln_cli: Any) -> None:
    out = kiln_cli("render", "examples/gpu-trainingjob.yaml", check=True).stdout
    docs = list(yaml.safe_load_all(out))
    strict(docs)
    job = by_kind(docs, "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    # `-` is standard input: a valid document renders, an invalid one is refused naming what is missing.
    good = kiln_cli("render", "-", input=(ROOT / "examples" / "gpu-trainingjob.yaml").read_text(), check=True).stdout
    assert list(yaml.safe_load_all(good)) == docs
    bad = kiln_cli("render", "-", input=json.dumps({"apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob"}))
    assert bad.returncode == 1 and "<stdin>" in bad.stderr and "cannot read" not in bad.stderr, bad.stderr
    assert "metadata" in bad.stderr or "spec" in bad.stderr, bad.stderr


def test_api_reference_is_up_to_date() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_api_docs.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    text = (ROOT / "docs" / "api-reference.md").read_text()
    assert "| `spec.training.optimizer.name` | string |" in text and "exactly one of `trainingJob` / `trainingJobSelector` / `uri`" in text


def test_render_previews_the_model_of_a_trainingjob_in_the_same_file(kiln_cli: Any) -> None:
    docs = list(yaml.safe_load_all(kiln_cli("render", "examples/cluster/digits.yaml", check=True).stdout))
    strict(docs)
    assert [d["kind"] for d in docs] == ["ServiceAccount", "Role", "RoleBinding", "Job", "Deployment", "Service", "NetworkPolicy"]
    args = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["--model", "/kiln/pvc/kiln-models/digits/model.onnx"]


def test_server_pods_get_time_to_leave_the_service_and_drain() -> None:
    """preStop keeps a terminating pod serving while kube-proxy drops it; the grace period covers that and the drain."""
    from kiln_server.settings import Settings

    pod = build_modeldeployment(md(), NEW, ModelRef("pvc://models/demo/model.onnx"))[0]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and int(sleep[1]) >= 3
    assert pod["terminationGracePeriodSeconds"] > int(sleep[1]) + Settings(model="m.onnx").graceful_timeout_s


def test_render_golden_files_are_up_to_date() -> None:
    """tests/golden/render/ holds what every example renders to: a rendering change is a reviewable diff."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_golden.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _server(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The server container and the Service of a rendered ModelDeployment."""
    return by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0], by_kind(docs, "Service")


def test_grpc_is_a_named_service_port_with_app_protocol() -> None:
    container, svc = _server(build_modeldeployment(md(), NEW, ModelRef("pvc://models/demo/model.onnx")))
    assert {"name": "grpc", "containerPort": 9000, "protocol": "TCP"} in container["ports"]
    args = container["args"]
    assert args[args.index("--grpc-port") + 1] == "9000"
    grpc_port = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port == {"name": "grpc", "port": 9000, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"}
    custom = build_modeldeployment(md(service={"port": 8000, "grpcPort": 8001}), NEW, ModelRef("pvc://models/demo/model.onnx"))
    strict(custom)
    assert next(p for p in _server(custom)[1]["spec"]["ports"] if p["name"] == "grpc")["port"] == 8001


def test_grpc_port_zero_turns_grpc_off_and_a_clash_is_refused() -> None:
    container, svc = _server(build_modeldeployment(md(service={"grpcPort": 0}), NEW, ModelRef("pvc://models/demo/model.onnx")))
    assert "--grpc-port" not in container["args"]
    assert [p["name"] for p in container["ports"]] == ["http"] and [p["name"] for p in svc["spec"]["ports"]] == ["http"]
    with pytest.raises(RenderError, match=r"spec\.service\.grpcPort"):
        build_modeldeployment(md(service={"port": 9000}), NEW, ModelRef("pvc://models/demo/model.onnx"))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, None),
        ({"resources": {"cpu": "500m"}}, None),
        ({"resources": {"cpu": "1.5"}}, None),
        ({"resources": {"cpu": "2"}}, "2"),
        ({"resources": {"cpu": 4}}, "4"),
        ({"resources": {"cpu": "2500m"}}, "2"),
        ({"resources": {"cpu": "4"}, "workers": 1}, "1"),
        ({"resources": {"cpu": "1"}, "workers": 3}, "3"),
    ],
)
def test_workers_default_from_the_cpu_request(spec: dict[str, Any], expected: str | None) -> None:
    container, _ = _server(build_modeldeployment(md(**spec), NEW, ModelRef("pvc://models/demo/model.onnx")))
    args = container["args"]
    assert (args[args.index("--workers") + 1] if "--workers" in args else None) == expected


def test_gpus_need_the_gpu_server_image() -> None:
    """GPUs run on the GPU image with `--providers cuda` (no silent CPU fallback); without a GPU image: refused."""
    gpu_md = md(resources={"gpus": 1, "cpu": "4"})
    container, _ = _server(build_modeldeployment(gpu_md, GPU, ModelRef("pvc://models/demo/model.onnx")))
    assert container["image"] == "localhost/kiln/server-gpu:1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    args = container["args"]
    assert args[args.index("--providers") + 1] == "cuda"
    assert "--workers" not in args, "GPU pods default to one worker (one CUDA context and model copy)"
    cpu_container, _ = _server(build_modeldeployment(md(resources={"cpu": "1"}), GPU, ModelRef("pvc://models/demo/model.onnx")))
    assert cpu_container["image"] == GPU.server_image and "--providers" not in cpu_container["args"]
    with pytest.raises(RenderError, match=r"asks for 1 GPU\(s\) but the operator has no GPU server image") as info:
        build_modeldeployment(gpu_md, NEW, ModelRef("pvc://models/demo/model.onnx"))
    assert info.value.field == "spec.resources.gpus" and "server.gpuImage" in str(info.value)
    own, _ = _server(build_modeldeployment(md(resources={"gpus": 2}, image="my/cuda-server:2"), NEW, ModelRef("pvc://models/demo/model.onnx")))
    assert own["image"] == "my/cuda-server:2"
