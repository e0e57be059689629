"""Parallel trials (spec.tuning.parallelism), the pure parts: the trial list every pod computes, the two Job
forms (valid Kubernetes, strict), each trial's outcome from its pods, the best pick and what starts next."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest
from kiln_operator import main
from kiln_operator.settings import Features, OperatorSettings
from kiln_operator.templating import RenderError
from kiln_operator.trainingjob import trials
from kiln_operator.trainingjob.render import INDEXED_TRIALS, JOB_PER_TRIAL, build_trainingjob, build_trial_jobs, trial_plan

from kiln import tuning
from kiln.schema import validate
from kiln.spec import TrainingJobSpec, Tuning

pytestmark = [pytest.mark.unit]

NEW = OperatorSettings(features=Features(server_version="v1.30.0"))
OLD = OperatorSettings(features=Features(job_suspend=False, indexed_jobs=False, indexed_trials=False, hpa_v2=False,
                                         server_version="v1.20.2"))
GRID = {"algorithm": "grid", "metric": "val_loss", "parallelism": 2,
        "parameters": {"training.optimizer.learningRate": [0.001, 0.01], "model.layers[0].units": [4, 16]}}


def tj(tuning_spec: dict[str, Any] | None = None, uid: str = "uid-1", **spec: Any) -> dict[str, Any]:
    doc = {
        "apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob",
        "metadata": {"name": "demo", "namespace": "ml", "uid": uid},
        "spec": {"dataset": {"uri": "pvc://data/d.csv"}, "output": {"uri": "pvc://models/demo"},
                 "model": {"inputShape": [4], "layers": [{"type": "Dense", "units": 8, "activation": "relu"},
                                                         {"type": "Dense", "units": 3, "activation": "softmax"}]},
                 "tuning": tuning_spec or GRID, **spec},
    }
    return validate(doc)


def env_of(job: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_every_pod_computes_the_same_trial_list() -> None:
    random_spec = {"algorithm": "random", "trials": 5, "metric": "val_accuracy", "parallelism": 3,
                   "parameters": {"training.optimizer.learningRate": {"min": 1e-4, "max": 1e-1, "log": True},
                                  "model.layers[0].units": [4, 8, 16]}}
    # No training.seed: the seed comes from the uid, the same in the operator and in every pod.
    first, seed = trial_plan(tj(random_spec, uid="abc"))
    again, seed_again = trial_plan(tj(random_spec, uid="abc"))
    other, other_seed = trial_plan(tj(random_spec, uid="xyz"))
    assert (first, seed) == (again, seed_again) and len(first) == 5
    assert seed == tuning.derived_seed("abc") != other_seed and first != other
    assert first == tuning.plan(Tuning.from_dict(random_spec), seed)  # what kiln_trainer.tuning computes in a pod
    given, given_seed = trial_plan(tj(random_spec, training={"seed": 7}))
    assert given_seed == 7 and given == tuning.plan(Tuning.from_dict(random_spec), 7)
    grid, _ = trial_plan(tj())
    # Paths in sorted order (the API server stores keys sorted): the written order does not matter.
    assert grid == [{"model.layers[0].units": u, "training.optimizer.learningRate": lr} for u in (4, 16) for lr in (0.001, 0.01)]
    assert [list(p) for p in grid] == [["model.layers[0].units", "training.optimizer.learningRate"]] * 4


def test_a_trial_value_the_schema_rejects_fails_before_any_pod() -> None:
    bad = {**GRID, "parameters": {"training.optimizer.learningRate": [0.01, -1]}}
    with pytest.raises(RenderError, match=r"trial .*-1.*learningRate") as e:
        trial_plan(tj(bad), validate=True)
    assert e.value.field == "spec.tuning"
    trial_plan(tj(bad))  # without validate (every reconcile): only the list
    with pytest.raises(RenderError, match="grid search needs a list"):
        trial_plan(tj({**GRID, "parameters": {"training.epochs": {"min": 1, "max": 3}}}))
    with pytest.raises(RenderError, match=r"set spec\.workers: 1"):
        build_trial_jobs(tj(workers=2), NEW, JOB_PER_TRIAL, [0], support=False)


def test_job_per_trial_form() -> None:
    docs = build_trial_jobs(tj(runPolicy={"backoffLimit": 1}), OLD, JOB_PER_TRIAL, [0, 1], support=True)
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    assert [d["kind"] for d in docs] == ["ServiceAccount", "Role", "RoleBinding", "Job", "Job"]
    jobs = docs[3:]
    assert [j["metadata"]["name"] for j in jobs] == ["demo-trial-0", "demo-trial-1"]
    for i, job in enumerate(jobs):
        assert "completionMode" not in job["spec"]
        assert (job["spec"]["completions"], job["spec"]["parallelism"], job["spec"]["backoffLimit"]) == (1, 1, 1)
        assert job["metadata"]["labels"]["kiln.dev/trial"] == str(i)
        assert job["spec"]["template"]["metadata"]["labels"]["kiln.dev/trial"] == str(i)
        assert env_of(job)["KILN_TRIAL_INDEX"] == str(i) and "KILN_TUNING_BEST" not in env_of(job)
        pod = job["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "demo-trainer", "the trainer's account, nothing more"
    assert build_trial_jobs(tj(), OLD, JOB_PER_TRIAL, [2], support=False)[0]["metadata"]["name"] == "demo-trial-2"


def test_indexed_form() -> None:
    docs = build_trial_jobs(tj(), NEW, INDEXED_TRIALS, [0, 1, 2, 3], support=False)
    assert len(docs) == 1
    job = docs[0]
    kubernetes_validate.validate(job, "1.30.0", strict=True)
    assert job["metadata"]["name"] == "demo-trials" and job["metadata"]["labels"]["kiln.dev/trial"] == "indexed"
    assert job["spec"]["completionMode"] == "Indexed"
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (4, 2)
    assert job["spec"]["backoffLimit"] == 3, "every trial gets the spec's retries (backoffLimit 0 + 1 each)"
    assert env_of(job)["KILN_TRIAL_INDEX"] == {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    assert "subdomain" not in job["spec"]["template"]["spec"], "trials are independent: no workers' Service"


def test_final_job_trains_the_best_trial() -> None:
    job = next(d for d in build_trainingjob(tj(), OLD, tuning_best=2) if d["kind"] == "Job")
    assert job["metadata"]["name"] == "demo-train" and env_of(job)["KILN_TUNING_BEST"] == "2"
    assert "KILN_TRIAL_INDEX" not in env_of(job) and "kiln.dev/trial" not in job["metadata"]["labels"]


def test_mode_follows_the_api_server_unless_forced() -> None:
    assert trials.mode(NEW) == INDEXED_TRIALS and trials.mode(OLD) == JOB_PER_TRIAL
    forced = OperatorSettings(features=OLD.features, trial_mode="indexed")
    assert trials.mode(forced) == INDEXED_TRIALS and "set by the operator" in trials.mode_reason(INDEXED_TRIALS, forced)
    assert "v1.20.2" in trials.mode_reason(JOB_PER_TRIAL, OLD)
    assert trials.mode(OperatorSettings(features=NEW.features, trial_mode="jobs")) == JOB_PER_TRIAL
    settings, _ = main.parse_args(["--trial-mode", "jobs"], environ={})
    assert settings.trial_mode == "jobs"
    with pytest.raises(SystemExit):
        main.parse_args(["--trial-mode", "sometimes"], environ={})
    docs = trials.preview(tj(), OLD)
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Job"] == ["demo-trial-0", "demo-trial-1"]


# ------------------------------------------------------------------ outcomes, as the caches hold them

def job(name: str, uid: str, label: str, condition: str | None = None) -> dict[str, Any]:
    status = {"conditions": [{"type": condition, "status": "True", "reason": "BackoffLimitExceeded",
                              "message": "Job has reached the specified backoff limit"}]} if condition else {}
    return {"metadata": {"name": name, "uid": uid, "labels": {"kiln.dev/trial": label}}, "status": status}


def pod(name: str, owner: str, phase: str, *, label: str | None = None, index: int | None = None,
        message: dict[str, Any] | None = None, exit_code: int = 0, reason: str = "Completed") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "creationTimestamp": "2026-01-01T00:00:00Z",
                            "ownerReferences": [{"uid": owner}], "labels": {}, "annotations": {}}
    if label is not None:
        meta["labels"]["kiln.dev/trial"] = label
    if index is not None:
        meta["annotations"]["batch.kubernetes.io/job-completion-index"] = str(index)
    status: dict[str, Any] = {"phase": phase}
    if phase in ("Succeeded", "Failed"):
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {
            "exitCode": exit_code, "reason": reason, "message": json.dumps(message) if message else ""}}}]
    return {"metadata": meta, "status": status}


def report(i: int, plan: list[dict[str, Any]], loss: float) -> dict[str, Any]:
    return {"trial": i, "parameters": plan[i], "metrics": {"val_loss": loss, "val_accuracy": 1 - loss}, "score": loss}


def test_job_per_trial_outcomes_best_and_next() -> None:
    doc = tj()
    spec = TrainingJobSpec.from_dict(doc["spec"])
    plan, seed = trial_plan(doc)
    jobs = [job("demo-trial-0", "j0", "0", "Complete"), job("demo-trial-1", "j1", "1", "Failed"),
            job("demo-trial-2", "j2", "2")]
    pods = [pod("p0", "j0", "Succeeded", label="0", message=report(0, plan, 0.4)),
            pod("p1", "j1", "Failed", label="1", exit_code=137, reason="OOMKilled"),
            pod("p2", "j2", "Running", label="2"),
            pod("stray", "other-job", "Succeeded", label="3", message=report(3, plan, 0.01))]
    state = trials.progress(plan, "val_loss", spec, jobs, pods)
    assert [e is not None for e in state.finished] == [True, True, False, False]
    assert state.finished[0] == {**report(0, plan, 0.4), "phase": "Succeeded"}
    assert state.finished[1] is not None and state.finished[1]["phase"] == "Failed"
    assert state.finished[1]["reason"] == "OOMKilled" and "spec.resources.memory" in state.finished[1]["message"]
    assert state.running == 1 and state.started == {0, 1, 2}
    assert trials.to_start(state, len(plan), 2) == [3], "trial 2 runs: one slot left of 2"
    assert trials.to_start(state, len(plan), 1) == []
    summary = trials.status(spec.tuning, JOB_PER_TRIAL, seed, state)  # type: ignore[arg-type]
    assert (summary["best"], summary["bestScore"], summary["failed"], summary["total"]) == (0, 0.4, 1, 4)
    assert summary["bestParameters"] == plan[0] and summary["mode"] == JOB_PER_TRIAL and summary["seed"] == seed
    text = trials.message(summary, 2)
    assert "2/4 trials finished (1 failed), 1 running, at most 2 at once" in text and "best so far: trial 0" in text


def test_a_finished_trial_whose_job_is_gone_stays_finished() -> None:
    """ttlSecondsAfterFinished (or a hand) removed trial 0's Job: status.tuning remembers it, it never runs again."""
    doc = tj()
    spec = TrainingJobSpec.from_dict(doc["spec"])
    plan, _ = trial_plan(doc)
    before = [{**report(0, plan, 0.4), "phase": "Succeeded"}]
    jobs = [job("demo-trial-1", "j1", "1")]
    state = trials.progress(plan, "val_loss", spec, jobs, [pod("p1", "j1", "Running", label="1")], before)
    assert state.finished[0] == before[0] and state.started == {0, 1}
    assert trials.to_start(state, len(plan), 2) == [2]
    assert trials.progress(plan, "val_loss", spec, jobs, []).finished[0] is None, "without the record: not started"


