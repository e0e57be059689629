"""s3:// datasets, outputs and checkpoints against the real S3 server (SeaweedFS on 127.0.0.1).

Datasets: one object (CSV, Parquet, NPZ) or a prefix of several parts. Outputs: built locally, uploaded
to a staging prefix, published (result.json last); checkpoints go to the store each epoch, so a
trainer killed mid-run and started again (with a fresh local disk) resumes from the stored one.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from support.progress_server import ProgressServer
from support.seaweed import SeaweedFS
from support.trainer import blobs, manifest, popen_train, subprocess_env, write_csv, write_manifest

pytestmark = [pytest.mark.training, pytest.mark.s3]


def _put(s3: SeaweedFS, path: Path, key: str) -> str:
    s3.client().upload_file(str(path), s3.test_bucket, key)
    return f"s3://{s3.test_bucket}/{key}"


def test_s3_dataset_to_s3_output(s3: SeaweedFS, tmp_path: Path, kiln_train) -> None:
    x, y = blobs(n=150)
    data = _put(s3, write_csv(tmp_path / "data.csv", x, y), "sets/data.csv")
    out = f"s3://{s3.test_bucket}/models/run1"
    run = kiln_train(write_manifest(tmp_path, manifest(dataset={"uri": data}, output={"uri": out})), spec_output=True)
    assert run.code == 0, run.out + run.err
    assert run.termination["modelUri"] == f"{out}/model.onnx"
    keys = s3.keys(s3.test_bucket, "models/run1/")
    names = {k.removeprefix("models/run1/") for k in keys}
    assert {"model.onnx", "result.json", "history.json", "training-curves.png", "metrics.json"} <= names
    assert any(n.startswith("logs/") for n in names), names  # TensorBoard event files
    assert not any(n.startswith((".kiln-staging/", "checkpoints/")) for n in names), names
    result = json.loads(s3.client().get_object(Bucket=s3.test_bucket, Key="models/run1/result.json")["Body"].read())
    model = s3.client().get_object(Bucket=s3.test_bucket, Key="models/run1/model.onnx")["Body"].read()
    import hashlib

    assert result["onnxSha256"] == hashlib.sha256(model).hexdigest()


def _parts(tmp_path: Path, fmt: str) -> list[Path]:
    x, y = blobs(n=180)
    files = []
    for i, (xs, ys) in enumerate(((x[:90], y[:90]), (x[90:], y[90:]))):
        path = tmp_path / f"part-{i}.{fmt}"
        if fmt == "npz":
            np.savez(path, x=xs.astype("float32"), y=ys)
        elif fmt == "parquet":
            import pandas as pd

            df = pd.DataFrame(xs, columns=[f"f{j}" for j in range(4)])
            df["label"] = ys
            df.to_parquet(path)
        else:
            write_csv(path, xs, ys)
        files.append(path)
    return files


@pytest.mark.parametrize(("fmt", "prefix"), [("csv", True), ("parquet", False), ("parquet", True), ("npz", True)])
def test_s3_dataset_formats_and_prefixes(s3: SeaweedFS, tmp_path: Path, kiln_train, fmt: str, prefix: bool) -> None:
    files = _parts(tmp_path, fmt)
    for f in files:
        _put(s3, f, f"sets/{fmt}/{f.name}")
    s3.client().put_object(Bucket=s3.test_bucket, Key=f"sets/{fmt}/_SUCCESS", Body=b"")  # markers are skipped
    uri = f"s3://{s3.test_bucket}/sets/{fmt}" + ("/" if prefix else f"/part-0.{fmt}")
    run = kiln_train(write_manifest(tmp_path, manifest(dataset={"uri": uri})))
    assert run.code == 0, run.out + run.err
    report = json.loads((run.output / "data-report.json").read_text())
    assert report["rowsRead"] == (180 if prefix else 90), report


def test_s3_dataset_errors_are_specific(s3: SeaweedFS, tmp_path: Path, kiln_train, monkeypatch: pytest.MonkeyPatch) -> None:
    run = kiln_train(write_manifest(tmp_path, manifest(dataset={"uri": f"s3://{s3.test_bucket}/nothing/here.csv"})))
    assert run.code == 2 and run.termination["field"] == "spec.dataset.uri"
    assert "NoSuchKey: " in run.termination["error"]
    run = kiln_train(write_manifest(tmp_path, manifest(dataset={"uri": "s3://kiln-no-such-bucket/d.csv"})))
    assert run.code == 2 and "NoSuchBucket: " in run.termination["error"]
    run = kiln_train(write_manifest(tmp_path, manifest(dataset={"uri": "gs://bucket/d.csv"})))
    assert run.code == 2 and "gs:// is not supported" in run.termination["error"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    run = kiln_train(write_manifest(tmp_path, manifest(dataset={"uri": f"s3://{s3.test_bucket}/d.csv"})))
    assert run.code == 2 and "BadCredentials: " in run.termination["error"]
    assert not run.left_model()


def test_failed_publish_leaves_nothing_half_written(s3: SeaweedFS, tmp_path: Path) -> None:
    from kiln_trainer import storage
    from kiln_trainer.errors import TrainerError

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"model")
    (out / "result.json").symlink_to(tmp_path / "vanished.json")  # its upload fails, after model.onnx was staged
    loc = storage.resolve(f"s3://{s3.test_bucket}/models/half", tmp_path, "spec.output.uri")
    with pytest.raises(TrainerError, match=r"LocalFileError: .*result\.json"):
        storage.stage_and_publish(out, loc, ["model.onnx", "result.json"], "spec.output.uri")
    assert s3.keys(s3.test_bucket, "models/half") == []  # neither the model nor its staging copy


def test_failed_rerun_removes_the_earlier_success_markers(s3: SeaweedFS, tmp_path: Path, kiln_train) -> None:
    x, y = blobs(n=120)
    data = _put(s3, write_csv(tmp_path / "data.csv", x, y), "d.csv")
    out = f"s3://{s3.test_bucket}/m"
    assert kiln_train(write_manifest(tmp_path, manifest(dataset={"uri": data}, output={"uri": out})), spec_output=True).code == 0
    assert "m/result.json" in s3.keys(s3.test_bucket, "m/")
    bad = manifest(dataset={"uri": data}, output={"uri": out},
                   model={"inputShape": [5], "layers": [{"type": "Dense", "units": 3, "activation": "softmax"}]})
    run = kiln_train(write_manifest(tmp_path, bad), spec_output=True)
    assert run.code == 2, run.out
    left = s3.keys(s3.test_bucket, "m/")
    assert "m/result.json" not in left and "m/model.onnx" not in left, left


@pytest.mark.slow
def test_killed_trainer_resumes_from_the_stored_checkpoint(s3: SeaweedFS, tmp_path: Path) -> None:
    x, y = blobs(n=300)
    data = _put(s3, write_csv(tmp_path / "data.csv", x, y), "d.csv")
    out = f"s3://{s3.test_bucket}/resume"
    doc = manifest(dataset={"uri": data}, output={"uri": out}, training={"epochs": 5, "seed": 3, "batchSize": 16})
    path = write_manifest(tmp_path, doc)
    with ProgressServer(hold_epoch=2) as server:
        env = subprocess_env(KILN_TRAININGJOB="t", KILN_NAMESPACE="ns", KILN_API_SERVER=server.url, **s3.env())
        proc = popen_train([str(path)], env, tmp_path)
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("epoch 2/5"):
                break
        assert server.held.wait(60), "".join(seen)
        proc.send_signal(signal.SIGKILL)  # like a node lost: the local scratch folder goes with it
        proc.wait(30)
        proc.stdout.close()
    stored = s3.keys(s3.test_bucket, "resume/")
    assert s3.client().get_object(Bucket=s3.test_bucket, Key="resume/checkpoints/latest")["Body"].read() == b"epoch-00002"
    assert "resume/result.json" not in stored and "resume/model.onnx" not in stored
    assert not any("epoch-00001" in k for k in stored), stored  # older epochs are dropped from the store

    with ProgressServer() as server:
        env = subprocess_env(KILN_TRAININGJOB="t", KILN_NAMESPACE="ns", KILN_API_SERVER=server.url, **s3.env())
        proc = popen_train([str(path)], env, tmp_path)
        log, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, log
    assert "resuming from checkpoint: 2 of 5 epochs done" in log
    assert [ln.split()[1] for ln in log.splitlines() if ln.startswith("epoch ")] == ["3/5", "4/5", "5/5"]
    stored = s3.keys(s3.test_bucket, "resume/")
    assert {"resume/model.onnx", "resume/result.json"} <= set(stored)
    assert not any(k.startswith("resume/checkpoints/") for k in stored), stored
    history = json.loads(s3.client().get_object(Bucket=s3.test_bucket, Key="resume/history.json")["Body"].read())
    assert len(history["loss"]) == 5


def test_s3_without_the_extra_is_a_clear_error(tmp_path: Path, kiln_train, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # as if `pip install 'kiln[s3]'` had not been run
    run = kiln_train(write_manifest(tmp_path, manifest(dataset={"uri": "s3://bucket/data.csv"})))
    assert run.code == 2
    assert "pip install 'kiln[s3]'" in run.termination["error"]
