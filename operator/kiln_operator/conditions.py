"""Times and status conditions, the same for both resources."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


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


def set_condition(conditions: list[dict[str, Any]], type_: str, status: str, reason: str, message: str,
                  now: datetime, generation: int | None = None) -> list[dict[str, Any]]:
    """Conditions with one set; lastTransitionTime moves only when the status flips."""
    out = [dict(c) for c in conditions if c.get("type") != type_]
    old = next((c for c in conditions if c.get("type") == type_), None)
    cond: dict[str, Any] = {"type": type_, "status": status, "reason": reason, "message": message[:1024]}
    unchanged = old is not None and old.get("status") == status and old.get("lastTransitionTime")
    cond["lastTransitionTime"] = old["lastTransitionTime"] if unchanged and old else fmt_time(now)
    if generation is not None:
        cond["observedGeneration"] = generation
    out.append(cond)
    order = {"Created": 0, "Running": 1, "Restarting": 2, "Succeeded": 3, "Failed": 4}
    return sorted(out, key=lambda c: (order.get(c["type"], 9), c["type"]))