def test_a_recorded_trial_whose_finished_job_lost_its_pod_stays_finished() -> None:
    """The pod of trial 0's Complete Job was deleted after its entry was recorded: it is neither run
    again nor counted as running (it used to hold a slot for good, and the search never ended)."""
    doc = tj()
    spec = TrainingJobSpec.from_dict(doc["spec"])
    plan, _ = trial_plan(doc)
    before = [{**report(0, plan, 0.4), "phase": "Succeeded"}]
    jobs = [job("demo-trial-0", "j0", "0", "Complete")]
    state = trials.progress(plan, "val_loss", spec, jobs, [], before)
    assert state.finished[0] == before[0] and state.running == 0 and state.started == {0}
    assert trials.to_start(state, len(plan), 2) == [1, 2]
    unfinished = trials.progress(plan, "val_loss", spec, [job("demo-trial-0", "j0", "0")], [], before)
    assert unfinished.finished[0] is None and unfinished.running == 1, "a Job still running is not finished"


def test_the_metric_decides_and_failed_reports_never_win() -> None:
    plan = [{"x": i} for i in range(4)]
    entries = [{**report(0, plan, 0.5), "phase": "Succeeded"}, {**report(1, plan, 0.2), "phase": "Succeeded"},
               {"trial": 2, "parameters": plan[2], "phase": "Failed", "reason": "TrialFailed"},
               {**report(3, plan, 0.2), "phase": "Succeeded"}]
    loss = tuning.summarize(Tuning.from_dict({"metric": "val_loss", "parameters": {"x": [1]}}), entries)
    assert loss["best"] == 1, "lowest val_loss; a tie goes to the earlier trial"
    acc = [{**e, "score": score} if "metrics" in e else e for e, score in zip(entries, (0.9, 0.6, None, 0.7), strict=True)]
    assert tuning.summarize(Tuning.from_dict({"metric": "val_accuracy", "parameters": {"x": [1]}}), acc)["best"] == 0
    assert "best" not in tuning.summarize(Tuning.from_dict({"parameters": {"x": [1]}}), [entries[2]])


