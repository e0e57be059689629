"""Which TrainingJob a ModelDeployment follows, and serving the previous model while a new one trains.

Retraining without deleting anything: a TrainingJob is a record of one run (its spec is frozen), so a
new model comes from a new TrainingJob. A ModelDeployment names one (`spec.model.trainingJob`, which a
re-created TrainingJob of that name also matches) or selects many by label
(`spec.model.trainingJobSelector`) and serves the newest one that succeeded. Until a newer one has
succeeded, the model already served keeps being served, Ready stays True, and `ModelResolved` says
why the served model is the previous one (retraining, or the new run failed).
"""

from __future__ import annotations

from typing import Any

from kiln.labels import selector_matches
from kiln_operator.modeldeployment.render import ModelRef, Resolution, resolve_model


def follows(md: dict[str, Any], tj: dict[str, Any]) -> bool:
    """Whether `md` follows `tj` (same namespace assumed): by name, by selector, or it is the served model's source."""
    model = (md.get("spec") or {}).get("model") or {}
    meta = tj.get("metadata") or {}
    if model.get("trainingJob"):
        return bool(model["trainingJob"] == meta.get("name"))
    if model.get("trainingJobSelector") is not None:
        served = ((md.get("status") or {}).get("model") or {}).get("trainingJob")
        return selector_matches(model["trainingJobSelector"], meta.get("labels")) or served == meta.get("name")
    return False


def _newest_key(tj: dict[str, Any]) -> tuple[str, str, str]:
    st, meta = tj.get("status") or {}, tj.get("metadata") or {}
    return st.get("completionTime") or "", meta.get("creationTimestamp") or "", meta.get("name") or ""


def _by_selector(md: dict[str, Any], trainingjobs: list[dict[str, Any]]) -> Resolution:
    selector = ((md.get("spec") or {}).get("model") or {}).get("trainingJobSelector") or {}
    matching = [t for t in trainingjobs if selector_matches(selector, (t.get("metadata") or {}).get("labels"))]
    succeeded = [t for t in matching if (t.get("status") or {}).get("phase") == "Succeeded"]
    if succeeded:
        best = max(succeeded, key=_newest_key)
        resolution = resolve_model(md, best)
        if resolution.model is not None:
            others = len(matching) - 1
            resolution.reason = "NewestSucceeded"
            resolution.message = (f"newest succeeded TrainingJob {best['metadata']['name']} "
                                  f"({others} other(s) match spec.model.trainingJobSelector)")
        return resolution
    if matching:
        newest = max(matching, key=lambda t: ((t.get("metadata") or {}).get("creationTimestamp") or "", t["metadata"]["name"]))
        return resolve_model(md, newest)
    return Resolution(None, "NoTrainingJobMatches", f"no TrainingJob matches spec.model.trainingJobSelector {selector}")


def _previous(md: dict[str, Any], resolution: Resolution) -> Resolution:
    """Keep serving the model already served from a followed TrainingJob when the newest has no model (yet)."""
    served = (md.get("status") or {}).get("model") or {}
    if resolution.model is not None or not served.get("uri") or not served.get("trainingJob"):
        return resolution
    model = ModelRef(served["uri"], served.get("sha256", ""), served["trainingJob"], served.get("format", "onnx"))
    training = resolution.reason in ("TrainingJobNotSucceeded",)
    reason = "Retraining" if training else resolution.reason
    message = f"{resolution.message}; serving the previous model {model.uri} (TrainingJob {model.trainingJob}) meanwhile"
    return Resolution(model, reason, message, failed=False, previous=True)


def resolve_followed(md: dict[str, Any], trainingjobs: list[dict[str, Any]]) -> Resolution:
    """The model to serve, given every TrainingJob of the ModelDeployment's namespace."""
    model = (md.get("spec") or {}).get("model") or {}
    if model.get("uri"):
        return resolve_model(md, None)
    if model.get("trainingJobSelector") is not None:
        return _previous(md, _by_selector(md, trainingjobs))
    name = model.get("trainingJob")
    tj = next((t for t in trainingjobs if (t.get("metadata") or {}).get("name") == name), None)
    return _previous(md, resolve_model(md, tj))


def canary_view(md: dict[str, Any]) -> dict[str, Any] | None:
    """`md` as the canary sees it: `spec.canary.model` as its model and `status.canary.model` as the one it
    serves, so the canary is resolved (and follows TrainingJobs) exactly as `spec.model` is; None without one."""
    spec = md.get("spec") or {}
    if not spec.get("canary"):
        return None
    status = md.get("status") or {}
    return {**md, "spec": {**spec, "model": spec["canary"].get("model") or {}},
            "status": {**status, "model": (status.get("canary") or {}).get("model")}}
