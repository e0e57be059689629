"""Hyperparameter search (`spec.tuning`): trials one after another in this pod, the best one retrained and exported.

Why retrain rather than keep: every trial is a full, seeded `kiln train` into a scratch folder, so
the best one's numbers are reproduced exactly by training it again into the real output (one more
run), and the scratch outputs never mix with the real ones (which may be s3://). All trials share one
seed (the spec's, else one drawn here), so they differ only in the parameters searched. Each
finished trial is PATCHed into `status.tuning` (kubectl shows the best score so far) and printed.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import re
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from kiln.spec import Tuning
from kiln_trainer.errors import SpecError
from kiln_trainer.jobspec import Job, job_from_doc
from kiln_trainer.progress import StatusPatcher

WHERE = "spec.tuning"
_TOKEN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)")
TrainFn = Callable[..., dict[str, Any]]


def set_path(spec: dict[str, Any], path: str, value: Any) -> None:
    """Set `training.optimizer.learningRate` or `model.layers[0].units` in a spec; an error naming the path."""
    where = f"{WHERE}.parameters[{path}]"
    node: Any = spec
    parts = path.split(".")
    if parts[0] in ("tuning", "dataset", "output") or parts[0] not in ("model", "training"):
        raise SpecError(f"parameter paths start with model. or training., not {parts[0]!r}", where)
    for n, part in enumerate(parts):
        m = _TOKEN.fullmatch(part)
        if m is None:
            raise SpecError(f"cannot read {part!r} in the path {path!r}", where)
        keys: list[Any] = [m.group(1), *(int(i) for i in re.findall(r"\d+", m.group(2)))]
        for k, key in enumerate(keys):
            last = n == len(parts) - 1 and k == len(keys) - 1
            if isinstance(key, int):
                if not isinstance(node, list) or key >= len(node):
                    raise SpecError(f"{path!r}: no item [{key}] there", where)
            elif not isinstance(node, dict):
                raise SpecError(f"{path!r}: {key!r} is not inside an object", where)
            if last:
                node[key] = value
            else:
                node = node[key] if isinstance(key, int) or key in node else node.setdefault(key, {})


def plan(tuning: Tuning, seed: int) -> list[dict[str, Any]]:
    """The trials' parameter sets: every combination (grid) or `trials` random draws (10 unless given)."""
    params: dict[str, Any] = tuning.parameters
    if not params:
        raise SpecError("tuning needs at least one parameter", f"{WHERE}.parameters")
    if tuning.algorithm == "grid":
        for path, values in params.items():
            if not isinstance(values, list) or not values:
                raise SpecError("grid search needs a list of values per parameter ({min, max} is for random)",
                                f"{WHERE}.parameters[{path}]")
        combos = [dict(zip(params, c, strict=True)) for c in itertools.product(*params.values())]
        if tuning.trials is not None and tuning.trials < len(combos):
            raise SpecError(f"the grid has {len(combos)} combinations but trials is {tuning.trials}; "
                            "use algorithm: random to sample fewer", f"{WHERE}.trials")
        return combos
    rng = random.Random(seed)
    return [{path: _draw(rng, path, values) for path, values in params.items()} for _ in range(tuning.trials or 10)]


def _draw(rng: random.Random, path: str, values: Any) -> Any:
    if isinstance(values, list):
        return rng.choice(values)
    if not isinstance(values, dict) or "min" not in values or "max" not in values:
        raise SpecError("a parameter is a list of values or {min, max, log}", f"{WHERE}.parameters[{path}]")
    lo, hi = values["min"], values["max"]
    if not lo < hi or (values.get("log") and lo <= 0):
        raise SpecError(f"needs min < max{' and min > 0 with log' if values.get('log') else ''}",
                        f"{WHERE}.parameters[{path}]")
    if values.get("log"):
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if isinstance(lo, int) and isinstance(hi, int):
        return rng.randint(lo, hi)
    return rng.uniform(lo, hi)


def _trial_job(job: Job, params: dict[str, Any], seed: int) -> Job:
    doc = copy.deepcopy(job.doc)
    spec = doc["spec"]
    spec.pop("tuning")
    spec.pop("deploy", None)
    spec.setdefault("training", {})["seed"] = seed
    for path, value in params.items():
        set_path(spec, path, value)
    try:
        return job_from_doc(doc, job.base_dir)
    except SpecError as exc:
        raise SpecError(f"trial {params}: {exc}", WHERE) from exc


def run(job: Job, train: TrainFn, output: str | None, progress: Any, cluster: Any, strategy: Any) -> dict[str, Any]:
    """Run every trial, record it, then train the best one into the real output (tuning.json next to it)."""
    tuning = job.typed.tuning
    assert tuning is not None  # train() checked
    if cluster.multi_worker:
        raise SpecError("tuning runs its trials in one pod: set workers: 1", WHERE)
    metric = tuning.metric
    given = job.typed.training.seed
    seed = given if given is not None else random.SystemRandom().randrange(2**31)
    trials = plan(tuning, seed)
    jobs = [_trial_job(job, params, seed) for params in trials]  # every trial checked before the first trains
    patcher = StatusPatcher.from_env() if cluster.chief else None
    summary: dict[str, Any] = {"algorithm": tuning.algorithm, "metric": metric, "trials": []}
    for i, (params, trial) in enumerate(zip(trials, jobs, strict=True)):
        with tempfile.TemporaryDirectory(prefix="kiln-trial-") as scratch:
            result = train(trial, scratch, None, cluster=cluster, strategy=strategy)
        metrics = result["metrics"]
        if metric not in metrics:
            raise SpecError(f"tuning metric {metric!r} is not among the run's metrics ({', '.join(metrics)})",
                            f"{WHERE}.metric")
        summary["trials"].append({"trial": i, "parameters": params, "metrics": metrics, "score": metrics[metric]})
        _best(summary, metric)
        print(f"trial {i + 1}/{len(trials)} {params} {metric}={metrics[metric]:.4f} "
              f"(best so far: trial {summary['best'] + 1})", flush=True)
        if patcher is not None:
            patcher.patch_status({"tuning": summary})
    best = summary["trials"][summary["best"]]
    print(f"tuning: best trial {summary['best'] + 1} {best['parameters']}; training it again for export", flush=True)
    return train(jobs[summary["best"]], output, progress, cluster=cluster, strategy=strategy, tuning_summary=summary)


def _best(summary: dict[str, Any], metric: str) -> None:
    scores = np.array([t["score"] for t in summary["trials"]], dtype="float64")
    scores = np.where(np.isfinite(scores), scores, -np.inf if metric.endswith("accuracy") else np.inf)
    best = int(scores.argmax() if metric.endswith("accuracy") else scores.argmin())
    summary.update(best=best, bestScore=float(summary["trials"][best]["score"]),
                   bestParameters=summary["trials"][best]["parameters"])
