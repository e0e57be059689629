"""Resume: a run killed after epoch k continues at epoch k+1 from the checkpoint in the output folder.

Synchronisation is on events, never on sleeps: we read the trainer's log until it prints
"epoch 2/6", and the progress server holds that epoch's PATCH open (the trainer is then inside
its epoch-2 callback, checkpoint already written) until we have sent SIGKILL.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from support.progress_server import ProgressServer
from support.trainer import blobs, manifest, popen_train, subprocess_env, write_csv, write_manifest

pytestmark = [pytest.mark.training, pytest.mark.slow]


def test_killed_run_resumes_at_next_epoch(tmp_path: Path) -> None:
    x, y = blobs(n=300)
    write_csv(tmp_path / "data.csv", x, y)
    doc = manifest(training={"epochs": 6, "seed": 5, "batchSize": 16,
                             "earlyStopping": {"monitor": "val_loss", "patience": 50}})
    path = write_manifest(tmp_path, doc)
    out = tmp_path / "out"
    with ProgressServer(hold_epoch=2) as server:
        env = subprocess_env(KILN_TRAININGJOB="t", KILN_NAMESPACE="ns", KILN_API_SERVER=server.url)
        proc = popen_train([str(path), "--output", str(out)], env, tmp_path)
        seen = []
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("epoch 2/6"):
                break
        assert server.held.wait(60), "".join(seen)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "result.json").exists() and not (out / "model.onnx").exists()
    assert (out / "checkpoints" / "latest").read_text() == "epoch-00002"

    with ProgressServer() as server:
        env = subprocess_env(KILN_TRAININGJOB="t", KILN_NAMESPACE="ns", KILN_API_SERVER=server.url)
        proc = popen_train([str(path), "--output", str(out)], env, tmp_path)
        log, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, log
    assert "resuming from checkpoint: 2 of 6 epochs done" in log
    epoch_lines = [ln.split()[1] for ln in log.splitlines() if ln.startswith("epoch ")]
    assert epoch_lines == ["3/6", "4/6", "5/6", "6/6"]
    history = json.loads((out / "history.json").read_text())
    assert len(history["loss"]) == 6
    result = json.loads((out / "result.json").read_text())
    assert result["epochsRun"] == 6 and result["seed"] == 5
    assert [r["body"]["status"]["progress"]["epoch"] for r in server.requests][:4] == [3, 4, 5, 6]
    assert not (out / "checkpoints").exists()


def test_sigterm_fails_cleanly_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    x, y = blobs(n=120)
    write_csv(tmp_path / "data.csv", x, y)
    path = write_manifest(tmp_path, manifest(training={"epochs": 4, "seed": 5}))
    out, term = tmp_path / "out", tmp_path / "termination-log"
    with ProgressServer(hold_epoch=1) as server:
        env = subprocess_env(KILN_TRAININGJOB="t", KILN_NAMESPACE="ns", KILN_API_SERVER=server.url,
                             KILN_TERMINATION_LOG=str(term))
        proc = popen_train([str(path), "--output", str(out)], env, tmp_path)
        assert server.held.wait(120)
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, log
    message = json.loads(term.read_text())
    assert "SIGTERM" in message["error"] and message["field"] is None
    assert not (out / "result.json").exists() and not (out / "model.onnx").exists()
    assert not (out / ".kiln-staging").exists()
    assert (out / "checkpoints" / "latest").read_text() == "epoch-00001"
