"""Parallel trials (spec.tuning.parallelism) on the real control plane with the real operator; the test plays the
kubelet (and, for the Indexed form that a 1.20 job controller cannot run, the completion indexes)."""

from __future__ import annotations

import json
import re
from typing import Any

import kubelet
import pytest
from kubelet import eventually
from test_trainingjob_live import SUMMARY, create, events, jobs, manifest, tj, wait_phase

from kiln import tuning
from kiln.spec import Tuning

pytestmark = [pytest.mark.live]

TRIAL = "kiln.dev/trial"
GRID = {"algorithm": "grid", "metric": "val_loss", "parallelism": 2,
        "parameters": {"training.optimizer.learningRate": [0.001, 0.01], "model.layers[0].units": [4, 16]}}


def report(index: int, params: dict[str, Any], metric: str, value: float) -> dict[str, Any]:
    """What kiln_trainer.tuning.run_trial writes as a trial pod's termination message."""
    return {"trial": index, "parameters": params, "metrics": {metric: value, "loss": 0.1}, "score": value}


def env_of(obj: dict[str, Any]) -> dict[str, Any]:
    """A Job's (or a pod's) trainer environment: name -> value or valueFrom."""
    pod = obj["spec"]["template"]["spec"] if "template" in obj["spec"] else obj["spec"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["containers"][0]["env"]}


def trial_jobs(api: Any, ns: str) -> list[dict[str, Any]]:
    return [j for j in jobs(api, ns) if TRIAL in (j["metadata"].get("labels") or {})]


def final_job(api: Any, ns: str, name: str) -> dict[str, Any]:
    return eventually(lambda: next((j for j in jobs(api, ns) if j["metadata"]["name"] == f"{name}-train"), None), 30,
                      what=f"the training Job {name}-train")


def fresh(pod: dict[str, Any]) -> bool:
    return not (pod.get("status") or {}).get("containerStatuses")


def test_trials_run_as_parallel_jobs_and_the_best_is_trained(api: Any, operator: Any, namespace: str, kubectl: Any) -> None:
    """The 1.20 control plane has no Indexed Jobs: one Job per trial, at most `parallelism` unfinished at once."""
    create(api, namespace, manifest("search", tuning=GRID, training={"epochs": 3, "seed": 3}))
    plan = tuning.plan(Tuning.from_dict(GRID), 3)
    losses = {0: 0.5, 1: 0.2, 3: 0.35}  # trial 2 is OOM-killed
    terminated: set[int] = set()
    most = 0

    def kubelet_step() -> bool:
        nonlocal most
        made = trial_jobs(api, namespace)
        unfinished = len(made) - len(terminated)
        most = max(most, unfinished)
        assert unfinished <= 2, f"{unfinished} trials unfinished at once: {[j['metadata']['name'] for j in made]}"
        for pod in kubelet.pods(namespace, f"kiln.dev/trainingjob=search,{TRIAL}"):
            index = int(pod["metadata"]["labels"][TRIAL])
            if index in terminated or not fresh(pod):
                continue
            assert env_of(pod)["KILN_TRIAL_INDEX"] == str(index)
            kubelet.run(pod)
            if index == 2:
                kubelet.oom(pod)
            else:
                kubelet.succeed(pod, report(index, plan[index], "val_loss", losses[index]))
            terminated.add(index)
            return False  # one trial per step: the limit is checked in between
        return len(terminated) == 4

    eventually(kubelet_step, 90, what="every trial to run")
    assert most == 2
    assert sorted(j["metadata"]["name"] for j in trial_jobs(api, namespace)) == [f"search-trial-{i}" for i in range(4)]
    job = final_job(api, namespace, "search")
    assert env_of(job)["KILN_TUNING_BEST"] == "1" and "KILN_TRIAL_INDEX" not in env_of(job)
    st = tj(api, namespace, "search")["status"]["tuning"]
    assert (st["mode"], st["total"], st["failed"], st["seed"]) == ("JobPerTrial", 4, 1, 3)
    assert [t["trial"] for t in st["trials"]] == [0, 1, 2, 3] and [t["parameters"] for t in st["trials"]] == plan
    assert (st["best"], st["bestScore"], st["bestParameters"]) == (1, 0.2, plan[1])
    oom = st["trials"][2]
    assert (oom["phase"], oom["reason"]) == ("Failed", "OOMKilled") and "score" not in oom
    wide = kubectl("get", "tj", "search", "-o", "wide", namespace=namespace).stdout.splitlines()
    at = wide[0].index("BEST")  # columns start where their header does (empty cells make split() unreliable)
    assert wide[1][at:].split()[0] == "0.2", f"kubectl shows the best score: {wide}"

    pod = next(p for p in kubelet.wait_pods(namespace, f"kiln.dev/trainingjob=search,!{TRIAL}"))
    kubelet.run(pod)
    kubelet.succeed(pod, SUMMARY)
    done = wait_phase(api, namespace, "search", "Succeeded")
    assert done["status"]["jobName"] == "search-train" and done["status"]["tuning"]["best"] == 1
    reasons = eventually(lambda: (lambda r: r if {"TuningStarted", "TrialFailed", "TuningFinished", "Succeeded"} <= r else None)(
        {e["reason"] for e in events(api, namespace, "search")}), what="the search's events")
    assert reasons
    started = next(e for e in events(api, namespace, "search") if e["reason"] == "TuningStarted")["message"]
    assert re.search(r"4 trials, at most 2 at once, as one Job per trial \(JobPerTrial: the API server \(v1\.20", started), started


