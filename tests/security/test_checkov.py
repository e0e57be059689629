"""checkov over the chart's rendered objects and Kiln's rendered manifests (scripts/checkov.sh), with the
documented skip list (scripts/checkov-skips.txt): no finding. `scripts/setup.sh --test` installs checkov
into ~/.cache/kiln/checkov-venv; without it this test is skipped and says how to install it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from support.chart import ROOT

pytestmark = [pytest.mark.helm]

CACHE = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln"))
CHECKOV = CACHE / "checkov-venv" / "bin" / "checkov"
SKIPS = ROOT / "scripts" / "checkov-skips.txt"

needs_checkov = pytest.mark.skipif(not CHECKOV.exists(), reason="checkov not installed: bash scripts/checkov.sh --install")


def skip_list() -> dict[str, str]:
    out = {}
    for line in SKIPS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            check, _, reason = line.partition(" ")
            out[check] = reason.strip()
    return out


def test_every_skip_has_a_reason() -> None:
    skips = skip_list()
    assert skips and all(len(reason) > 20 for reason in skips.values()), skips


@needs_checkov
def test_chart_and_rendered_manifests_pass_checkov(tools: Path) -> None:
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "checkov.sh")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HELM": str(tools / "helm")})
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "Failed checks: 0" in proc.stdout and "Passed checks: " in proc.stdout, proc.stdout[-2000:]


@needs_checkov
def test_the_scan_finds_a_privileged_pod(tmp_path: Path) -> None:
    """The same scan with the same skips does fail on a bad object: the test above can fail."""
    (tmp_path / "bad.yaml").write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: bad, namespace: x}\nspec:\n  containers:\n"
        "  - {name: c, image: x:1, securityContext: {privileged: true}}\n")
    proc = subprocess.run([str(CHECKOV), "-d", str(tmp_path), "--framework", "kubernetes", "--compact", "--quiet", "--skip-download",
                           "--skip-check", ",".join(skip_list())], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "CKV_K8S_16" in proc.stdout, proc.stdout[-3000:]
