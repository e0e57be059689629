"""The operator's pods from the chart meet the same restricted Pod Security Standard as trainer and server pods."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

from test_security_unit import restricted_violations

pytestmark = [pytest.mark.helm]


@pytest.mark.parametrize("values", [{}, {"peering": {"enabled": True}, "standby": {"enabled": True}}])
def test_chart_pods_are_restricted(render: Callable[..., list[dict[str, Any]]], values: dict[str, Any]) -> None:
    pods = [d["spec"]["template"]["spec"] for d in render(values, include_crds=False) if d["kind"] == "Deployment"]
    assert pods
    for pod in pods:
        assert restricted_violations(pod) == [], restricted_violations(pod)
