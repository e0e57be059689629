"""The chart's standby replica, proven on the real control plane: two `kiln operator` processes with Kopf
peering (as the chart runs them: peering.enabled + standby.enabled), the active one SIGKILLed while
TrainingJobs are being created. The standby takes over within the peering lifetime, every TrainingJob
gets exactly one Job, and every status converges. The takeover time is measured and printed
(docs/reliability.md records it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import kubelet
import pytest
import yaml
from kubelet import eventually
from support.chart import CHART
from support.cluster import OperatorProcess
from test_trainingjob_live import API, SUMMARY, create, manifest

pytestmark = [pytest.mark.live]

LIFETIME = 10
"""Seconds a silent peer counts as alive (chart: peering.lifetime; Kopf's default is 60)."""
COUNT = 24


def install_peering_crds(tools: Path, kubectl: Any, tmp_path: Path) -> None:
    """The chart's own copy of Kopf's peering CRDs, rendered by the real helm."""
    env = {**os.environ, **{k: str(tmp_path / "helm") for k in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME")}}
    rendered = subprocess.run([str(tools / "helm"), "template", "kiln", str(CHART), "--set", "peering.enabled=true",
                               "--show-only", "templates/kopf-peering-crds.yaml"], text=True, capture_output=True, env=env,
                              check=True, timeout=120).stdout
    kubectl("apply", "-f", "-", input=rendered)
    for doc in yaml.safe_load_all(rendered):
        if doc:
            kubectl("wait", "--for=condition=Established", f"crd/{doc['metadata']['name']}", "--timeout=60s")


def peer(control_plane: Any, ns: str, log: Path, priority: int) -> OperatorProcess:
    return OperatorProcess(control_plane.kubeconfig, [ns], log,
                           extra=["--peering", "kiln-ha", "--priority", str(priority), "--peering-lifetime", str(LIFETIME)])


def leader(op: OperatorProcess) -> float:
    return next((v for (n, _), v in op.metrics().items() if n == "kiln_operator_leader"), -1.0)


def test_standby_takes_over_after_sigkill(api: Any, kubectl: Any, tools: Path, control_plane: Any,
                                          solo_operator: Any, tmp_path: Path) -> None:
    _, ns = solo_operator  # a namespace of its own (the session operator leaves kiln-solo-* alone)
    install_peering_crds(tools, kubectl, tmp_path)
    api.call("POST", f"/apis/kopf.dev/v1/namespaces/{ns}/kopfpeerings",
             {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "kiln-ha"}})
    active = peer(control_plane, ns, tmp_path / "active.log", 100).start()
    standby = peer(control_plane, ns, tmp_path / "standby.log", 50).start()
    try:
        try:
            eventually(lambda: leader(standby) == 0, 30, what="the standby to pause in favour of the active replica")
        except AssertionError as exc:
            peering = api.call("GET", f"/apis/kopf.dev/v1/namespaces/{ns}/kopfpeerings/kiln-ha")
            raise AssertionError(f"{exc}\npeering: {peering}\nstandby log: {standby.log.read_text()[-3000:]}"
                                 f"\nactive log: {active.log.read_text()[-3000:]}") from None
        assert leader(active) == 1

        created: dict[str, float] = {}
        killed: dict[str, float] = {}

        def create_all() -> None:
            for i in range(COUNT):
                name = f"ha-{i:02d}"
                create(api, ns, manifest(name, runPolicy={"backoffLimit": 0}))
                created[name] = time.monotonic()
                if i == COUNT // 3:
                    active.kill(signal.SIGKILL)
                    killed["at"] = time.monotonic()
                time.sleep(0.25)

        creator = threading.Thread(target=create_all)
        creator.start()
        creator.join(timeout=120)
        assert not creator.is_alive()

        took_over = eventually(lambda: time.monotonic() if leader(standby) == 1 else None, LIFETIME + 20, interval=0.1,
                               what="the standby to take over")
        takeover = took_over - killed["at"]

        def jobs_by_owner() -> Counter[str] | None:
            owners = Counter(ref["name"] for job in api.list_objects("batch/v1", "Job", ns)
                             for ref in job["metadata"].get("ownerReferences") or [] if ref["kind"] == "TrainingJob")
            return owners if len(owners) == COUNT else None

        owners = eventually(jobs_by_owner, LIFETIME + 30, what=f"a Job for each of {COUNT} TrainingJobs")
        all_jobs = time.monotonic() - killed["at"]
        first_after = min(t for n, t in created.items() if t > killed["at"])
        assert set(owners.values()) == {1}, f"TrainingJobs with more than one Job: {owners}"
        print(f"\nstandby takeover: {takeover:.1f} s after SIGKILL (peering lifetime {LIFETIME} s); "
              f"{sum(1 for t in created.values() if t > killed['at'])} TrainingJobs were created after the kill, "
              f"first {first_after - killed['at']:.1f} s after it; all {COUNT} Jobs existed {all_jobs:.1f} s after the kill")
        assert takeover <= LIFETIME + 5, f"takeover took {takeover:.1f} s"

        # Statuses converge: every run is driven to success by the test kubelet and reported Succeeded.
        for pod in kubelet.wait_pods(ns, "kiln.dev/trainingjob", COUNT, timeout=60):
            kubelet.run(pod)
            kubelet.succeed(pod, SUMMARY)

        def all_succeeded() -> list[dict[str, Any]] | None:
            items = api.list_objects(API, "TrainingJob", ns)
            return items if len(items) == COUNT and all((t.get("status") or {}).get("phase") == "Succeeded" for t in items) else None

        for item in eventually(all_succeeded, 60, what="every TrainingJob Succeeded"):
            conds = {c["type"]: c["status"] for c in item["status"]["conditions"]}
            assert conds["Created"] == conds["Succeeded"] == conds["Ready"] == "True" and conds["Stalled"] == "False"
            assert item["status"]["observedGeneration"] == item["metadata"]["generation"]
        assert len(api.list_objects("batch/v1", "Job", ns)) == COUNT
    finally:
        standby.stop()
        active.stop()
