"""s3:// datasets and outputs through fsspec/s3fs, against a real S3 API (moto's server on 127.0.0.1).

Skipped when the optional `s3` extra (s3fs) or moto is not installed; the error for a missing extra
is tested with the extra made unimportable.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from support.trainer import blobs, manifest, write_csv, write_manifest

pytestmark = pytest.mark.training

needs_s3 = pytest.mark.skipif(importlib.util.find_spec("s3fs") is None or importlib.util.find_spec("moto") is None,
                              reason="needs the s3 extra (s3fs) and moto")


@needs_s3
def test_s3_dataset_and_output(tmp_path: Path, kiln_train, monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
               "KILN_S3_ENDPOINT": f"http://{host}:{port}"}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        fsspec.config.conf.clear()
        fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": env["KILN_S3_ENDPOINT"]}, skip_instance_cache=True)
        fs.mkdir("kiln-data")
        x, y = blobs()
        write_csv(tmp_path / "data.csv", x, y)
        fs.put_file(str(tmp_path / "data.csv"), "s3://kiln-data/sets/data.csv")
        doc = manifest(dataset={"uri": "s3://kiln-data/sets/data.csv"}, output={"uri": "s3://kiln-data/models/run1"})
        run = kiln_train(write_manifest(tmp_path, doc), spec_output=True)
        assert run.code == 0, run.err
        assert run.termination["modelUri"] == "s3://kiln-data/models/run1/model.onnx"
        fs.invalidate_cache()
        names = {p.rsplit("/", 1)[-1] for p in fs.find("kiln-data/models/run1")}
        assert {"model.onnx", "model.keras", "result.json", "metrics.json", "history.json"} <= names
        assert any(n.startswith("events.out.tfevents") for n in names)
        import hashlib

        assert hashlib.sha256(fs.cat_file("kiln-data/models/run1/model.onnx")).hexdigest() == \
            run.termination["onnxSha256"]
    finally:
        server.stop()


def test_s3_without_the_extra_is_a_clear_error(tmp_path: Path, kiln_train, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if `pip install 'kiln[s3]'` had not been run
    run = kiln_train(write_manifest(tmp_path, manifest(dataset={"uri": "s3://bucket/data.csv"})))
    assert run.code == 2 and run.termination["field"] == "spec.dataset.uri"
    assert "pip install 'kiln[s3]'" in run.termination["error"]
    assert run.left_model() == []
