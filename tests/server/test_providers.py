"""Which execution providers the server runs on: metadata, metric, start log, and `--providers cuda` without a GPU."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from support.server import Server, start_server, wait_until

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]


def test_providers_in_metadata_metric_and_log(mlp_server: Server) -> None:
    meta = mlp_server.get("/v2/models/mlp").json()
    assert meta["parameters"] == {"execution_providers": "CPUExecutionProvider"}
    assert 'kiln_model_execution_providers{model="mlp",provider="CPUExecutionProvider"} 1.0' in mlp_server.metrics()
    ready = next(line for line in mlp_server.log_lines() if line.get("event") == "model_ready")
    assert ready["providers"] == ["CPUExecutionProvider"]


def test_cuda_demanded_without_cuda_is_not_ready_with_the_reason(model_dir: Path, server_tmp: Path) -> None:
    """What a GPU pod on a CPU-only image would do: refuse to serve from the CPU, and say so."""
    s = start_server(model_dir / "mlp.onnx", "mlp", server_tmp, "--providers", "cuda", wait="live")
    try:
        doc = wait_until(lambda: (r := s.get("/v2/health/ready")).status_code == 503 and "failed" in r.text and r.json())
        assert "--providers cuda was requested but ONNX Runtime offers only" in doc["error"]
    finally:
        s.stop()


@pytest.mark.unit
@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine runs the real check, not this one")
def test_gpu_check_says_no_gpu_and_exits_0() -> None:
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "no GPU on this machine" in out.stdout
