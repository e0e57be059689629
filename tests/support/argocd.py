"""Kiln's Argo CD health checks (charts/kiln/argocd/kiln.dev/<Kind>/health.lua) run on a real Lua 5.1.

Argo CD runs health checks on gopher-lua, a Lua 5.1: the script is a chunk with the resource in the
global `obj` (JSON objects as tables, arrays as 1-based tables) that returns {status, message}.
`lupa.lua51` embeds the reference Lua 5.1 interpreter, so what passes here uses nothing newer.
"""

from __future__ import annotations

from typing import Any

import lupa.lua51 as lua
import yaml
from testenv import ROOT

CHECKS = ROOT / "charts" / "kiln" / "argocd" / "kiln.dev"
KINDS = ("TrainingJob", "ModelDeployment")
KSTATUS_TO_HEALTH = {"Current": "Healthy", "Failed": "Degraded", "InProgress": "Progressing"}
"""What Argo CD must say where kstatus says this (Suspended TrainingJobs aside: Argo CD has a word for them)."""


def script(kind: str) -> str:
    return (CHECKS / kind / "health.lua").read_text()


def _to_lua(runtime: Any, value: Any) -> Any:
    if isinstance(value, dict):
        return runtime.table_from({k: _to_lua(runtime, v) for k, v in value.items()})
    if isinstance(value, list):
        return runtime.table_from([_to_lua(runtime, v) for v in value])
    return value


def health(obj: dict[str, Any]) -> dict[str, str]:
    """{status, message} as Argo CD's health check for the object's kind computes it."""
    runtime = lua.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = _to_lua(runtime, obj)
    result = runtime.execute(script(obj["kind"]))
    return {"status": str(result["status"]), "message": str(result["message"] or "")}


def health_cases(kind: str) -> list[tuple[dict[str, Any], dict[str, str], str]]:
    """(object, expected healthStatus, input path) from the kind's health_test.yaml, upstream's format."""
    folder = CHECKS / kind
    cases = yaml.safe_load((folder / "health_test.yaml").read_text())["tests"]
    return [(yaml.safe_load((folder / c["inputPath"]).read_text()), c["healthStatus"], c["inputPath"]) for c in cases]
