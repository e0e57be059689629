"""The security tests reuse the chart tests' real helm (tests/chart/conftest.py)."""

from __future__ import annotations

import importlib.util

from support.chart import ROOT

_spec = importlib.util.spec_from_file_location("kiln_chart_conftest", ROOT / "tests" / "chart" / "conftest.py")
assert _spec is not None and _spec.loader is not None
_chart = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_chart)
helm = _chart.helm