def test_a_trial_that_reports_its_own_failure_or_nothing() -> None:
    doc = tj()
    spec = TrainingJobSpec.from_dict(doc["spec"])
    plan, seed = trial_plan(doc)
    failed = {"trial": 0, "parameters": plan[0], "error": "training diverged: the loss became nan", "field": "spec.training.optimizer"}
    jobs = [job(f"demo-trial-{i}", f"j{i}", str(i), "Complete") for i in range(4)]
    pods = [pod("p0", "j0", "Succeeded", label="0", message=failed),
            pod("p1", "j1", "Succeeded", label="1"),  # exit 0, no report
            pod("p2", "j2", "Succeeded", label="2", message={"trial": 2, "parameters": plan[2], "metrics": {"accuracy": 1.0}}),
            pod("p3", "j3", "Succeeded", label="3", message={**report(3, plan, float("nan"))})]
    state = trials.progress(plan, "val_loss", spec, jobs, pods)
    assert state.done
    assert [(e or {}).get("reason") for e in state.finished] == ["TrialFailed", "NoReport", "NoMetric", "NoMetric"]
    assert state.finished[0] is not None and state.finished[0]["message"] == "spec.training.optimizer: training diverged: the loss became nan"
    summary = trials.status(spec.tuning, JOB_PER_TRIAL, seed, state)  # type: ignore[arg-type]
    assert "best" not in summary and summary["failed"] == 4
    assert trials.failure(summary).startswith("all 4 trials failed: trial 0: TrialFailed: spec.training.optimizer")


