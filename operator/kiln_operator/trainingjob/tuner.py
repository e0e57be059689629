"""Parallel trials (`spec.tuning.parallelism` > 1): the trial Jobs, `status.tuning` from their pods, then the
training Job of the best trial.

Why the operator and not the trainer pod: trials in pods of their own run at once on as many nodes as
the cluster gives, each with the TrainingJob's resources, and a trial that dies (OOM, a node lost)
fails alone. The trainer pod's sequential search stays the default (`parallelism: 1`).

Two forms, chosen at startup from the API server's version (`trials.mode`): one Indexed Job of every
trial (completions = trials, parallelism = N; 1.22+), or, where the API server has no Indexed Jobs
(1.20 drops `completionMode` silently), one Job per trial with at most N unfinished at once, the
next started as one finishes. Every pod reads the same spec document and computes the same trial
list (kiln.tuning); its number comes in KILN_TRIAL_INDEX. The spec recorded on the first trial Job
is the one the search runs with: an edit during the search is flagged, not applied, like an edit
after the training Job exists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kiln.policy import REASON as POLICY_VIOLATION
from kiln.policy import describe
from kiln.spec import TrainingJobSpec
from kiln_operator import names, policycheck
from kiln_operator.conditions import fmt_time, now_utc
from kiln_operator.runtime import Key, log, owned_by, post_event
from kiln_operator.templating import RenderError
from kiln_operator.trainingjob import trials
from kiln_operator.trainingjob.render import INDEXED_TRIALS, JOB_PER_TRIAL, build_trial_jobs, trial_plan
from kiln_operator.trainingjob.status import HELD_BACK_MESSAGE, conditions_for, job_finished, recorded_spec

if TYPE_CHECKING:
    from kiln_operator.trainingjob.controller import TrainingJobController


class Tuner:
    """The parallel search of each TrainingJob, driven by the controller's reconcile (caller holds the lock)."""

    def __init__(self, controller: TrainingJobController) -> None:
        self.c = controller

    async def reconcile(self, key: Key, tj: dict[str, Any]) -> None:
        """Start trials up to the limit, record the finished ones, and once all are done create the training Job."""
        c = self.c
        uid = tj["metadata"].get("uid")
        jobs = [j for j in c.jobs.get(key) if owned_by(j, uid) and trials.is_trial(j)]
        recorded = _recorded(jobs)
        source = {**tj, "spec": recorded} if recorded is not None else tj
        generation, observed = tj["metadata"].get("generation"), tj["status"].get("observedGeneration")
        if jobs and generation and observed and generation != observed:
            first = min(jobs, key=lambda j: str(j["metadata"].get("name")))  # the one _recorded reads the spec from
            await c.spec_changed(key, tj, first, apply_suspend=False)
            tj = {**tj, "status": {**tj["status"], **c.writer.written.get(key, {})}}
        spec = TrainingJobSpec.from_dict(source.get("spec"))
        assert spec.tuning is not None
        try:
            plan, seed = trial_plan(source, validate=not jobs)
        except RenderError as exc:
            await c.fail(key, tj, "InvalidSpec", str(exc))
            return
        mode = _mode_of(jobs) or trials.mode(c.settings)
        before = (tj["status"].get("tuning") or {}).get("trials")
        state = trials.progress(plan, spec.tuning.metric, spec, jobs, await self._pods(key, jobs), before)
        summary = trials.status(spec.tuning, mode, seed, state)
        news = _news(tj, summary)  # posted once status.tuning has them: a crash before the write re-posts none twice
        if state.done:
            await self._finish(key, tj, source, summary, news)
            return
        held = TrainingJobSpec.from_dict(tj.get("spec")).run_policy.suspend
        if held and not jobs:
            await self._hold(key, tj)
            return
        start: list[int] = []
        if held:
            pass  # suspended mid-search: the running trials finish, no new one starts
        elif mode == JOB_PER_TRIAL:
            start = trials.to_start(state, len(plan), spec.tuning.parallelism)
        elif not jobs:
            start = list(range(len(plan)))  # the one Indexed Job holds every trial
        if start and not await self._start(key, tj, source, mode, start, support=not jobs, total=len(plan)):
            return
        if mode == JOB_PER_TRIAL:
            summary["running"] += len(start)
        await self._write(key, tj, summary, spec.tuning.parallelism, held, mode)
        await _announce(tj, news)

    async def _pods(self, key: Key, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The trial pods; listed from the API when a finished Job's pods are not in the cache yet (a restart)."""
        uids = [j["metadata"]["uid"] for j in jobs]
        pods = [p for p in self.c.pods.get(key) if any(owned_by(p, u) for u in uids)]
        finished = [j for j in jobs if job_finished(j)]
        if finished and not all(any(owned_by(p, j["metadata"]["uid"]) for p in pods) for j in finished):
            await self.c.refill_pods(key)
            pods = [p for p in self.c.pods.get(key) if any(owned_by(p, u) for u in uids)]
        return pods

    async def _start(self, key: Key, tj: dict[str, Any], source: dict[str, Any], mode: str, indices: list[int],
                     support: bool, total: int) -> bool:
        """Create the trial Jobs for `indices` (with the trainer's account first, the first time); False if that failed.

        The first time, the admin's policy is checked as for the training Job: trial pods run the same spec."""
        if support:
            violations = await policycheck.check("TrainingJob", tj, self.c.settings.tenant_policy())
            if violations:
                await self.c.fail(key, tj, POLICY_VIOLATION, describe(violations))
                return False
        try:
            children = build_trial_jobs(source, self.c.settings, mode, indices, support)
        except RenderError as exc:
            await self.c.fail(key, tj, "InvalidSpec", str(exc))
            return False
        created = await self.c.create_children(key, tj, children)
        if created is None:
            return False
        made = [obj["metadata"]["name"] for obj, new in created if new and obj["kind"] == "Job"]
        if made:
            log.info("%s/%s: created trial Job(s) %s", key[0], key[1], ", ".join(made))
        if support and made:
            spec = TrainingJobSpec.from_dict(source.get("spec"))
            assert spec.tuning is not None
            form = (f"one Indexed Job {made[0]}" if mode == INDEXED_TRIALS
                    else "one Job per trial")
            await post_event(tj, "Normal", "TuningStarted", f"{total} trials, at most {spec.tuning.parallelism} at once, "
                             f"as {form} ({mode}: {trials.mode_reason(mode, self.c.settings)})")
        return True

    async def _write(self, key: Key, tj: dict[str, Any], summary: dict[str, Any], parallelism: int, held: bool,
                     mode: str) -> None:
        message = trials.message(summary, parallelism) + (_held_note(mode) if held else "")
        now, generation = now_utc(), tj["metadata"].get("generation")
        update: dict[str, Any] = {"phase": "Running", "reason": "Tuning", "message": message, "tuning": summary,
                                  "observedGeneration": generation,
                                  "conditions": conditions_for(tj["status"].get("conditions") or [], "Running", "Tuning",
                                                               message, now, generation, created=True)}
        if not tj["status"].get("startTime"):
            update["startTime"] = fmt_time(now)
        await self.c.writer.patch(key, {k: v for k, v in update.items() if tj["status"].get(k) != v}, tj)

    async def _finish(self, key: Key, tj: dict[str, Any], source: dict[str, Any], summary: dict[str, Any],
                      news: list[tuple[str, str, str]]) -> None:
        """Every trial is done: fail if none succeeded, else create the training Job of the best one."""
        summary = {**summary, "running": 0}
        # Every reconcile after the search comes here (the training Job may be held back by suspend, or
        # run for long): the outcome is announced once, when status.tuning first holds it.
        first = (tj["status"].get("tuning") or {}) != summary
        await self.c.writer.patch(key, {"tuning": summary})
        await _announce(tj, news)
        if "best" not in summary:
            await self.c.fail(key, tj, "TuningFailed", trials.failure(summary))
            return
        if first:
            await post_event(tj, "Normal", "TuningFinished",
                             f"best trial {summary['best']} {summary['bestParameters']} {summary['metric']}="
                             f"{summary['bestScore']:.4g} of {summary['total']} ({summary['failed']} failed); training it for export")
        view = {**tj, "status": {**tj["status"], **self.c.writer.written.get(key, {})}}
        await self.c.ensure_children(key, view, source=source, tuning_best=int(summary["best"]))

    async def _hold(self, key: Key, tj: dict[str, Any]) -> None:
        """spec.runPolicy.suspend before the first trial: nothing starts (Suspended) until it is false."""
        if tj["status"].get("phase") == "Suspended":
            return
        message = HELD_BACK_MESSAGE.replace("the Job is created", "the trials start")
        generation = tj["metadata"].get("generation")
        conditions = conditions_for(tj["status"].get("conditions") or [], "Suspended", "Suspended", message, now_utc(),
                                    generation, created=False)
        await self.c.writer.patch(key, {"phase": "Suspended", "reason": "Suspended", "message": message,
                                        "conditions": conditions, "observedGeneration": generation}, tj)
        await post_event(tj, "Normal", "Suspended", "the trials are held back while spec.runPolicy.suspend is true")


def _news(tj: dict[str, Any], summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """An event (type, reason, message) per trial that finished since the last status write."""
    before = {t.get("trial") for t in ((tj["status"].get("tuning") or {}).get("trials") or [])}
    out: list[tuple[str, str, str]] = []
    for entry in summary["trials"]:
        if entry["trial"] in before:
            continue
        if entry.get("phase") == "Failed":
            out.append(("Warning", "TrialFailed",
                        f"trial {entry['trial']} {entry['parameters']}: {entry.get('reason')}: {entry.get('message')}"))
        else:
            out.append(("Normal", "TrialSucceeded",
                        f"trial {entry['trial']} {entry['parameters']}: {summary['metric']}={entry['score']:.4g}"))
    return out


def _held_note(mode: str) -> str:
    """What spec.runPolicy.suspend does mid-search: one Job per trial starts no new trial, while the one
    Indexed Job already made runs on (its pods are the Job controller's, not the operator's, to start)."""
    if mode == INDEXED_TRIALS:
        return "; spec.runPolicy.suspend: the Indexed Job of the trials already exists and runs on"
    return "; spec.runPolicy.suspend: no new trials start"


async def _announce(tj: dict[str, Any], news: list[tuple[str, str, str]]) -> None:
    for event in news:
        await post_event(tj, *event)


def _recorded(jobs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The spec the search runs with: recorded on its first trial Job (None before any exists)."""
    for job in sorted(jobs, key=lambda j: str(j["metadata"].get("name"))):
        spec = recorded_spec(job)
        if spec is not None:
            return spec
    return None


def _mode_of(jobs: list[dict[str, Any]]) -> str | None:
    """The mode the search started in (a restarted operator keeps it, whatever it detects now)."""
    if not jobs:
        return None
    labels = [str((j["metadata"].get("labels") or {}).get(names.LABEL_TRIAL, "")) for j in jobs]
    return INDEXED_TRIALS if "indexed" in labels else JOB_PER_TRIAL
