"""Pure status rules, branch by branch (the live tests show them end to end)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kiln_operator.conditions import fmt_time, set_condition
from kiln_operator.modeldeployment.render import ModelRef, Resolution, resolve_model
from kiln_operator.modeldeployment.status import derive_md_status
from kiln_operator.runtime import subset
from kiln_operator.settings import Features, OperatorSettings
from kiln_operator.trainingjob.status import derive

pytestmark = [pytest.mark.unit]

NOW = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)


def tj(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "t", "generation": 1}, "spec": {"runPolicy": {"backoffLimit": 0, "startTimeoutSeconds": 60}, **spec},
            "status": status or {"jobName": "t-train"}}


def job(*conditions: dict[str, Any], **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "t-train", "uid": "j"}, "spec": {}, "status": {"conditions": list(conditions), **status}}


def pod(phase: str = "Pending", age: int = 0, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "t-train-x", "creationTimestamp": fmt_time(NOW - timedelta(seconds=age))},
            "status": {"phase": phase, **status}}


def waiting(reason: str) -> dict[str, Any]:
    return {"containerStatuses": [{"name": "trainer", "state": {"waiting": {"reason": reason, "message": "m"}}}]}


def test_image_pull_fails_exactly_at_the_start_timeout() -> None:
    before = derive(tj(), job(), [pod(age=59, **waiting("ErrImagePull"))], NOW)
    assert before.status["phase"] == "Pending" and before.status["reason"] == "ErrImagePull" and not before.delete_job
    at = derive(tj(), job(), [pod(age=60, **waiting("ErrImagePull"))], NOW)
    assert at.status["phase"] == "Failed" and at.delete_job and at.event and at.event[0] == "Warning"


def test_unschedulable_without_gpus_is_not_waiting_for_gpu() -> None:
    cond = {"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes: Insufficient cpu"}]}
    assert derive(tj(), job(), [pod(**cond)], NOW).status["reason"] == "Unschedulable"
    assert derive(tj(resources={"gpus": 1}), job(), [pod(**cond)], NOW).status["reason"] == "WaitingForGPU"


def test_terminal_status_is_never_rewritten() -> None:
    done = tj({"phase": "Succeeded", "reason": "Succeeded", "jobName": "t-train"})
    assert derive(done, None, [], NOW).status == {}


def test_a_failed_job_waits_briefly_for_its_pod_then_gives_a_generic_reason() -> None:
    failed = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "lastTransitionTime": fmt_time(NOW - timedelta(seconds=2))}
    assert derive(tj(), job(failed, failed=1), [], NOW).status == {}
    failed["lastTransitionTime"] = fmt_time(NOW - timedelta(seconds=30))
    late = derive(tj(), job(failed, failed=1), [], NOW).status
    assert late["phase"] == "Failed" and late["reason"] == "BackoffLimitExceeded"


def test_success_takes_the_result_from_the_termination_message() -> None:
    complete = {"type": "Complete", "status": "True", "lastTransitionTime": fmt_time(NOW)}
    done = pod("Succeeded", containerStatuses=[{"name": "trainer", "state": {"terminated": {
        "exitCode": 0, "message": '{"modelUri": "pvc://m/model.onnx", "metrics": {"accuracy": 0.9}, "junk": 1}'}}}])
    st = derive(tj(), job(complete, completionTime=fmt_time(NOW)), [done], NOW).status
    assert st["phase"] == "Succeeded" and st["result"] == {"modelUri": "pvc://m/model.onnx", "metrics": {"accuracy": 0.9}}


def test_condition_transition_time_moves_only_on_a_flip() -> None:
    first = set_condition([], "Running", "True", "Running", "a", NOW)
    same = set_condition(first, "Running", "True", "Running", "b", NOW + timedelta(minutes=5))
    flipped = set_condition(same, "Running", "False", "Finished", "c", NOW + timedelta(minutes=9))
    assert same[0]["lastTransitionTime"] == first[0]["lastTransitionTime"] and same[0]["message"] == "b"
    assert flipped[0]["lastTransitionTime"] == fmt_time(NOW + timedelta(minutes=9))


SETTINGS = OperatorSettings(features=Features(hpa_v2=True))


def md(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "m", "namespace": "n", "generation": 1}, "spec": {"model": {"trainingJob": "t"}}, "status": status}


def test_model_resolution() -> None:
    assert resolve_model(md(), None).reason == "TrainingJobNotFound"
    running = {"status": {"phase": "Running", "progress": {"percent": 40}}}
    assert "(40%)" in resolve_model(md(), running).message
    ok = {"status": {"phase": "Succeeded", "result": {"modelUri": "pvc://m/model.onnx", "onnxSha256": "a" * 64}}}
    assert resolve_model(md(), ok).model == ModelRef("pvc://m/model.onnx", "a" * 64, "t", "onnx")
    int8 = md()
    int8["spec"]["model"]["format"] = "onnx-int8"
    res = resolve_model(int8, ok)
    assert res.model is None and res.failed and res.reason == "ModelNotExported"
    gone = md(model={"uri": "pvc://m/model.onnx", "trainingJob": "t", "sha256": "b" * 64})
    kept = resolve_model(gone, None)
    assert kept.model is not None and kept.model.sha256 == "b" * 64 and kept.reason == "TrainingJobNotFound"


def test_deployment_status_maps_to_phases() -> None:
    res = Resolution(ModelRef("pvc://m/model.onnx", "a" * 64, "t"))
    dep = {"metadata": {"generation": 2}, "spec": {"replicas": 2},
           "status": {"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2,
                      "conditions": [{"type": "Available", "status": "True"}, {"type": "Progressing", "status": "True"}]}}
    ready = derive_md_status(md(), res, dep, [], SETTINGS, NOW).status
    assert ready["phase"] == "Ready" and ready["model"]["sha256"] == "a" * 64
    dep["status"]["conditions"][1] = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "timed out"}
    assert derive_md_status(md(), res, dep, [], SETTINGS, NOW).status["reason"] == "ProgressDeadlineExceeded"
    dep["status"]["conditions"][1]["status"] = "True"
    dep["status"]["readyReplicas"] = 1
    crash = pod("Running", containerStatuses=[{"name": "server", "restartCount": 4, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                                               "lastState": {"terminated": {"exitCode": 1, "message": "model.onnx not found"}}}])
    st = derive_md_status(md(), res, dep, [crash], SETTINGS, NOW).status
    assert st["phase"] == "Deploying" and st["reason"] == "CrashLoopBackOff" and "not found" in st["message"]


def test_subset_sees_hand_edits_but_not_defaults() -> None:
    want = {"spec": {"replicas": 1, "ports": [{"port": 80, "name": "http"}], "cpu": "1"}}
    assert subset(want, {"spec": {"replicas": 1, "ports": [{"port": 80, "name": "http", "protocol": "TCP"}], "cpu": "1", "extra": True}})
    assert not subset(want, {"spec": {"replicas": 3, "ports": [{"port": 80, "name": "http"}], "cpu": "1"}})
    assert not subset(want, {"spec": {"replicas": 1, "ports": [{"port": 80, "name": "http"}, {"port": 9, "name": "x"}], "cpu": "1"}})
    assert subset({"n": 1}, {"n": "1"})


# ------------------------------------------------------------------ conditions that tools read (issue 16)

def conds(status: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status["conditions"]}


def test_trainingjob_carries_every_condition_in_every_phase() -> None:
    from kiln_operator.conditions import REASON_PATTERN

    running = derive(tj({"jobName": "t-train", "phase": "Pending"}), job(), [pod("Running", startTime=fmt_time(NOW))], NOW).status
    assert conds(running) == {"Created": "True", "Running": "True", "Succeeded": "False", "Failed": "False",
                              "Ready": "False", "Reconciling": "True", "Stalled": "False"}
    assert running["observedGeneration"] == 1 and all(c["observedGeneration"] == 1 for c in running["conditions"])
    failed = derive(tj({"jobName": "t-train", "phase": "Running", "conditions": running["conditions"]}), job(),
                    [pod(age=60, **waiting("ImagePullBackOff"))], NOW).status
    assert failed["phase"] == "Failed"
    assert conds(failed) == {"Created": "True", "Running": "False", "Succeeded": "False", "Failed": "True",
                             "Ready": "False", "Reconciling": "False", "Stalled": "True"}
    stalled = next(c for c in failed["conditions"] if c["type"] == "Stalled")
    assert stalled["reason"] == "ImagePullBackOff" and stalled["lastTransitionTime"] == fmt_time(NOW)
    assert all(REASON_PATTERN.match(c["reason"]) and c["message"] is not None for c in failed["conditions"])


def test_condition_reasons_are_always_valid() -> None:
    out = set_condition([], "Ready", "False", "not a reason!", "m", NOW)
    assert out[0]["reason"] == "NotReady"
    assert set_condition([], "Ready", "True", "", "m", NOW)[0]["reason"] == "Ready"


def test_one_event_lists_the_conditions_a_write_changes() -> None:
    from kiln_operator.conditions import change_event, changes

    before = set_condition(set_condition([], "Ready", "False", "Running", "r", NOW), "Stalled", "False", "Running", "r", NOW)
    after = set_condition(set_condition(before, "Ready", "False", "OOMKilled", "oom", NOW), "Stalled", "True", "OOMKilled", "oom", NOW)
    event = change_event(changes(before, after))
    assert event is not None and event[0] == "Warning" and event[1] == "ConditionsChanged"
    assert "Ready=False (OOMKilled)" in event[2] and "Stalled=True (OOMKilled)" in event[2]
    assert change_event(changes(after, after)) is None


def test_modeldeployment_is_not_ready_with_a_reason_from_the_start() -> None:
    md = {"metadata": {"name": "m", "namespace": "ns", "generation": 3}, "spec": {"model": {"trainingJob": "t"}}, "status": {}}
    st = derive_md_status(md, resolve_model(md, None), None, [], OperatorSettings(), NOW).status
    assert conds(st) == {"ModelResolved": "False", "CanaryReady": "False", "Available": "False", "Ready": "False", "Reconciling": "True",
                         "Stalled": "False"}
    assert next(c for c in st["conditions"] if c["type"] == "Ready")["reason"] == "TrainingJobNotFound"
    assert st["observedGeneration"] == 3


def succeeded_tj(name: str, sha: str, done: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}, "creationTimestamp": done},
            "status": {"phase": "Succeeded", "completionTime": done,
                       "result": {"modelUri": f"pvc://models/{name}/model.onnx", "onnxSha256": sha}}}


def test_selector_follows_the_newest_succeeded_trainingjob() -> None:
    from kiln_operator.modeldeployment.follow import follows, resolve_followed

    from kiln.labels import selector_matches

    sel = {"matchLabels": {"app": "iris"}, "matchExpressions": [{"key": "stage", "operator": "NotIn", "values": ["dev"]}]}
    md = {"metadata": {"name": "m"}, "spec": {"model": {"trainingJobSelector": sel}}, "status": {}}
    old = succeeded_tj("a", "1" * 64, "2026-11-01T00:00:00Z", {"app": "iris"})
    new = succeeded_tj("b", "2" * 64, "2026-11-02T00:00:00Z", {"app": "iris"})
    dev = succeeded_tj("c", "3" * 64, "2026-11-03T00:00:00Z", {"app": "iris", "stage": "dev"})
    training = {"metadata": {"name": "d", "labels": {"app": "iris"}, "creationTimestamp": "2026-11-04T00:00:00Z"},
                "status": {"phase": "Running"}}
    got = resolve_followed(md, [old, new, dev, training])
    assert got.model is not None and got.model.trainingJob == "b" and got.reason == "NewestSucceeded"
    assert follows(md, training) and not follows(md, {"metadata": {"name": "x", "labels": {"app": "other"}}})
    assert selector_matches({}, {"any": "thing"}) and not selector_matches({"matchExpressions": [{"key": "k", "operator": "Exists"}]}, {})
    nothing = resolve_followed(md, [training])
    assert nothing.model is None and nothing.reason == "TrainingJobNotSucceeded"
    assert resolve_followed(md, []).reason == "NoTrainingJobMatches"


def test_the_previous_model_stays_served_while_a_new_run_trains_or_after_it_failed() -> None:
    from kiln_operator.modeldeployment.follow import resolve_followed

    served = {"uri": "pvc://models/t/model.onnx", "sha256": "1" * 64, "trainingJob": "t", "format": "onnx"}
    md = {"metadata": {"name": "m", "namespace": "ns", "generation": 1}, "spec": {"model": {"trainingJob": "t"}},
          "status": {"model": served, "phase": "Ready"}}
    rerun = {"metadata": {"name": "t"}, "status": {"phase": "Running", "progress": {"percent": 40}}}
    got = resolve_followed(md, [rerun])
    assert got.model is not None and got.model.sha256 == "1" * 64 and got.previous and got.reason == "Retraining"
    assert "40%" in got.message and "serving the previous model" in got.message
    failed = resolve_followed(md, [{"metadata": {"name": "t"}, "status": {"phase": "Failed", "reason": "OOMKilled"}}])
    assert failed.model is not None and failed.reason == "TrainingJobFailed" and not failed.failed
    dep = {"metadata": {"generation": 1}, "spec": {"replicas": 1},
           "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1,
                      "conditions": [{"type": "Available", "status": "True"}]}}
    st = {**md["status"], **derive_md_status(md, failed, dep, [], OperatorSettings(), NOW).status}
    assert st["phase"] == "Ready" and st["model"] == served
    assert conds(st)["Ready"] == "True" and conds(st)["ModelResolved"] == "False" and conds(st)["Available"] == "True"