def test_indexed_outcomes_come_from_completion_indexes() -> None:
    doc = tj()
    spec = TrainingJobSpec.from_dict(doc["spec"])
    plan, _ = trial_plan(doc)
    running = [job("demo-trials", "ji", "indexed")]
    pods = [pod("a", "ji", "Succeeded", label="indexed", index=2, message=report(2, plan, 0.3)),
            pod("b", "ji", "Failed", label="indexed", index=0, exit_code=1, reason="Error",
                message={"error": "Boom", "field": None}),
            pod("c", "ji", "Running", label="indexed", index=0),  # index 0 retried
            pod("d", "ji", "Pending", label="indexed", index=1)]
    state = trials.progress(plan, "val_loss", spec, running, pods)
    assert [e is not None for e in state.finished] == [False, False, True, False]
    assert state.running == 2 and state.started == {0, 1, 2, 3}
    assert trials.to_start(state, len(plan), 2) == [], "the Indexed Job starts its own pods"
    failed = [job("demo-trials", "ji", "indexed", "Failed")]
    state = trials.progress(plan, "val_loss", spec, failed, pods[:2])
    assert state.done and state.finished[2] is not None and state.finished[2]["phase"] == "Succeeded"
    assert state.finished[0] is not None and (state.finished[0]["reason"], state.finished[0]["message"]) == \
        ("Error", "container trainer exited with code 1: Boom")
    assert state.finished[1] is not None and state.finished[1]["reason"] == "BackoffLimitExceeded"


def test_a_huge_grid_is_refused_before_it_is_built() -> None:
    # 10 values x 8 parameters = 10**8 combinations: counted, never built (the operator's loop would stall).
    params = {f"model.layers[0].p{i}": list(range(10)) for i in range(8)}
    with pytest.raises(tuning.TuningError, match=r"100000000 combinations, more than the 1000") as e:
        tuning.plan(Tuning.from_dict({"algorithm": "grid", "metric": "val_loss", "parameters": params}), 0)
    assert e.value.where == "spec.tuning.parameters"
    with pytest.raises(RenderError, match="more than the 1000 trials"):
        trial_plan(tj({**GRID, "parameters": params}))
    ok = {f"model.layers[0].p{i}": list(range(10)) for i in range(3)}  # exactly 1000: allowed
    assert len(tuning.plan(Tuning.from_dict({"algorithm": "grid", "metric": "val_loss", "parameters": ok}), 0)) == 1000


