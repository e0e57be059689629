"""Parallel trials on a real node (Kubernetes 1.20: no Indexed Jobs, so one Job per trial): real trainer pods
train each trial of a small grid on digits, at most `parallelism` at once, then the best is trained and exported."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from support.node import Kube, Volumes
from test_node import TJ, digits_claims, quickstart_docs, training, wait_finished

pytestmark = [pytest.mark.e2e]


def test_parallel_trials_train_for_real_and_the_best_is_exported(kube: Kube, namespace: str, volumes: Volumes) -> None:
    _, models = digits_claims(volumes, namespace)
    tj, _ = quickstart_docs()
    train = {k: v for k, v in tj["spec"]["training"].items() if k != "earlyStopping"}
    spec = {**tj["spec"], "training": {**train, "epochs": 2},
            "output": {"uri": "pvc://kiln-models/search"},
            "tuning": {"algorithm": "grid", "metric": "val_accuracy", "parallelism": 2,
                       "parameters": {"model.layers[0].units": [4, 16, 64]}}}
    most: list[int] = [0]
    done = threading.Event()

    def sample() -> None:  # how many trial pods run at once, seen from outside
        while not done.is_set():
            pods = kube.items("pods", namespace, "kiln.dev/trainingjob=search,kiln.dev/trial")
            most[0] = max(most[0], sum(1 for p in pods if p["status"].get("phase") in ("Pending", "Running")))
            done.wait(1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    kube.apply(training(namespace, "search", spec))
    try:
        status = wait_finished(kube, namespace, "search", 900)
    finally:
        done.set()
        sampler.join(10)
    logs = kube.run("logs", "-l", "kiln.dev/trainingjob=search", "--tail=5", namespace=namespace, check=False).stdout
    assert status["phase"] == "Succeeded", (status, logs)
    st = status["tuning"]
    assert (st["mode"], st["total"], st["failed"], len(st["trials"])) == ("JobPerTrial", 3, 0, 3), st
    scores = [t["score"] for t in st["trials"]]
    assert all(t["phase"] == "Succeeded" and t["score"] == t["metrics"]["val_accuracy"] for t in st["trials"]), st
    assert st["best"] == max(range(3), key=lambda i: (scores[i], -i)) and st["bestScore"] == scores[st["best"]]
    assert 1 <= most[0] <= 2, f"at most 2 trial pods at once, saw {most[0]}"
    jobs = {j["metadata"]["name"]: j for j in kube.items("jobs", namespace, "kiln.dev/trainingjob=search")}
    assert set(jobs) == {"search-trial-0", "search-trial-1", "search-trial-2", "search-train"}
    env = {e["name"]: e.get("value") for e in jobs["search-train"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KILN_TUNING_BEST"] == str(st["best"])
    # The exported model is the best trial trained again: same seed, same values, same held-out accuracy.
    assert status["result"]["metrics"]["val_accuracy"] == pytest.approx(st["bestScore"], abs=1e-6)
    saved: dict[str, Any] = json.loads((models / "search" / "tuning.json").read_text())
    assert (saved["best"], saved["bestParameters"]) == (st["best"], st["bestParameters"])
    assert (models / "search" / "model.onnx").exists()
    events = json.loads(kube.run("get", "events", "-o", "json", namespace=namespace).stdout)["items"]
    started = [e["message"] for e in events if e["reason"] == "TuningStarted"]
    assert started and "one Job per trial" in started[0], started
    assert kube.status(TJ, "search", namespace)["jobName"] == "search-train"
