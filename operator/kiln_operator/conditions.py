"""Times and status conditions, the same for both resources.

Conditions follow metav1.Condition (type, status, reason, message, lastTransitionTime,
observedGeneration: all but the last required), because that is what `kubectl wait`, kstatus (Flux)
and Argo CD read. Every resource carries its full set from the first status write, False where not
(yet) true: a resource that only ever sets Ready when True looks reconciled to kstatus.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

REASON_PATTERN = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
"""metav1.Condition's reason pattern (the CRD schema enforces it; a bad one would fail the whole patch)."""
ORDER = {t: i for i, t in enumerate(("Created", "Running", "Restarting", "Succeeded", "Failed", "ModelResolved",
                                     "Available", "PredictorReady", "CanaryReady", "AutoscalerReady", "Ready", "Reconciling",
                                     "Stalled"))}


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def fmt_time(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def valid_reason(reason: str, fallback: str) -> str:
    """`reason` if it is a metav1.Condition reason, else `fallback` (reasons partly come from pods and Deployments)."""
    reason = (reason or "")[:1024]
    return reason if REASON_PATTERN.match(reason) else fallback


def set_condition(conditions: list[dict[str, Any]], type_: str, status: str, reason: str, message: str,
                  now: datetime, generation: int | None = None) -> list[dict[str, Any]]:
    """Conditions with one set; lastTransitionTime moves only when the status flips."""
    out = [dict(c) for c in conditions if c.get("type") != type_]
    old = next((c for c in conditions if c.get("type") == type_), None)
    cond: dict[str, Any] = {"type": type_, "status": status, "reason": valid_reason(reason, type_ if status == "True" else f"Not{type_}"),
                            "message": message[:32768]}
    unchanged = old is not None and old.get("status") == status and old.get("lastTransitionTime")
    cond["lastTransitionTime"] = old["lastTransitionTime"] if unchanged and old else fmt_time(now)
    if generation is not None:
        cond["observedGeneration"] = generation
    out.append(cond)
    return sorted(out, key=lambda c: (ORDER.get(c["type"], 99), c["type"]))


def set_all(conditions: list[dict[str, Any]], wanted: list[tuple[str, str, str, str]], now: datetime,
            generation: int | None) -> list[dict[str, Any]]:
    """Set several (type, status, reason, message) at once."""
    for type_, status, reason, message in wanted:
        conditions = set_condition(conditions, type_, status, reason, message, now, generation)
    return conditions


def stamp(conditions: list[dict[str, Any]], generation: int | None) -> list[dict[str, Any]]:
    """Every condition marked as observed at `generation` (a spec edit was seen; `kubectl wait` needs it)."""
    if generation is None:
        return [dict(c) for c in conditions]
    return [{**c, "observedGeneration": generation} for c in conditions]


@dataclass(frozen=True)
class Change:
    """One condition that flipped (or appeared): what the Kubernetes Event for it says."""

    type: str
    status: str
    reason: str
    message: str

    @property
    def warning(self) -> bool:
        return (self.type in ("Stalled", "Failed") and self.status == "True") or (self.type == "Ready" and self.status == "False")


def changes(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[Change]:
    """Conditions whose status or reason differs from before (a new condition counts as a change)."""
    before = {c.get("type"): c for c in old}
    out = []
    for c in new:
        prev = before.get(c["type"])
        if prev is None or prev.get("status") != c["status"] or prev.get("reason") != c.get("reason"):
            out.append(Change(c["type"], c["status"], c.get("reason", ""), c.get("message", "")))
    return out


def change_event(changed: list[Change]) -> tuple[str, str, str] | None:
    """(type, reason, message) of the one Event that reports these condition changes, or None.

    One Event per status write lists every condition that changed in it (rather than one per
    condition): a TrainingJob's success flips four conditions at once, and under a burst of
    hundreds the API server's time is better spent creating Jobs than posting four Events each.
    """
    if not changed:
        return None
    kind = "Warning" if any(c.warning for c in changed) else "Normal"
    text = "; ".join(f"{c.type}={c.status} ({c.reason})" for c in changed)
    detail = next((c.message for c in changed if c.message), "")
    return kind, "ConditionsChanged", f"{text}: {detail}" if detail else text


def condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    """The condition of `type_` in a status, or None."""
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), None)
