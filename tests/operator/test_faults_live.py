"""Faults: the operator SIGKILLed at random moments, the API server restarted; status must converge to the truth."""

from __future__ import annotations

import json
import random
from typing import Any

import kubelet
import pytest
from kubelet import eventually
from test_trainingjob_live import API, SUMMARY, create, jobs, manifest, wait_phase

pytestmark = [pytest.mark.live, pytest.mark.slow]


def tjs(api: Any, ns: str) -> dict[str, dict[str, Any]]:
    return {t["metadata"]["name"]: t for t in api.list_objects(API, "TrainingJob", ns)}


def test_random_sigkills_across_fifty_lifecycles(api: Any, solo_operator: Any) -> None:
    op, ns = solo_operator
    rng = random.Random(20261129)
    names = [f"life-{i:02d}" for i in range(50)]
    fate = {n: rng.choice(["succeed", "fail", "oom"]) for n in names}
    op.start()
    # Create in waves; between waves and during the kubelet's work, kill -9 the operator at random points.
    for wave in range(5):
        for n in names[wave * 10:(wave + 1) * 10]:
            create(api, ns, manifest(n))
        if rng.random() < 0.8:
            op.kill()
            op.start()
    pods_by_tj: dict[str, dict[str, Any]] = {}

    def all_pods() -> bool:
        for n in names:
            if n not in pods_by_tj:
                ps = kubelet.pods(ns, f"kiln.dev/trainingjob={n}")
                if ps:
                    pods_by_tj[n] = ps[0]
        return len(pods_by_tj) == len(names)

    eventually(all_pods, 120, interval=0.5, what="one pod per TrainingJob")
    for i, n in enumerate(names):
        pod = pods_by_tj[n]
        kubelet.run(pod)
        if fate[n] == "succeed":
            kubelet.succeed(pod, {**SUMMARY, "modelUri": f"pvc://models/{n}/model.onnx"})
        elif fate[n] == "fail":
            kubelet.fail(pod, 2, json.dumps({"error": f"{n}: bad data"}))
        else:
            kubelet.oom(pod)
        if i % 12 == 5:
            op.kill()
            op.start()
    expected = {"succeed": ("Succeeded", "Succeeded"), "fail": ("Failed", "Error"), "oom": ("Failed", "OOMKilled")}

    def converged() -> list[str] | None:
        now = tjs(api, ns)
        wrong = [n for n in names if ((now[n].get("status") or {}).get("phase"), (now[n].get("status") or {}).get("reason")) != expected[fate[n]]]
        return None if wrong else names

    try:
        eventually(converged, 120, interval=0.5, what="every status to converge")
    except AssertionError:
        now = tjs(api, ns)
        wrong = {n: ((now[n].get("status") or {}).get("phase"), (now[n].get("status") or {}).get("reason"), fate[n]) for n in names
                 if ((now[n].get("status") or {}).get("phase"), (now[n].get("status") or {}).get("reason")) != expected[fate[n]]}
        raise AssertionError(f"not converged: {wrong}") from None
    all_jobs = jobs(api, ns)
    owners = [j["metadata"]["ownerReferences"][0]["name"] for j in all_jobs]
    assert sorted(owners) == sorted(names), "exactly one Job per TrainingJob"
    for n in names:
        if fate[n] == "succeed":
            assert tjs(api, ns)[n]["status"]["result"]["modelUri"] == f"pvc://models/{n}/model.onnx"


def test_api_server_restart_while_jobs_run(api: Any, control_plane: Any, operator: Any, namespace: str) -> None:
    create(api, namespace, manifest("outage"))
    pod = kubelet.wait_pods(namespace, "kiln.dev/trainingjob=outage")[0]
    kubelet.run(pod)
    wait_phase(api, namespace, "outage", "Running")
    before = operator.metrics()
    control_plane.restart_apiserver(with_etcd=True)
    # Reality moves on right after the outage; the operator must reconnect and notice.
    eventually(lambda: kubelet.succeed(pod, SUMMARY), 30, what="pod status patch after the restart")
    st = wait_phase(api, namespace, "outage", "Succeeded", timeout=120)["status"]
    assert st["result"]["onnxSha256"] == SUMMARY["onnxSha256"]
    # And new work is still picked up.
    create(api, namespace, manifest("after"))
    eventually(lambda: len(jobs(api, namespace)) == 2, 60, what="a Job for a TrainingJob created after the outage")
    # The outage shows in /metrics: watches started again (re-established, or Kopf restarted in-process).
    after = operator.metrics()

    def total(samples: dict[Any, float], name: str, pred: Any = lambda labels: True) -> float:
        return sum(v for (n, labels), v in samples.items() if n == name and pred(dict(labels)))

    again = (total(after, "kiln_operator_watch_starts_total") + total(after, "kiln_operator_watch_restarts_total")
             - total(before, "kiln_operator_watch_starts_total") - total(before, "kiln_operator_watch_restarts_total"))
    assert again > 0 or total(after, "kiln_operator_restarts_total") > total(before, "kiln_operator_restarts_total")