@pytest.mark.parametrize("bounds", [{"min": "a", "max": "b"}, {"min": 1, "max": "2"}, {"min": True, "max": 3},
                                    {"min": None, "max": 1.0}, {"min": 0.0, "max": float("inf")}])
def test_random_bounds_that_are_not_numbers_are_a_tuning_error(bounds: dict[str, Any]) -> None:
    spec = {"algorithm": "random", "trials": 2, "metric": "val_loss", "parameters": {"training.optimizer.learningRate": bounds}}
    with pytest.raises(tuning.TuningError, match="min and max must be numbers") as e:
        tuning.plan(Tuning.from_dict(spec), 0)
    assert e.value.where == "spec.tuning.parameters[training.optimizer.learningRate]"


# ------------------------------------------------------------------ the end of a search, announced once

class _Writer:
    def __init__(self) -> None:
        self.written: dict[Any, dict[str, Any]] = {}

    async def patch(self, key: Any, status: dict[str, Any], obj: dict[str, Any] | None = None) -> None:
        self.written.setdefault(key, {}).update(status)


class _Controller:
    """What Tuner._finish uses of the TrainingJob controller: its status writer and ensure_children."""

    def __init__(self) -> None:
        self.writer = _Writer()
        self.children: list[int] = []

    async def ensure_children(self, key: Any, tj: dict[str, Any], source: dict[str, Any], tuning_best: int) -> None:
        self.children.append(tuning_best)


def test_tuning_finished_is_announced_once_across_reconciles(monkeypatch: pytest.MonkeyPatch) -> None:
    """While the training Job is held back (suspend) or runs, each reconcile finishes the search again:
    TuningFinished is posted the first time only (it used to be posted on every reconcile)."""
    import asyncio

    from kiln_operator.trainingjob import tuner as tuner_module

    events: list[str] = []

    async def post_event(obj: dict[str, Any], kind: str, reason: str, message: str) -> None:
        events.append(reason)

    monkeypatch.setattr(tuner_module, "post_event", post_event)
    doc = tj()
    spec = TrainingJobSpec.from_dict(doc["spec"])
    plan, seed = trial_plan(doc)
    jobs = [job(f"demo-trial-{i}", f"j{i}", str(i), "Complete") for i in range(len(plan))]
    pods = [pod(f"p{i}", f"j{i}", "Succeeded", label=str(i), message=report(i, plan, 0.5 - i / 10)) for i in range(len(plan))]
    summary = trials.status(spec.tuning, JOB_PER_TRIAL, seed, trials.progress(plan, "val_loss", spec, jobs, pods))  # type: ignore[arg-type]
    controller = _Controller()
    tuner = tuner_module.Tuner(controller)  # type: ignore[arg-type]
    key = ("default", "demo")
    doc["status"] = {"tuning": {**summary, "running": 1}}
    for _ in range(3):
        asyncio.run(tuner._finish(key, doc, doc, summary, []))
        doc["status"] = {**doc["status"], **controller.writer.written[key]}
    assert events == ["TuningFinished"], events
    assert controller.children == [len(plan) - 1] * 3, "the training Job of the best trial is ensured each time"


@pytest.mark.parametrize(("mode", "says"), [(JOB_PER_TRIAL, "no new trials start"),
                                            (INDEXED_TRIALS, "the Indexed Job of the trials already exists and runs on")])
def test_the_suspend_note_says_what_each_form_does(mode: str, says: str) -> None:
    """Suspended mid-search: one Job per trial starts no new trial; the Indexed Job already made runs on
    (the message used to say "no new trials start" for both)."""
    import asyncio

    from kiln_operator.trainingjob import tuner as tuner_module

    doc = tj()
    spec = TrainingJobSpec.from_dict(doc["spec"])
    plan, seed = trial_plan(doc)
    summary = trials.status(spec.tuning, mode, seed, trials.progress(plan, "val_loss", spec, [], []))  # type: ignore[arg-type]
    controller = _Controller()
    doc["status"] = {}
    asyncio.run(tuner_module.Tuner(controller)._write(("default", "demo"), doc, summary, 2, True, mode))  # type: ignore[arg-type]
    message = controller.writer.written[("default", "demo")]["message"]
    assert message.endswith(f"; spec.runPolicy.suspend: {says}"), message
