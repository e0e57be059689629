"""Progress reporting: PATCHes of status.progress to a real HTTP server, and in-cluster detection."""

from __future__ import annotations

from pathlib import Path

import pytest
from kiln_trainer.progress import Progress, StatusPatcher
from support.progress_server import ProgressServer
from support.trainer import blobs, manifest, write_csv, write_manifest

pytestmark = pytest.mark.training


def test_each_epoch_patches_status_progress(tmp_path: Path, kiln_train) -> None:
    x, y = blobs()
    write_csv(tmp_path / "data.csv", x, y)
    (tmp_path / "token").write_text("s3cret\n")
    with ProgressServer() as server:
        env = {"KILN_TRAININGJOB": "digits", "KILN_NAMESPACE": "team-a", "KILN_API_SERVER": server.url,
               "KILN_API_TOKEN_FILE": str(tmp_path / "token")}
        run = kiln_train(write_manifest(tmp_path, manifest(training={"epochs": 3, "seed": 0})), env=env)
    assert run.code == 0, run.err
    assert [r["body"]["status"]["progress"]["epoch"] for r in server.requests] == [1, 2, 3, 3]
    for r in server.requests:
        assert r["path"] == "/apis/kiln.dev/v1alpha1/namespaces/team-a/trainingjobs/digits/status"
        assert r["headers"]["Content-Type"] == "application/merge-patch+json"
        assert r["headers"]["Authorization"] == "Bearer s3cret"
        assert set(r["body"]) == {"status"} and set(r["body"]["status"]) == {"progress"}
    first = server.requests[0]["body"]["status"]["progress"]
    assert (first["epochs"], first["percent"]) == (3, 33)
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(first["metrics"])
    assert first["updateTime"].endswith("Z")
    assert server.requests[-1]["body"]["status"]["progress"]["percent"] == 100


def test_failing_patch_warns_but_training_succeeds(tmp_path: Path, kiln_train) -> None:
    x, y = blobs()
    write_csv(tmp_path / "data.csv", x, y)
    with ProgressServer(status=403) as server:
        env = {"KILN_TRAININGJOB": "t", "KILN_NAMESPACE": "ns", "KILN_API_SERVER": server.url,
               "KILN_API_TOKEN_FILE": str(tmp_path / "absent-token")}
        run = kiln_train(write_manifest(tmp_path, manifest()), env=env)
    assert run.code == 0
    assert len(server.requests) == 3
    assert "progress: PATCH" in run.err and "HTTP 403" in run.err


def test_unreachable_api_server_is_only_a_warning() -> None:
    patcher = StatusPatcher("http://127.0.0.1:9", "ns", "t", None, None, False, timeout=2)
    assert patcher.patch(Progress(1, 2, {"loss": 1.0}, "2026-01-01T00:00:00Z")) is False


def test_in_cluster_detection(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t")
    base = {"KILN_TRAININGJOB": "job", "KILN_NAMESPACE": "ns", "KUBERNETES_SERVICE_HOST": "10.0.0.1",
            "KUBERNETES_SERVICE_PORT": "443", "KILN_API_TOKEN_FILE": str(token)}
    p = StatusPatcher.from_env(base)
    assert p is not None
    assert p.url == "https://10.0.0.1:443/apis/kiln.dev/v1alpha1/namespaces/ns/trainingjobs/job/status"
    assert StatusPatcher.from_env({**base, "KILN_API_TOKEN_FILE": str(tmp_path / "none")}) is None
    assert StatusPatcher.from_env({k: v for k, v in base.items() if k != "KILN_NAMESPACE"}) is None
    assert StatusPatcher.from_env({k: v for k, v in base.items() if k != "KUBERNETES_SERVICE_HOST"}) is None
    insecure = StatusPatcher.from_env({**base, "KILN_API_SERVER": "https://127.0.0.1:6443", "KILN_API_INSECURE": "1"})
    assert insecure is not None and insecure.context is not None and not insecure.context.check_hostname
    assert Progress(1, 3).line() == "epoch 1/3"
