"""Helpers for the Helm chart tests: where the chart is and how values reach `helm template`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kiln"


def set_args(values: dict[str, Any] | None) -> list[str]:
    """`--set-json key=value` for each (dotted) key, keeping exact JSON types."""
    out: list[str] = []
    for key, value in (values or {}).items():
        out += ["--set-json", f"{key}={json.dumps(value)}"]
    return out
