"""Hyperparameter search (`spec.tuning`): the trials, the best one retrained and exported.

Three ways a pod runs it:
- sequential (`parallelism: 1`): every trial one after another in this pod, then the best one again;
- one trial (`KILN_TRIAL_INDEX=i`, parallel trials: the operator runs one pod per trial): trial i of the
  list `kiln.tuning.plan` gives (every pod computes the same list), its metrics in the termination message;
- the final run (`KILN_TUNING_BEST=i`): the operator picked trial i from the pods' reports, this pod
  trains it into the real output and exports it.

Why retrain rather than keep: every trial is a full, seeded `kiln train` into a scratch folder, so
the best one's numbers are reproduced exactly by training it again into the real output (one more
run), and the scratch outputs never mix with the real ones (which may be s3://). All trials share one
seed (the spec's, else one derived from the TrainingJob's uid), so they differ only in the parameters
searched. In the sequential mode each finished trial is PATCHed into `status.tuning` (kubectl shows
the best score so far) and printed; with parallel trials the operator writes `status.tuning`.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable
from typing import Any

from kiln import tuning as core
from kiln.spec import Tuning
from kiln_trainer.errors import EXIT_SPEC, SpecError, TrainerError
from kiln_trainer.jobspec import Job, job_from_doc
from kiln_trainer.progress import StatusPatcher
from kiln_trainer.settings import TrainerSettings

WHERE = core.WHERE
TrainFn = Callable[..., dict[str, Any]]


def set_path(spec: dict[str, Any], path: str, value: Any) -> None:
    """`kiln.tuning.set_path`, its error as a SpecError naming the parameter."""
    try:
        core.set_path(spec, path, value)
    except core.TuningError as exc:
        raise SpecError(exc.message, exc.where) from exc


def plan(tuning: Tuning, seed: int) -> list[dict[str, Any]]:
    """`kiln.tuning.plan` (the trials' parameter sets), its error as a SpecError."""
    try:
        return core.plan(tuning, seed)
    except core.TuningError as exc:
        raise SpecError(exc.message, exc.where) from exc


def search_seed(job: Job, parallel: bool) -> int:
    """The seed every trial shares: the spec's, else one derived from the TrainingJob's uid (the same in every
    pod); a file without a uid gets one drawn here, unless it runs a parallel trial (then its name's)."""
    given = job.typed.training.seed
    uid = str(job.doc.get("metadata", {}).get("uid") or "")
    if given is not None:
        return given
    if uid or parallel:
        return core.derived_seed(uid or job.name)
    return random.SystemRandom().randrange(2**31)


def _trial_job(job: Job, params: dict[str, Any], seed: int) -> Job:
    doc = {**job.doc}
    try:
        doc["spec"] = core.trial_spec(job.doc["spec"], params, seed)
    except core.TuningError as exc:
        raise SpecError(exc.message, exc.where) from exc
    try:
        return job_from_doc(doc, job.base_dir)
    except SpecError as exc:
        raise SpecError(f"trial {params}: {exc}", WHERE) from exc


def _index(value: str, name: str, count: int) -> int | None:
    """The trial number in an environment variable ("" = not set), checked against the list."""
    if not value:
        return None
    try:
        index = int(value)
    except ValueError:
        raise SpecError(f"{name}={value!r} is not a trial number", None) from None
    if not 0 <= index < count:
        raise SpecError(f"{name}={index}, but the search has {count} trials (0..{count - 1})", WHERE)
    return index


def run(job: Job, train: TrainFn, output: str | None, progress: Any, cluster: Any, strategy: Any) -> dict[str, Any]:
    """The search as this pod's part of it asks: every trial (sequential), one trial, or the final run."""
    tuning = job.typed.tuning
    assert tuning is not None  # train() checked
    if cluster.multi_worker:
        raise SpecError("tuning runs each trial in one pod: set workers: 1", WHERE)
    settings = TrainerSettings.from_env()
    seed = search_seed(job, bool(settings.trial_index or settings.tuning_best))
    trials = plan(tuning, seed)
    trial = _index(settings.trial_index, "KILN_TRIAL_INDEX", len(trials))
    if trial is not None:
        return run_trial(job, train, trials, trial, seed, cluster, strategy)
    best = _index(settings.tuning_best, "KILN_TUNING_BEST", len(trials))
    if best is not None:
        print(f"tuning: training the best trial {best + 1} {trials[best]} for export", flush=True)
        summary = {"algorithm": tuning.algorithm, "metric": tuning.metric, "seed": seed, "best": best,
                   "bestParameters": trials[best], "parallelism": tuning.parallelism}
        return train(_trial_job(job, trials[best], seed), output, progress, cluster=cluster, strategy=strategy,
                     tuning_summary=summary)
    return _sequential(job, train, trials, seed, output, progress, cluster, strategy)


def run_trial(job: Job, train: TrainFn, trials: list[dict[str, Any]], index: int, seed: int, cluster: Any,
              strategy: Any) -> dict[str, Any]:
    """Train trial `index` into a scratch folder; its report (what the termination message carries).

    A trial that fails for its own values (a spec or data error: retrying cannot help) is reported, not
    raised: the pod exits 0 so an Indexed Job goes on with the other trials, and the operator records
    the trial as failed with this message. Anything else (OOM, a crash, SIGTERM) fails the pod.
    """
    tuning = job.typed.tuning
    assert tuning is not None
    params = trials[index]
    report: dict[str, Any] = {"trial": index, "parameters": params}
    try:
        trial = _trial_job(job, params, seed)
        with tempfile.TemporaryDirectory(prefix="kiln-trial-") as scratch:
            result = train(trial, scratch, None, cluster=cluster, strategy=strategy, patch_progress=False)
        metrics = result["metrics"]
        if tuning.metric not in metrics:
            raise SpecError(f"tuning metric {tuning.metric!r} is not among the run's metrics ({', '.join(metrics)})",
                            f"{WHERE}.metric")
    except TrainerError as exc:
        if exc.exit_code != EXIT_SPEC:
            raise
        print(f"trial {index + 1}/{len(trials)} {params} failed: {exc}", flush=True)
        return {**report, "error": str(exc), "field": exc.field}
    print(f"trial {index + 1}/{len(trials)} {params} {tuning.metric}={metrics[tuning.metric]:.4f}", flush=True)
    return {**report, "metrics": metrics, "score": metrics[tuning.metric]}


def _sequential(job: Job, train: TrainFn, trials: list[dict[str, Any]], seed: int, output: str | None,
                progress: Any, cluster: Any, strategy: Any) -> dict[str, Any]:
    """Every trial here, recorded as it finishes, then the best one trained into the real output."""
    tuning = job.typed.tuning
    assert tuning is not None
    metric = tuning.metric
    jobs = [_trial_job(job, params, seed) for params in trials]  # every trial checked before the first trains
    patcher = StatusPatcher.from_env() if cluster.chief else None
    done: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for i, (params, trial) in enumerate(zip(trials, jobs, strict=True)):
        with tempfile.TemporaryDirectory(prefix="kiln-trial-") as scratch:
            result = train(trial, scratch, None, cluster=cluster, strategy=strategy)
        metrics = result["metrics"]
        if metric not in metrics:
            raise SpecError(f"tuning metric {metric!r} is not among the run's metrics ({', '.join(metrics)})",
                            f"{WHERE}.metric")
        done.append({"trial": i, "parameters": params, "metrics": metrics, "score": metrics[metric]})
        summary = {**core.summarize(tuning, done), "mode": "Sequential", "seed": seed, "total": len(trials)}
        best_so_far = f"trial {summary['best'] + 1}" if "best" in summary else "none finite"
        print(f"trial {i + 1}/{len(trials)} {params} {metric}={metrics[metric]:.4f} (best so far: {best_so_far})",
              flush=True)
        if patcher is not None:
            patcher.patch_status({"tuning": summary})
    if "best" not in summary:
        raise SpecError(f"no trial reached a finite {metric}", f"{WHERE}.metric")
    best = summary["best"]
    print(f"tuning: best trial {best + 1} {trials[best]}; training it again for export", flush=True)
    return train(jobs[best], output, progress, cluster=cluster, strategy=strategy, tuning_summary=summary)
