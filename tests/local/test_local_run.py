"""`kiln run`: the local, cluster-free mode, as a user runs it (a real process, real training, real server)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [pytest.mark.training, pytest.mark.server]

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_trains_serves_and_scores(kiln_cli: Any, tmp_path: Path) -> None:
    proc = kiln_cli("run", "examples/quickstart/digits.yaml", "--once", "--output", str(tmp_path), "--min-accuracy", "0.95",
                    timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    served = re.search(r"served model digits: accuracy ([0-9.]+) on (\d+) held-out rows", out)
    assert served, out
    assert float(served.group(1)) >= 0.95 and int(served.group(2)) > 300
    assert re.search(r"serving digits at http://127\.0\.0\.1:\d+/v2/models/digits", out)
    assert "curl -s http://127.0.0.1:" in out and '"shape": [1, 64]' in out
    assert (tmp_path / "digits" / "model.onnx").exists()


def _write(tmp_path: Path, docs: list[dict[str, Any]]) -> Path:
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump_all(docs))
    return f


def test_user_errors_name_the_document_and_field(kiln_cli: Any, tmp_path: Path) -> None:
    good = yaml.safe_load_all((ROOT / "examples" / "quickstart" / "digits.yaml").read_text())
    tj, md = list(good)
    unknown = _write(tmp_path, [{"apiVersion": "kiln.dev/v1alpha1", "kind": "Notebook", "metadata": {"name": "x"}, "spec": {}}])
    proc = kiln_cli("run", str(unknown), "--once")
    assert proc.returncode == 2 and "document 1" in proc.stderr and "unknown kind 'Notebook'" in proc.stderr

    tj_bad = {**tj, "spec": {**tj["spec"], "training": {**tj["spec"]["training"], "epochs": -1}}}
    invalid = _write(tmp_path, [tj_bad, md])
    proc = kiln_cli("run", str(invalid), "--once")
    assert proc.returncode == 2 and "TrainingJob/digits" in proc.stderr and "spec.training.epochs" in proc.stderr

    missing = {**tj, "spec": {**tj["spec"], "dataset": {**tj["spec"]["dataset"], "uri": "nowhere.csv"}}}
    proc = kiln_cli("run", str(_write(tmp_path, [missing])), "--once", timeout=120)
    assert proc.returncode != 0
    assert "spec.dataset.uri" in proc.stderr + proc.stdout and "nowhere.csv" in proc.stderr + proc.stdout

    orphan = {**md, "spec": {"model": {"trainingJob": "elsewhere"}}}
    proc = kiln_cli("run", str(_write(tmp_path, [orphan])), "--once")
    assert proc.returncode == 2 and "spec.model.trainingJob 'elsewhere'" in proc.stderr