def test_all_trials_failing_fails_the_search(api: Any, operator: Any, namespace: str) -> None:
    spec = {**GRID, "parameters": {"training.optimizer.learningRate": [0.001, 0.01]}}
    create(api, namespace, manifest("doomed", tuning=spec))
    seen: set[str] = set()

    def fail_each() -> bool:
        for pod in kubelet.pods(namespace, f"kiln.dev/trainingjob=doomed,{TRIAL}"):
            if pod["metadata"]["name"] not in seen:
                kubelet.fail(pod, 2, json.dumps({"trial": 0, "error": "boom", "field": None}))
                seen.add(pod["metadata"]["name"])
        return len(seen) == 2

    eventually(fail_each, 60, what="both trials to fail")
    failed = wait_phase(api, namespace, "doomed", "Failed", "TuningFailed")
    assert failed["status"]["message"].startswith("all 2 trials failed: trial 0: Error: container trainer exited with code 2: boom")
    assert not [j for j in jobs(api, namespace) if j["metadata"]["name"] == "doomed-train"]


def test_forced_indexed_trials(api: Any, solo_operator: Any) -> None:
    """`--trial-mode indexed`: one Job of every trial. The 1.20 API server drops completionMode and its job
    controller names no completion index, so the test writes the index on each pod as a 1.21+ one would."""
    op, ns = solo_operator
    op.extra = ["--trial-mode", "indexed"]
    op.start()
    spec = {"algorithm": "random", "trials": 3, "metric": "val_accuracy", "parallelism": 2,
            "parameters": {"training.optimizer.learningRate": {"min": 1e-4, "max": 1e-1, "log": True}}}
    create(api, ns, manifest("idx", tuning=spec, training={"seed": 11}))
    plan = tuning.plan(Tuning.from_dict(spec), 11)
    job = eventually(lambda: next(iter(trial_jobs(api, ns)), None), 30, what="the trials Job")
    assert job["metadata"]["name"] == "idx-trials" and job["metadata"]["labels"][TRIAL] == "indexed"
    assert (job["spec"]["completions"], job["spec"]["parallelism"], job["spec"]["backoffLimit"]) == (3, 2, 2)
    assert env_of(job)["KILN_TRIAL_INDEX"] == {"fieldRef": {"apiVersion": "v1", "fieldPath":
                                                            "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    version = api.server_version()["gitVersion"]
    if re.match(r"v1\.20\.", version):
        assert "completionMode" not in job["spec"], "1.20 drops the field it does not know"
    accuracy = {0: None, 1: 0.7, 2: 0.9}  # trial 0 fails for its values (its pod exits 0 and says so)
    given: dict[str, int] = {}

    def kubelet_step() -> bool:
        for pod in kubelet.pods(ns, f"kiln.dev/trainingjob=idx,{TRIAL}"):
            name = pod["metadata"]["name"]
            if name in given:
                continue
            index = given[name] = len(given)
            api.call("PATCH", api.path("v1", "Pod", ns, name),
                     {"metadata": {"annotations": {"batch.kubernetes.io/job-completion-index": str(index)}}},
                     content_type="application/merge-patch+json")
            kubelet.run(pod)
            value = accuracy[index]
            kubelet.succeed(pod, report(index, plan[index], "val_accuracy", value) if value is not None else
                            {"trial": index, "parameters": plan[index], "error": "training diverged", "field": "spec.training.optimizer"})
        return len(given) == 3

    eventually(kubelet_step, 60, what="three trial pods")
    final = final_job(api, ns, "idx")
    assert env_of(final)["KILN_TUNING_BEST"] == "2"
    st = wait_phase(api, ns, "idx", "Pending")["status"]  # the training Job's pod waits
    assert (st["phase"], st["tuning"]["mode"], st["tuning"]["best"], st["tuning"]["failed"]) == ("Pending", "IndexedJob", 2, 1)
    assert st["tuning"]["trials"][0]["reason"] == "TrialFailed"
    assert st["tuning"]["trials"][0]["message"] == "spec.training.optimizer: training diverged"


def test_trial_pods_are_held_to_the_admins_policy(api: Any, solo_operator: Any) -> None:
    """The trials run the TrainingJob's spec: the policy check that guards the training Job guards them too."""
    from support.cluster import OPEN_POLICY

    op, ns = solo_operator
    op.policy = {**OPEN_POLICY, "images": {"allowedPrefixes": ["kiln-trainer:"]}}
    op.start()
    create(api, ns, manifest("sneaky", tuning=GRID, image="elsewhere.example/miner:1"))
    failed = wait_phase(api, ns, "sneaky", "Failed", "PolicyViolation")
    assert "elsewhere.example/miner:1" in failed["status"]["message"]
    assert not jobs(api, ns) and api.get("v1", "ServiceAccount", ns, "sneaky-trainer") is None


def test_a_killed_operator_resumes_the_search_without_a_second_job(api: Any, solo_operator: Any) -> None:
    """SIGKILL between trials: the restarted operator rebuilds the search from the Jobs and pods, starts the next
    trial, records every one once, and makes one training Job."""
    op, ns = solo_operator
    op.start()
    spec = {**GRID, "parameters": {"model.layers[0].units": [4, 8, 16]}}  # 3 trials, 2 at once
    create(api, ns, manifest("resume", tuning=spec, training={"seed": 5}))
    plan = tuning.plan(Tuning.from_dict(spec), 5)

    def trial_pod(index: int) -> dict[str, Any]:
        return kubelet.wait_pods(ns, f"kiln.dev/trainingjob=resume,{TRIAL}={index}")[0]

    def finish(pod: dict[str, Any], index: int) -> None:
        kubelet.run(pod)
        kubelet.succeed(pod, report(index, plan[index], "val_loss", [0.4, 0.3, 0.5][index]))

    first, second = trial_pod(0), trial_pod(1)
    finish(first, 0)
    third = trial_pod(2)  # started as trial 0 finished
    op.kill()  # trials 1 and 2 finish while no operator runs
    finish(second, 1)
    finish(third, 2)
    op.start()
    job = final_job(api, ns, "resume")
    assert env_of(job)["KILN_TUNING_BEST"] == "1"
    made = trial_jobs(api, ns)
    assert sorted(j["metadata"]["name"] for j in made) == ["resume-trial-0", "resume-trial-1", "resume-trial-2"]
    assert len(kubelet.pods(ns, f"kiln.dev/trainingjob=resume,{TRIAL}")) == 3, "one pod per trial: nothing re-run"
    st = wait_phase(api, ns, "resume", "Pending")["status"]["tuning"]
    assert [t["trial"] for t in st["trials"]] == [0, 1, 2] and st["best"] == 1
    assert len([j for j in jobs(api, ns) if j["metadata"]["name"] == "resume-train"]) == 1
    said = [e["message"].split()[1] for e in events(api, ns, "resume") if e["reason"] == "TrialSucceeded"]
    assert len(said) == len(set(said)) and {"1", "2"} <= set(said), f"each trial's event at most once: {said}"


def test_an_edit_during_the_search_is_flagged_and_starts_no_training_job(api: Any, operator: Any, namespace: str) -> None:
    """Turning the search off mid-way (parallelism 1, or no tuning) must not start `<name>-train` from the edited
    spec next to the running trials: the search goes on with the spec it started with, and the edit is flagged."""
    create(api, namespace, manifest("edited", tuning=GRID, training={"seed": 4}))
    eventually(lambda: len(trial_jobs(api, namespace)) == 2, 60, what="two trial Jobs")
    api.call("PATCH", api.path("kiln.dev/v1alpha1", "TrainingJob", namespace, "edited"),
             {"spec": {"tuning": {"parallelism": 1}}}, content_type="application/merge-patch+json")

    def flagged() -> dict[str, Any] | None:
        conds = {c["type"]: c for c in tj(api, namespace, "edited")["status"].get("conditions") or []}
        return conds.get("SpecChangeIgnored")

    cond = eventually(flagged, 60, what="SpecChangeIgnored")
    assert cond["status"] == "True" and "spec.tuning.parallelism changed after Job edited-trial-0 was created" in cond["message"], cond
    assert not [j for j in jobs(api, namespace) if j["metadata"]["name"] == "edited-train"]
    # The search carries on with its recorded spec: finishing the two running trials starts the next two.
    plan = tuning.plan(Tuning.from_dict(GRID), 4)
    for pod in kubelet.wait_pods(namespace, f"kiln.dev/trainingjob=edited,{TRIAL}", count=2):
        index = int(pod["metadata"]["labels"][TRIAL])
        kubelet.run(pod)
        kubelet.succeed(pod, report(index, plan[index], "val_loss", 0.5 - 0.1 * index))
    eventually(lambda: len(trial_jobs(api, namespace)) == 4, 60, what="the next two trials of the recorded spec")
    assert not [j for j in jobs(api, namespace) if j["metadata"]["name"] == "edited-train"]
