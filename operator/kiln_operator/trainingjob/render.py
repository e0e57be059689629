"""Pure builders of a TrainingJob's children: the trainer's ServiceAccount, Role and RoleBinding, the
workers' Service, the Job, and the ModelDeployment that `spec.deploy` asks for.

Why pure: `kiln render` (the GitOps preview), the unit tests and the controller call the very same
functions, so what a user previews is what the operator creates.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from kiln import API_VERSION, DEFAULT_OUTPUT_DIR, GROUP, schema, tuning
from kiln.spec import TrainingJobSpec
from kiln_operator import names
from kiln_operator.podspec import (
    CONTAINER_SECURITY_CONTEXT,
    POD_SECURITY_CONTEXT,
    PVC_ROOT,
    owner_references,
    parse_pvc,
    resources,
    storage_env,
    tolerations,
)
from kiln_operator.settings import Features, OperatorSettings
from kiln_operator.templating import Dumper, RenderError, render_template

SPEC_DIR = "/etc/kiln"
SPEC_FILE = f"{SPEC_DIR}/trainingjob.yaml"
MAX_SPEC_BYTES = 200 * 1024
"""Kubernetes allows 256 KiB of annotations per object; the spec travels in one."""
WORKER_PORT = 2222
KUEUE_LABEL = "kueue.x-k8s.io/queue-name"
TRAINER_COMMAND = ["kiln", "train", "--in-cluster"]
BYO_COMMAND = ["python", "-m", "kiln_trainer.byo", "--"]


def _storage(spec: TrainingJobSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """Volumes and mounts for the dataset/output PVCs, and the local output folder."""
    dataset_uri = spec.dataset.uri if spec.dataset else ""
    output_uri = spec.output.uri or ""
    claims: dict[str, bool] = {}  # claim -> writable
    data_pvc = parse_pvc(dataset_uri, "spec.dataset.uri") if dataset_uri else None
    out_pvc = parse_pvc(output_uri, "spec.output.uri") if output_uri else None
    if data_pvc:
        claims[data_pvc[0]] = False
    if out_pvc:
        claims[out_pvc[0]] = True
    volumes, mounts = [], []
    for i, (claim, writable) in enumerate(sorted(claims.items())):
        volumes.append({"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": not writable}})
        mounts.append({"name": f"pvc-{i}", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": not writable})
    output_dir = f"{PVC_ROOT}/{out_pvc[0]}/{out_pvc[1]}".rstrip("/") if out_pvc else f"/tmp/{DEFAULT_OUTPUT_DIR}"
    return volumes, mounts, output_dir


def check_trainingjob(tj: dict[str, Any], features: Features) -> None:
    """What the schema cannot say but a cluster needs; raises RenderError naming the field."""
    spec = TrainingJobSpec.from_dict(tj.get("spec"))
    output_uri = spec.output.uri
    if not spec.command:
        for key, value in (("dataset", spec.dataset), ("model", spec.model)):
            if not value:
                raise RenderError(f"spec.{key}", "required for the built-in trainer (or set spec.command)")
        if not output_uri:
            raise RenderError("spec.output.uri", "required in a cluster: pvc://CLAIM/PATH or s3://BUCKET/PREFIX")
    if output_uri and output_uri.split("://")[0] not in ("pvc", "s3") :
        raise RenderError("spec.output.uri", f"{output_uri!r}: a cluster needs pvc:// or s3:// (the pod's filesystem is temporary)")
    if spec.tuning is not None and spec.tuning.parallelism > 1:
        if spec.command:
            raise RenderError("spec.tuning.parallelism", "parallel trials need the built-in trainer (spec.command is set)")
        if spec.workers > 1:
            raise RenderError("spec.tuning.parallelism", "each parallel trial runs in one pod: set spec.workers: 1")
    if spec.workers > 1 and not features.indexed_jobs:
        version = features.server_version or "older"
        raise RenderError("spec.workers", f"more than 1 worker needs Indexed Jobs (Kubernetes 1.21+); the API server is {version}")


def _env(spec: TrainingJobSpec, name: str, namespace: str, output_dir: str,
         tuning_best: int | None = None) -> list[dict[str, Any]]:
    """The trainer's environment: HOME/TMPDIR on the writable /tmp, the user's env, then Kiln's contract."""
    env: list[dict[str, Any]] = [{"name": "HOME", "value": "/tmp"}, {"name": "TMPDIR", "value": "/tmp"}]
    env += storage_env(spec.storage)
    env += [e.to_dict() for e in spec.env or []]
    env += [
        {"name": "KILN_SPEC", "value": SPEC_FILE},
        {"name": "KILN_TRAININGJOB", "value": name},
        {"name": "KILN_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "KILN_OUTPUT_URI", "value": spec.output.uri or ""},
        {"name": "KILN_OUTPUT_DIR", "value": output_dir},
        {"name": "KILN_PVC_ROOT", "value": PVC_ROOT},
        {"name": "KILN_TERMINATION_LOG", "value": "/dev/termination-log"},
    ]
    if tuning_best is not None:  # the parallel search is over: train its best trial for export
        env.append({"name": "KILN_TUNING_BEST", "value": str(tuning_best)})
    if spec.workers > 1:
        job, service = names.job_name(name), names.workers_service(name)
        hosts = ",".join(f"{job}-{i}.{service}.{namespace}.svc:{WORKER_PORT}" for i in range(spec.workers))
        env += [
            {"name": "KILN_WORKER_HOSTS", "value": hosts},
            {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
                "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        ]
    return env


def _spec_document(tj: dict[str, Any], spec: dict[str, Any], name: str, namespace: str) -> str:
    """The TrainingJob as the trainer reads it (from the pod's annotation, through the downward API)."""
    meta = tj["metadata"]
    document = {
        "apiVersion": tj.get("apiVersion", API_VERSION),
        "kind": "TrainingJob",
        "metadata": {"name": name, "namespace": namespace, "uid": meta.get("uid", ""), "generation": meta.get("generation", 1)},
        "spec": spec,
    }
    text: str = yaml.dump(document, Dumper=Dumper, sort_keys=False)
    if len(text) > MAX_SPEC_BYTES:
        raise RenderError("spec", f"{len(text)} bytes once serialized; at most {MAX_SPEC_BYTES} fit in the pod's annotations")
    return text


def egress_rules(entries: list[str], selector: dict[str, str], workers: int) -> list[dict[str, Any]]:
    """The trainer's egress: DNS anywhere, each `CIDR:PORT` the admin listed (API server, storage), the other workers."""
    rules: list[dict[str, Any]] = [{"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]
    for entry in entries:
        cidr, _, port = entry.rpartition(":")
        if not cidr or not port.isdigit():
            raise RenderError("networkPolicies.trainerEgress", f"{entry!r}: use CIDR:PORT, e.g. 10.0.0.1/32:6443")
        rules.append({"to": [{"ipBlock": {"cidr": cidr}}], "ports": [{"protocol": "TCP", "port": int(port)}]})
    if workers > 1:
        rules.append({"to": [{"podSelector": {"matchLabels": selector}}], "ports": [{"protocol": "TCP", "port": WORKER_PORT}]})
    return rules


def trainingjob_context(tj: dict[str, Any], settings: OperatorSettings, tuning_best: int | None = None) -> dict[str, Any]:
    """Everything the TrainingJob templates need, computed once (`tuning_best`: the final run of a parallel search)."""
    raw = copy.deepcopy(tj.get("spec") or {})
    spec = TrainingJobSpec.from_dict(raw)
    name, namespace = tj["metadata"]["name"], tj["metadata"].get("namespace") or "default"
    queue = spec.scheduling.queue_name
    volumes, mounts, output_dir = _storage(spec)
    labels = {**names.standard_labels(name, "trainer", "kiln-trainer"), names.LABEL_TRAININGJOB: names.label_value(name)}
    job_labels = {**labels, KUEUE_LABEL: queue} if queue else dict(labels)
    annotations = {names.ANNOTATION_TRAININGJOB: name}
    return {
        "trainingjob": name,
        "group": GROUP,
        "namespace": namespace,
        "job": names.job_name(name),
        "service": names.workers_service(name),
        "account": spec.service_account_name or names.trainer_account(name),
        "labels": labels,
        "job_labels": job_labels,
        "pod_labels": labels,
        "selector": {names.LABEL_TRAININGJOB: names.label_value(name)},
        "annotations": annotations,
        "pod_annotations": {**annotations, names.ANNOTATION_SPEC: _spec_document(tj, raw, name, namespace)},
        "owner_references": owner_references({**tj, "kind": "TrainingJob"}),
        "run_policy": spec.run_policy,
        "restart_policy": spec.run_policy.restart_policy,
        "suspend": spec.run_policy.suspend or bool(queue),
        "workers": spec.workers,
        "indexed": spec.workers > 1,
        "completions": spec.workers,
        "parallelism": spec.workers,
        "backoff_limit": spec.run_policy.backoff_limit,
        "worker_port": WORKER_PORT,
        "scheduling": spec.scheduling,
        "tolerations": tolerations(spec),
        "image": spec.image or settings.trainer_image,
        "image_pull_policy": spec.image_pull_policy or settings.image_pull_policy,
        "image_pull_secrets": [s.to_dict() for s in spec.image_pull_secrets or []],
        "command": BYO_COMMAND + spec.command if spec.command else list(TRAINER_COMMAND),
        "args": list(spec.args or []),
        "env": _env(spec, name, namespace, output_dir, tuning_best),
        "resources": resources(spec),
        "pod_security_context": POD_SECURITY_CONTEXT,
        "container_security_context": CONTAINER_SECURITY_CONTEXT,
        "volume_mounts": [{"name": "spec", "mountPath": SPEC_DIR, "readOnly": True}, {"name": "tmp", "mountPath": "/tmp"}, *mounts],
        # The spec reaches the pod through the downward API, from an annotation on the pod template:
        # no ConfigMap to create per job, and the Job itself records the spec it runs with.
        "volumes": [{"name": "spec", "downwardAPI": {"items": [{
            "path": SPEC_FILE.rsplit("/", 1)[1],
            "fieldRef": {"fieldPath": f"metadata.annotations['{names.ANNOTATION_SPEC}']"}}]}},
            {"name": "tmp", "emptyDir": {}}, *volumes],
        "create_account": not spec.service_account_name,
        "trainer_egress": egress_rules(settings.trainer_egress, {names.LABEL_TRAININGJOB: names.label_value(name)},
                                       spec.workers),
    }


def _support(ctx: dict[str, Any], settings: OperatorSettings) -> list[dict[str, Any]]:
    """What the trainer's pods need before they start: their account and role, the workers' Service, egress."""
    out: list[dict[str, Any]] = []
    if ctx["create_account"]:
        out += render_template("trainingjob-rbac.json.j2", **ctx)
    if ctx["workers"] > 1:
        out += render_template("trainingjob-service.yaml.j2", **ctx)
    if settings.network_policies and settings.trainer_egress:
        out += render_template("trainingjob-networkpolicy.yaml.j2", **ctx)
    return out


def build_trainingjob(tj: dict[str, Any], settings: OperatorSettings, tuning_best: int | None = None) -> list[dict[str, Any]]:
    """All children of a TrainingJob, in creation order (the Job last, once what it mounts exists).

    `tuning_best`: after a parallel search, the training Job trains that trial (KILN_TUNING_BEST) for export.
    """
    check_trainingjob(tj, settings.features)
    ctx = trainingjob_context(tj, settings, tuning_best)
    return [*_support(ctx, settings), *render_template("trainingjob-job.json.j2", **ctx)]


INDEXED_TRIALS, JOB_PER_TRIAL = "IndexedJob", "JobPerTrial"
"""The two ways parallel trials run (`status.tuning.mode`; the sequential search is `Sequential`)."""
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def trial_plan(tj: dict[str, Any], validate: bool = False) -> tuple[list[dict[str, Any]], int]:
    """The trials' parameter sets and their shared seed, as every trial pod computes them; RenderError naming the field.

    With `validate` (before the first trial starts) each trial's spec is checked against the CRD, so a
    value the schema rejects fails the TrainingJob before any pod starts (not N pods later).
    """
    spec = TrainingJobSpec.from_dict(tj.get("spec"))
    assert spec.tuning is not None
    seed = spec.training.seed if spec.training.seed is not None else tuning.derived_seed(str(tj["metadata"].get("uid") or ""))
    try:
        trials = tuning.plan(spec.tuning, seed)
        for params in trials if validate else []:
            doc = {"apiVersion": API_VERSION, "kind": "TrainingJob", "metadata": {"name": tj["metadata"]["name"]},
                   "spec": tuning.trial_spec(tj.get("spec") or {}, params, seed)}
            problems = schema.errors(doc)
            if problems:
                raise RenderError(tuning.WHERE, f"trial {params}: {problems[0].path}: {problems[0].message}")
    except tuning.TuningError as exc:
        raise RenderError(exc.where, exc.message) from exc
    return trials, seed


def build_trial_jobs(tj: dict[str, Any], settings: OperatorSettings, mode: str, indices: list[int],
                     support: bool) -> list[dict[str, Any]]:
    """The Jobs of parallel trials: one Indexed Job of every trial (`indices` = all), or one Job per index.

    Every pod gets the same spec document (with `spec.tuning`) and its trial number in KILN_TRIAL_INDEX:
    a literal for a Job per trial, the completion index for the Indexed Job. `support` adds the
    account, role and egress policy first (the trainer's, shared by every trial).
    """
    check_trainingjob(tj, settings.features)
    ctx = trainingjob_context(tj, settings)
    spec = TrainingJobSpec.from_dict(tj.get("spec"))
    assert spec.tuning is not None
    out = _support(ctx, settings) if support else []
    base = {**ctx, "suspend": bool(spec.scheduling.queue_name)}  # spec.runPolicy.suspend holds trials back in the operator
    if mode == INDEXED_TRIALS:
        # Pre-1.28 Indexed Jobs share one backoffLimit across indexes: give every trial the spec's retries.
        index_from: dict[str, Any] = {"valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}}
        jobs = [(names.trials_job(ctx["trainingjob"]), "indexed", index_from,
                 {"indexed": True, "completions": len(indices), "parallelism": spec.tuning.parallelism,
                  "backoff_limit": (spec.run_policy.backoff_limit + 1) * len(indices) - 1})]
    else:
        jobs = [(names.trial_job(ctx["trainingjob"], i), str(i), {"value": str(i)},
                 {"indexed": False, "completions": 1, "parallelism": 1}) for i in indices]
    for job_name, label, index_env, shape in jobs:
        labels = {**ctx["labels"], names.LABEL_TRIAL: label}
        out += render_template("trainingjob-job.json.j2", **{
            **base, **shape, "job": job_name, "job_labels": {**ctx["job_labels"], names.LABEL_TRIAL: label},
            "pod_labels": labels, "env": [*ctx["env"], {"name": "KILN_TRIAL_INDEX", **index_env}]})
    return out


def build_deployment(tj: dict[str, Any]) -> dict[str, Any]:
    """The ModelDeployment that `spec.deploy` asks for (not owned by the TrainingJob: see docs)."""
    deploy = copy.deepcopy(tj["spec"]["deploy"])
    typed = TrainingJobSpec.from_dict(tj["spec"]).deploy
    assert typed is not None  # the caller checked spec.deploy
    deploy.pop("name", None)
    deploy.pop("model", None)
    md_name = typed.name or tj["metadata"]["name"]
    model = {"trainingJob": tj["metadata"]["name"], "format": typed.model.format}
    if tj["spec"].get("storage") and "storage" not in deploy:  # the model is where the trainer wrote it
        deploy["storage"] = copy.deepcopy(tj["spec"]["storage"])
    return {
        "apiVersion": API_VERSION,
        "kind": "ModelDeployment",
        "metadata": {"name": md_name, "namespace": tj["metadata"]["namespace"],
                     "labels": {names.LABEL_CREATED_BY: names.label_value(tj["metadata"]["name"]),
                                "app.kubernetes.io/managed-by": "kiln-operator"}},
        "spec": {**deploy, "model": model},
    }
