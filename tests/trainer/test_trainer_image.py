"""The trainer image definition (Docker cannot run here): static checks of what the operator relies on."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from support.trainer import ROOT

pytestmark = pytest.mark.unit

DOCKERFILE = (ROOT / "images" / "trainer" / "Dockerfile").read_text()


def test_runs_as_numeric_non_root_with_kiln_entrypoint() -> None:
    lines = [ln.strip() for ln in DOCKERFILE.splitlines()]
    assert "USER 65532:65532" in lines
    assert 'ENTRYPOINT ["kiln"]' in lines and 'CMD ["train", "--in-cluster"]' in lines
    assert "ARG TF_IMAGE=tensorflow/tensorflow:2.21.0-gpu" in lines
    assert "--no-deps /wheels/kiln-*.whl" in DOCKERFILE


def test_requirements_leave_the_base_images_tensorflow_alone() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "images" / "trainer" / "trainer_requirements.py"), "s3"],
                         capture_output=True, text=True, check=True).stdout.split("\n")
    names = [re.split(r"[<>=!~;\[ ]", ln)[0] for ln in out if ln]
    assert "tf2onnx" in names and "onnxruntime" in names and "boto3" in names and "pyyaml" in names
    assert not any(n.startswith("tensorflow") for n in names)
    assert "kopf" not in names  # other images' extras stay out


def test_cli_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "train", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "--in-cluster" in proc.stdout and "--output" in proc.stdout
