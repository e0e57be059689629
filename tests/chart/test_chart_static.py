"""The Helm chart with the real helm binary: lint, render every switch, validate every document, refuse bad values."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from support.chart import CHART, ROOT

pytestmark = [pytest.mark.helm]

K8S_VERSION = "1.30.0"

VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "cluster-globs": {"watchNamespaces": ["team-*", "ml"]},
    "cluster-list": {"watchNamespaces": ["ml-a", "ml-b"]},
    "namespaced": {"scope": "namespaced", "watchNamespaces": ["ml-a", "ml-b"]},
    "peering-standby": {"peering.enabled": True, "standby.enabled": True},
    "namespaced-peering": {"scope": "namespaced", "watchNamespaces": ["ml-a"], "peering.enabled": True},
    "service-and-scheduling": {
        "service.enabled": True, "service.type": "NodePort", "priorityClassName": "system-cluster-critical",
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
        "podLabels": {"team": "ml"}, "podAnnotations": {"prometheus.io/scrape": "false"},
    },
    "pull-secrets-and-images": {
        "imagePullSecrets": [{"name": "regcred"}], "image.tag": "0.2.0", "image.pullPolicy": "Always",
        "trainer.image": {"repository": "registry.local/trainer", "tag": "gpu"},
        "server.image": {"repository": "registry.local/server", "tag": "1.0"},
        "workloadImagePullPolicy": "Always", "operator.verbose": True,
    },
    "digest": {"image.digest": "sha256:" + "ab" * 32},
    "argocd-health-no-metrics-service": {"argocd.healthChecks.enabled": True, "metrics.enabled": False},
    "no-rbac-own-sa": {"rbac.create": False, "serviceAccount.create": False, "serviceAccount.name": "ops"},
    "sa-annotations-overrides": {"serviceAccount.annotations": {"iam.example.com/role": "kiln"}, "fullnameOverride": "kiln-op",
                                 "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": 1, "memory": "1Gi"}}},
}


def crd_schema(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def validate_all(docs: list[dict[str, Any]]) -> None:
    """Every document valid: built-in kinds by the 1.30 schemas (strict), custom resources by their CRD."""
    crds = {(d["spec"]["group"], d["spec"]["names"]["kind"]): d for d in docs if d["kind"] == "CustomResourceDefinition"}
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        d = yaml.safe_load(path.read_text())
        crds.setdefault((d["spec"]["group"], d["spec"]["names"]["kind"]), d)
    for doc in docs:
        group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
        if (group, doc["kind"]) in crds:
            jsonschema.validate({k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")},
                                crd_schema(crds[(group, doc["kind"])]))
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def env_of(deployment: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_lint_strict(helm: Any) -> None:
    out = helm("lint", "--strict", str(CHART))
    assert "1 chart(s) linted, 0 chart(s) failed" in out.stdout
    for values in VARIANTS.values():
        args = [a for k, v in values.items() for a in ("--set-json", f"{k}={json.dumps(v)}")]
        assert helm("lint", "--strict", str(CHART), *args).returncode == 0


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_document_is_valid(render: Any, variant: str) -> None:
    docs = render(VARIANTS[variant])
    kinds = {d["kind"] for d in docs}
    assert {"CustomResourceDefinition", "Deployment"} <= kinds
    validate_all(docs)


def test_defaults(render: Any) -> None:
    docs = render()
    assert sorted(d["metadata"]["name"] for d in by_kind(docs, "CustomResourceDefinition")) == [
        "modeldeployments.kiln.dev", "trainingjobs.kiln.dev"]
    (dep,) = by_kind(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "ghcr.io/kiln-dev/kiln-operator:0.1.0"
    assert c["args"] == ["--all-namespaces"]
    env = env_of(dep)
    assert env["KILN_TRAINER_IMAGE"] == "ghcr.io/kiln-dev/kiln-trainer:0.1.0"
    assert env["KILN_SERVER_IMAGE"] == "ghcr.io/kiln-dev/kiln-server:0.1.0"
    assert env["KILN_NAMESPACES"] == "" and env["KILN_PEERING"] == ""
    assert env["KILN_LIVENESS"] == "http://0.0.0.0:8080/healthz"
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["ports"] == [{"name": "health", "containerPort": 8080, "protocol": "TCP"},
                          {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    assert env["KILN_METRICS_PORT"] == "9090" and env["KILN_PEERING_LIFETIME"] == "60"
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] == 65532 and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"} and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert pod["serviceAccountName"] == "kiln" and dep["spec"]["strategy"] == {"type": "Recreate"}
    assert [d["kind"] for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")] == [
        "ClusterRole", "ClusterRoleBinding"]
    assert [s["metadata"]["name"] for s in by_kind(docs, "Service")] == ["kiln-metrics"]
    assert not by_kind(docs, "ClusterKopfPeering") and not by_kind(docs, "ServiceMonitor") and not by_kind(docs, "ConfigMap")
    labels = dep["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "kiln" and labels["helm.sh/chart"] == "kiln-0.1.0"


def test_no_wildcards_anywhere_in_rbac(render: Any) -> None:
    for values in VARIANTS.values():
        for doc in render(values):
            if doc["kind"] in ("ClusterRole", "Role"):
                for rule in doc["rules"]:
                    for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                        assert not any("*" in v for v in rule.get(field) or []), (doc["metadata"]["name"], rule)
                    assert rule["verbs"] and set(rule["verbs"]) <= {"get", "list", "watch", "create", "patch", "update", "delete"}
                    assert "escalate" not in rule["verbs"] and "bind" not in rule["verbs"]


def test_cluster_scope_with_globs_watches_namespaces(render: Any) -> None:
    docs = render(VARIANTS["cluster-globs"])
    (dep,) = by_kind(docs, "Deployment")
    assert "args" not in dep["spec"]["template"]["spec"]["containers"][0]
    assert env_of(dep)["KILN_NAMESPACES"] == "team-*,ml"
    (role,) = by_kind(docs, "ClusterRole")
    assert {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]} in role["rules"]
    defaults = by_kind(render(), "ClusterRole")[0]
    # Cluster-wide needs no namespace listing; only `get` of a namespace, for its kiln.dev/policy-profile label.
    assert [r["verbs"] for r in defaults["rules"] if "namespaces" in r["resources"]] == [["get"]]


def test_cluster_scope_with_a_list_binds_workload_verbs_per_namespace(render: Any) -> None:
    """An operator compromise exposes the workload verbs only in the listed namespaces (not kube-system)."""
    docs = render(VARIANTS["cluster-list"])
    (crb,) = by_kind(docs, "ClusterRoleBinding")
    cluster_role = next(d for d in by_kind(docs, "ClusterRole") if d["metadata"]["name"] == crb["roleRef"]["name"])
    assert {v for r in cluster_role["rules"] for v in r["verbs"]} == {"list", "watch"}, cluster_role["rules"]
    assert sorted(r for rule in cluster_role["rules"] for r in rule["resources"]) == ["customresourcedefinitions", "namespaces"]
    bindings = by_kind(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["ml-a", "ml-b"]
    workload = next(d for d in by_kind(docs, "ClusterRole") if d["metadata"]["name"] == bindings[0]["roleRef"]["name"])
    assert all(b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": workload["metadata"]["name"]}
               for b in bindings)
    assert {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]} in workload["rules"]
    # Globs cannot be bound ahead of time: they keep the ClusterRoleBinding (docs/install.md says so).
    globbed = render(VARIANTS["cluster-globs"])
    assert [d["roleRef"]["name"] for d in by_kind(globbed, "ClusterRoleBinding")] == ["kiln"] and not by_kind(globbed, "RoleBinding")


def test_namespaced_scope_grants_only_reads_cluster_wide(render: Any) -> None:
    docs = render(VARIANTS["namespaced"])
    (observer,) = by_kind(docs, "ClusterRole")
    assert observer["metadata"]["name"] == "kiln-observer"
    assert {v for r in observer["rules"] for v in r["verbs"]} == {"list", "watch"}
    assert sorted(r for rule in observer["rules"] for r in rule["resources"]) == ["customresourcedefinitions", "namespaces"]
    assert by_kind(docs, "ClusterRoleBinding")[0]["roleRef"]["name"] == "kiln-observer"
    roles, bindings = by_kind(docs, "Role"), by_kind(docs, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml-a", "ml-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["ml-a", "ml-b"]
    for b in bindings:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "kiln", "namespace": "kiln-system"}]
    cluster_role = by_kind(render(), "ClusterRole")[0]
    cluster_only = [r for r in cluster_role["rules"] if r not in roles[0]["rules"]]
    assert cluster_only == [{"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]}]
    (dep,) = by_kind(docs, "Deployment")
    assert env_of(dep)["KILN_NAMESPACES"] == "ml-a,ml-b"


def test_peering_and_standby(render: Any) -> None:
    docs = render(VARIANTS["peering-standby"])
    active, standby = by_kind(docs, "Deployment")
    assert active["metadata"]["name"] == "kiln" and standby["metadata"]["name"] == "kiln-standby"
    assert env_of(active)["KILN_PEERING"] == env_of(standby)["KILN_PEERING"] == "kiln"
    assert int(env_of(active)["KILN_PRIORITY"]) > int(env_of(standby)["KILN_PRIORITY"])
    assert active["spec"]["selector"] != standby["spec"]["selector"]
    assert sorted(d["metadata"]["name"] for d in by_kind(docs, "CustomResourceDefinition")) == [
        "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev", "modeldeployments.kiln.dev", "trainingjobs.kiln.dev"]
    for crd in by_kind(docs, "CustomResourceDefinition"):
        if crd["spec"]["group"] == "kopf.dev":
            assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
            assert crd_schema(crd)["properties"]["status"]["x-kubernetes-preserve-unknown-fields"] is True
    (peering,) = by_kind(docs, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "kiln"
    # `helm template` cannot see the CRD in a cluster: the object comes as a post-install hook Helm can adopt later.
    assert peering["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    assert peering["metadata"]["annotations"]["meta.helm.sh/release-name"] == "kiln"
    (role,) = by_kind(docs, "ClusterRole")
    assert {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings"], "verbs": ["get", "list", "watch", "patch"]} in role["rules"]
    no_crds = render({**VARIANTS["peering-standby"], "peering.installCRDs": False})
    assert all(d["spec"]["group"] != "kopf.dev" for d in by_kind(no_crds, "CustomResourceDefinition"))


def test_namespaced_peering(render: Any) -> None:
    docs = render(VARIANTS["namespaced-peering"])
    (peering,) = by_kind(docs, "KopfPeering")
    assert peering["metadata"]["namespace"] == "ml-a"
    (role,) = by_kind(docs, "Role")
    assert {"apiGroups": ["kopf.dev"], "resources": ["kopfpeerings"], "verbs": ["get", "list", "watch", "patch"]} in role["rules"]


def test_service_pull_secrets_images_scheduling(render: Any) -> None:
    docs = render({**VARIANTS["service-and-scheduling"], **VARIANTS["pull-secrets-and-images"]})
    (svc,) = [s for s in by_kind(docs, "Service") if not s["metadata"]["name"].endswith("-metrics")]
    assert svc["spec"]["type"] == "NodePort" and svc["spec"]["ports"][0]["targetPort"] == "health"
    (dep,) = by_kind(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert pod["imagePullSecrets"] == [{"name": "regcred"}] and pod["priorityClassName"] == "system-cluster-critical"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"} and pod["tolerations"][0]["key"] == "dedicated"
    assert "nodeAffinity" in pod["affinity"]
    c = pod["containers"][0]
    assert c["image"] == "ghcr.io/kiln-dev/kiln-operator:0.2.0" and c["imagePullPolicy"] == "Always"
    assert c["args"] == ["--all-namespaces", "--verbose"]
    env = env_of(dep)
    assert env["KILN_TRAINER_IMAGE"] == "registry.local/trainer:gpu" and env["KILN_SERVER_IMAGE"] == "registry.local/server:1.0"
    assert env["KILN_IMAGE_PULL_POLICY"] == "Always"
    assert dep["spec"]["template"]["metadata"]["labels"]["team"] == "ml"
    digest = by_kind(render(VARIANTS["digest"]), "Deployment")[0]
    assert digest["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/kiln-dev/kiln-operator@sha256:" + "ab" * 32


def test_existing_service_account_without_rbac(render: Any) -> None:
    docs = render(VARIANTS["no-rbac-own-sa"])
    assert not by_kind(docs, "ServiceAccount") and not by_kind(docs, "ClusterRole") and not by_kind(docs, "Role")
    assert by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


BAD_VALUES = [
    ({"scope": "everywhere"}, "scope must be one of"),
    ({"bogus": 1}, "Additional property bogus is not allowed"),
    ({"image.pullPolicy": "Sometimes"}, "pullPolicy"),
    ({"image.extra": "x"}, "Additional property extra is not allowed"),
    ({"operator.reconcileInterval": 0}, "reconcileInterval"),
    ({"operator.reconcileInterval": "5"}, "reconcileInterval"),
    ({"operator.healthPort": 80}, "healthPort"),
    ({"peering.priority": -1}, "priority"),
    ({"service.type": "ExternalName"}, "service.type"),
    ({"imagePullSecrets": ["regcred"]}, "imagePullSecrets"),
    ({"tolerations": [{"key": "a", "operator": "Maybe"}]}, "operator"),
    ({"watchNamespaces": ["Bad_NS"]}, "watchNamespaces"),
    ({"image.digest": "md5:abc"}, "digest"),
    ({"scope": "namespaced"}, "scope=namespaced needs at least one namespace"),
    ({"scope": "namespaced", "watchNamespaces": ["team-*"]}, "needs exact namespace names"),
    ({"standby.enabled": True}, "standby.enabled needs peering.enabled=true"),
    ({"standby.enabled": True, "peering.enabled": True, "standby.priority": 100}, "standby.priority must be lower"),
    ({"operator.watchClientTimeout": 100}, "watchClientTimeout must be greater"),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES, ids=[m for _, m in BAD_VALUES])
def test_bad_values_are_refused(helm: Any, values: dict[str, Any], message: str) -> None:
    args = [a for k, v in values.items() for a in ("--set-json", f"{k}={json.dumps(v)}")]
    proc = helm("template", "kiln", str(CHART), *args, check=False)
    assert proc.returncode != 0, f"accepted {values}"
    assert message in proc.stderr, proc.stderr


def test_schema_is_strict_everywhere() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node: dict[str, Any], where: str) -> None:
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, where
            for key, sub in node["properties"].items():
                walk(sub, f"{where}.{key}")

    walk(schema, "values")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(values, schema)


def test_every_value_has_a_comment() -> None:
    """Every key in values.yaml has a comment; the contents of a free-form map value (resources) belong to it."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9]*):(.*)$", line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3).strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if any(parent == "resources" for _, parent in stack):
            continue
        stack.append((indent, key))
        previous = lines[i - 1].strip() if i else ""
        is_section = not rest and i + 1 < len(lines) and lines[i + 1].startswith(" " * (indent + 2)) and key != "resources"
        assert is_section or previous.startswith("#"), f"values.yaml line {i + 1} has no comment: {line}"


def test_chart_crds_equal_generated_crds() -> None:
    top = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    chart = sorted(p.name for p in (CHART / "crds").glob("*"))
    assert top == chart == ["modeldeployments.yaml", "trainingjobs.yaml"]
    for name in top:
        assert (ROOT / "crds" / name).read_bytes() == (CHART / "crds" / name).read_bytes(), name


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["appVersion"] == "0.1.0" and chart["kubeVersion"].startswith(">=1.20")


def test_operator_dockerfile() -> None:
    text = (ROOT / "images" / "operator" / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.\d+-slim", text, re.M) and "FROM ${PYTHON_IMAGE}" in text
    assert ".[operator]" in text and "[trainer" not in text and "[server" not in text
    assert re.search(r"^USER 65532(:65532)?$", text, re.M)
    assert 'ENTRYPOINT ["kiln", "operator"]' in text
    assert "PYTHONDONTWRITEBYTECODE=1" in text
    dockerignore = Path(ROOT / "images" / "operator" / "Dockerfile.dockerignore")
    assert dockerignore.exists() and ".venv" in dockerignore.read_text()
