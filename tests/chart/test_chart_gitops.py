"""The chart's GitOps and observability parts with the real helm: Argo CD health checks as an argocd-cm
snippet, the metrics Service and the optional ServiceMonitor."""

from __future__ import annotations

from typing import Any

import pytest
from support.argocd import CHECKS, health
from support.chart import CHART

pytestmark = [pytest.mark.helm]


def test_argocd_health_checks_render_under_argo_keys(render: Any) -> None:
    docs = render({"argocd.healthChecks.enabled": True})
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert cm["metadata"]["name"] == "argocd-cm" and cm["metadata"]["namespace"] == "argocd"
    assert sorted(cm["data"]) == ["resource.customizations.health.kiln.dev_ModelDeployment",
                                  "resource.customizations.health.kiln.dev_TrainingJob"]
    for kind in ("TrainingJob", "ModelDeployment"):
        assert cm["data"][f"resource.customizations.health.kiln.dev_{kind}"].strip() == (CHECKS / kind / "health.lua").read_text().strip()
    # What is rendered is what runs: the rendered TrainingJob script judges a failed run Degraded.
    failed = {"kind": "TrainingJob", "metadata": {"generation": 1},
              "status": {"phase": "Failed", "reason": "OOMKilled", "message": "m", "observedGeneration": 1,
                         "conditions": [{"type": "Stalled", "status": "True"}, {"type": "Ready", "status": "False"}]}}
    assert health(failed)["status"] == "Degraded"
    moved = render({"argocd.healthChecks.enabled": True, "argocd.healthChecks.namespace": "gitops",
                    "argocd.healthChecks.configMapName": "argocd-cm"})
    assert [d["metadata"]["namespace"] for d in moved if d["kind"] == "ConfigMap"] == ["gitops"]


def test_health_check_tests_are_not_packaged() -> None:
    ignore = (CHART / ".helmignore").read_text().splitlines()
    assert "health_test.yaml" in ignore and "testdata/" in ignore


def test_metrics_service_and_service_monitor(render: Any) -> None:
    docs = render({"metrics.serviceMonitor.enabled": True, "metrics.serviceMonitor.labels": {"release": "prom"},
                   "metrics.service.annotations": {"prometheus.io/scrape": "true"}, "operator.metricsPort": 9100,
                   "peering.enabled": True, "standby.enabled": True})
    (svc,) = [d for d in docs if d["kind"] == "Service"]
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}]
    assert svc["metadata"]["annotations"] == {"prometheus.io/scrape": "true"}
    assert "kiln.dev/operator-role" not in svc["spec"]["selector"], "the standby's /metrics (leader 0) is scraped too"
    for dep in (d for d in docs if d["kind"] == "Deployment"):
        c = dep["spec"]["template"]["spec"]["containers"][0]
        assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in c["ports"]
        assert {"name": "KILN_METRICS_PORT", "value": "9100"} in c["env"]
    (sm,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    assert sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "metrics"
    assert svc["metadata"]["labels"]["app.kubernetes.io/component"] == "metrics"


@pytest.mark.parametrize(("values", "message"), [
    ({"argocd.healthChecks.enabled": "yes"}, "argocd"),
    ({"argocd.healthChecks.colour": "red"}, "colour"),
    ({"metrics.serviceMonitor.interval": "soon"}, "interval"),
    ({"operator.metricsPort": 80}, "metricsPort"),
    ({"peering.lifetime": 1}, "lifetime"),
])
def test_bad_gitops_values_are_refused(helm: Any, values: dict[str, Any], message: str) -> None:
    import json

    args = [a for k, v in values.items() for a in ("--set-json", f"{k}={json.dumps(v)}")]
    proc = helm("template", "kiln", str(CHART), *args, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
