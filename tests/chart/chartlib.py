"""Helpers shared by the chart tests (a module of its own: every test folder has a `conftest`)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kiln"
# The TrainingJob/ModelDeployment live scenarios are reused from tests/operator.
sys.path.insert(0, str(ROOT / "tests" / "operator"))


def set_args(values: dict[str, Any] | None) -> list[str]:
    """`--set-json key=value` for each (dotted) key, keeping exact JSON types."""
    out: list[str] = []
    for key, value in (values or {}).items():
        out += ["--set-json", f"{key}={json.dumps(value)}"]
    return out


def session_conftest() -> ModuleType:
    """tests/conftest.py's helpers (OperatorProcess, make_namespace) under a module name of their own:
    the name `conftest` is shared by every test folder, so a plain import would find the wrong one."""
    name = "kiln_tests_session_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "conftest.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
