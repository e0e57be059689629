"""The pure parts of `spec.tuning` shared by the trainer and the operator: the trial list, spec paths, the best.

Why in the core: with `spec.tuning.parallelism` > 1 the operator runs each trial in a pod of its own,
and every pod (and the operator, which counts the trials and later trains the best one) must compute
the very same list from the spec. So the list is a pure function of the tuning spec and one seed:
grid order for grid, a `random.Random(seed)` for random. The seed is the spec's `training.seed`, else
one derived from the TrainingJob's uid (`derived_seed`), so the pods need nothing but the spec.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import random
import re
from typing import Any

from kiln.spec import Tuning

WHERE = "spec.tuning"
# The most trials one search may have: the CRD's maximum of `trials`. A grid is counted before it is built,
# so a tenant's 10 values x 8 parameters (10**8 combinations) is refused, not built in the operator's loop.
MAX_TRIALS = 1000
_TOKEN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)")


class TuningError(ValueError):
    """A tuning spec the search cannot run, with the spec field it is about."""

    def __init__(self, message: str, where: str) -> None:
        super().__init__(message)
        self.message = message
        self.where = where


def set_path(spec: dict[str, Any], path: str, value: Any) -> None:
    """Set `training.optimizer.learningRate` or `model.layers[0].units` in a spec; an error naming the path."""
    where = f"{WHERE}.parameters[{path}]"
    node: Any = spec
    parts = path.split(".")
    if parts[0] not in ("model", "training"):
        raise TuningError(f"parameter paths start with model. or training., not {parts[0]!r}", where)
    for n, part in enumerate(parts):
        m = _TOKEN.fullmatch(part)
        if m is None:
            raise TuningError(f"cannot read {part!r} in the path {path!r}", where)
        keys: list[Any] = [m.group(1), *(int(i) for i in re.findall(r"\d+", m.group(2)))]
        for k, key in enumerate(keys):
            last = n == len(parts) - 1 and k == len(keys) - 1
            if isinstance(key, int):
                if not isinstance(node, list) or key >= len(node):
                    raise TuningError(f"{path!r}: no item [{key}] there", where)
            elif not isinstance(node, dict):
                raise TuningError(f"{path!r}: {key!r} is not inside an object", where)
            if last:
                node[key] = value
            else:
                node = node[key] if isinstance(key, int) or key in node else node.setdefault(key, {})


def plan(tuning: Tuning, seed: int) -> list[dict[str, Any]]:
    """The trials' parameter sets: every combination (grid) or `trials` random draws (10 unless given).

    The paths are taken in sorted order, not as written: the API server stores object keys sorted, so
    a manifest's order never reaches the pods, and the list (trial numbers included) is the same in
    `kiln train`, in the operator and in every trial pod.
    """
    params: dict[str, Any] = dict(sorted(tuning.parameters.items()))
    if not params:
        raise TuningError("tuning needs at least one parameter", f"{WHERE}.parameters")
    if tuning.algorithm == "grid":
        for path, values in params.items():
            if not isinstance(values, list) or not values:
                raise TuningError("grid search needs a list of values per parameter ({min, max} is for random)",
                                  f"{WHERE}.parameters[{path}]")
        size = math.prod(len(values) for values in params.values())
        if tuning.trials is not None and tuning.trials < size:
            raise TuningError(f"the grid has {size} combinations but trials is {tuning.trials}; "
                              "use algorithm: random to sample fewer", f"{WHERE}.trials")
        if size > MAX_TRIALS:
            raise TuningError(f"the grid has {size} combinations, more than the {MAX_TRIALS} trials a search may run; "
                              "use algorithm: random to sample fewer", f"{WHERE}.parameters")
        return [dict(zip(params, c, strict=True)) for c in itertools.product(*params.values())]
    rng = random.Random(seed)
    return [{path: _draw(rng, path, values) for path, values in params.items()} for _ in range(tuning.trials or 10)]


def _draw(rng: random.Random, path: str, values: Any) -> Any:
    if isinstance(values, list):
        return rng.choice(values)
    if not isinstance(values, dict) or "min" not in values or "max" not in values:
        raise TuningError("a parameter is a list of values or {min, max, log}", f"{WHERE}.parameters[{path}]")
    lo, hi = values["min"], values["max"]
    if not all(type(v) in (int, float) and math.isfinite(v) for v in (lo, hi)):
        raise TuningError(f"min and max must be numbers, got {lo!r} and {hi!r}", f"{WHERE}.parameters[{path}]")
    if not lo < hi or (values.get("log") and lo <= 0):
        raise TuningError(f"needs min < max{' and min > 0 with log' if values.get('log') else ''}",
                          f"{WHERE}.parameters[{path}]")
    if values.get("log"):
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if isinstance(lo, int) and isinstance(hi, int):
        return rng.randint(lo, hi)
    return rng.uniform(lo, hi)


def derived_seed(uid: str) -> int:
    """A seed every trial pod of one TrainingJob computes alike (from its uid) when the spec sets none."""
    return int(hashlib.sha256(uid.encode()).hexdigest()[:8], 16) % 2**31


def trial_spec(spec: dict[str, Any], params: dict[str, Any], seed: int) -> dict[str, Any]:
    """A copy of `spec` for one trial: tuning and deploy off, the shared seed, the trial's values set."""
    out = copy.deepcopy(spec)
    out.pop("tuning", None)
    out.pop("deploy", None)
    out.setdefault("training", {})["seed"] = seed
    for path, value in params.items():
        set_path(out, path, value)
    return out


def better(metric: str) -> int:
    """+1 when a higher `metric` is better (accuracy), -1 when lower is (loss)."""
    return 1 if metric.endswith("accuracy") else -1


def best_index(trials: list[dict[str, Any]], metric: str) -> int | None:
    """The index into `trials` of the best finished one by its `score` (NaN and failed ones never win)."""
    sign = better(metric)
    scored = [(sign * float(t["score"]), -i) for i, t in enumerate(trials)
              if isinstance(t.get("score"), int | float) and math.isfinite(t["score"])]
    if not scored:
        return None
    return -max(scored)[1]


def summarize(tuning: Tuning, trials: list[dict[str, Any]]) -> dict[str, Any]:
    """`status.tuning`'s search part: the trials and the best so far (`best` indexes `trials`, which is
    in trial order, so it is also the trial's number when every trial finished)."""
    out: dict[str, Any] = {"algorithm": tuning.algorithm, "metric": tuning.metric, "trials": trials}
    best = best_index(trials, tuning.metric)
    if best is not None:
        out.update(best=trials[best]["trial"], bestScore=float(trials[best]["score"]),
                   bestParameters=trials[best]["parameters"])
    return out
