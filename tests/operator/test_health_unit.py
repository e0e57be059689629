"""The kstatus checker and Kiln's Argo CD health checks (Lua 5.1) on statuses recorded from the live tests."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from support.argocd import KINDS, KSTATUS_TO_HEALTH, health, health_cases
from support.kstatus import compute, violations

pytestmark = [pytest.mark.unit]

CASES = [(kind, *case) for kind in KINDS for case in health_cases(kind)]


@pytest.mark.parametrize(("kind", "obj", "expected", "path"), CASES, ids=[f"{c[0]}:{c[3]}" for c in CASES])
def test_argocd_health_check_cases(kind: str, obj: dict[str, Any], expected: dict[str, str], path: str) -> None:
    """Upstream's health_test.yaml format: each recorded status gives exactly this status and message."""
    assert obj["kind"] == kind
    assert health(obj) == expected


@pytest.mark.parametrize(("kind", "obj", "expected", "path"), CASES, ids=[f"{c[0]}:{c[3]}" for c in CASES])
def test_argocd_agrees_with_kstatus(kind: str, obj: dict[str, Any], expected: dict[str, str], path: str) -> None:
    """Argo CD and Flux (kstatus) never disagree on a recorded status (Argo CD alone knows Suspended)."""
    phase = (obj.get("status") or {}).get("phase")
    want = "Suspended" if phase == "Suspended" else KSTATUS_TO_HEALTH[compute(obj)[0]]
    if phase is None:
        want = "Progressing"  # kstatus calls an object without status Current: the gap Kiln closes by writing at once
    assert expected["status"] == want
    assert not violations(obj)


def test_every_health_status_is_covered() -> None:
    statuses = {(kind, expected["status"]) for kind, _, expected, _ in CASES}
    assert {("TrainingJob", s) for s in ("Healthy", "Progressing", "Degraded", "Suspended")} <= statuses
    assert {("ModelDeployment", s) for s in ("Healthy", "Progressing", "Degraded")} <= statuses


def recorded(kind: str, phase: str) -> dict[str, Any]:
    return copy.deepcopy(next(obj for k, obj, _, _ in CASES if k == kind and (obj.get("status") or {}).get("phase") == phase))


def test_kstatus_rules_in_order() -> None:
    done = recorded("TrainingJob", "Succeeded")
    assert compute(done)[0] == "Current"
    behind = copy.deepcopy(done)
    behind["metadata"]["generation"] = done["status"]["observedGeneration"] + 1
    assert compute(behind)[0] == "InProgress" and health(behind)["status"] == "Progressing"
    deleting = copy.deepcopy(done)
    deleting["metadata"]["deletionTimestamp"] = "2026-12-02T00:00:00Z"
    assert compute(deleting)[0] == "Terminating"
    failed = recorded("TrainingJob", "Failed")
    assert compute(failed)[0] == "Failed"
    running = recorded("TrainingJob", "Running")
    assert compute(running)[0] == "InProgress"


def test_violations_catch_what_breaks_the_tools() -> None:
    failed = recorded("TrainingJob", "Failed")
    assert not violations(failed)
    no_stalled = copy.deepcopy(failed)
    no_stalled["status"]["conditions"] = [c for c in failed["status"]["conditions"] if c["type"] != "Stalled"]
    found = violations(no_stalled)
    assert any("missing ['Stalled']" in v for v in found) and any("kstatus says InProgress" in v for v in found)
    no_gen = copy.deepcopy(failed)
    del no_gen["status"]["observedGeneration"]
    assert any("no status.observedGeneration" in v for v in violations(no_gen))
    bare = copy.deepcopy(failed)
    del bare["status"]["conditions"][0]["lastTransitionTime"]
    assert any("lacks ['lastTransitionTime']" in v for v in violations(bare))
    md = recorded("ModelDeployment", "Ready")
    assert not violations(md)
    unready = copy.deepcopy(md)
    unready["status"]["conditions"] = [c for c in md["status"]["conditions"] if c["type"] != "Ready"]
    assert any("missing ['Ready']" in v for v in violations(unready))


def flux_exprs() -> dict[str, dict[str, str]]:
    """The healthCheckExprs of docs/gitops.md, by kind (the doc's example is what is tested)."""
    import re

    import yaml
    from testenv import ROOT

    text = (ROOT / "docs" / "gitops.md").read_text()
    block = re.search(r"<!-- flux-cel.*?-->\n```yaml\n(.*?)```", text, re.S)
    assert block, "docs/gitops.md lost its flux-cel example"
    return {e["kind"]: e for e in yaml.safe_load(block.group(1))["spec"]["healthCheckExprs"]}


def flux_status(exprs: dict[str, str], obj: dict[str, Any]) -> str:
    """Flux's order: inProgress, failed, current; anything else is InProgress."""
    import celpy

    env = celpy.Environment()
    data = {k: celpy.json_to_cel(v) for k, v in obj.items()}
    for key, result in (("inProgress", "InProgress"), ("failed", "Failed"), ("current", "Current")):
        if key in exprs and bool(env.program(env.compile(exprs[key])).evaluate(data)):
            return result
    return "InProgress"


WRITTEN = [c for c in CASES if "status" in c[1]]
"""Cases with a status (the expressions reference it; before the first write Flux's CEL errors, and waits)."""


@pytest.mark.parametrize(("kind", "obj", "expected", "path"), WRITTEN, ids=[f"{c[0]}:{c[3]}" for c in WRITTEN])
def test_flux_cel_from_the_docs_agrees_with_kstatus(kind: str, obj: dict[str, Any], expected: dict[str, str], path: str) -> None:
    assert flux_status(flux_exprs()[kind], obj) == compute(obj)[0]
