"""kiln.objectstore against a real S3 server (SeaweedFS on 127.0.0.1): every failure has its own reason.

The slow and dropped connections go through a loopback TCP proxy that stalls or closes real sockets.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from support.seaweed import SeaweedFS, proxy

from kiln import objectstore
from kiln.objectstore import StoreError

pytestmark = pytest.mark.s3


def _put(s3: SeaweedFS, key: str, data: bytes) -> str:
    s3.client().put_object(Bucket=s3.test_bucket, Key=key, Body=data)
    return f"s3://{s3.test_bucket}/{key}"


def test_download_streams_checks_sha256_and_size(s3: SeaweedFS, tmp_path: Path) -> None:
    data = bytes(range(256)) * 9000  # 2.3 MB: more than one read chunk
    uri = _put(s3, "models/m.onnx", data)
    got = objectstore.download(uri, tmp_path / "m.onnx", sha256=hashlib.sha256(data).hexdigest(), max_bytes=len(data))
    assert (tmp_path / "m.onnx").read_bytes() == data
    assert (got.size, got.sha256) == (len(data), hashlib.sha256(data).hexdigest())

    with pytest.raises(StoreError) as info:
        objectstore.download(uri, tmp_path / "too-big.onnx", max_bytes=len(data) - 1)
    assert info.value.reason == "TooLarge" and f"{len(data)} bytes is over the limit" in str(info.value)
    with pytest.raises(StoreError) as info:
        objectstore.download(uri, tmp_path / "bad.onnx", sha256="0" * 64)
    assert info.value.reason == "ChecksumMismatch" and hashlib.sha256(data).hexdigest() in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no partial files left behind


def test_bad_credentials(s3: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = _put(s3, "k", b"x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(StoreError) as info:
        objectstore.download(uri, tmp_path / "k")
    assert info.value.reason == "BadCredentials" and not info.value.retryable
    assert "SignatureDoesNotMatch" in str(info.value) and "spec.storage.secretName" in str(info.value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(StoreError, match="InvalidAccessKeyId") as info:
        objectstore.list_keys(uri)
    assert info.value.reason == "BadCredentials"


def test_missing_bucket_and_missing_key(s3: SeaweedFS, tmp_path: Path) -> None:
    with pytest.raises(StoreError) as info:
        objectstore.download("s3://no-such-bucket-kiln/m.onnx", tmp_path / "m")
    assert info.value.reason == "NoSuchBucket"
    assert "bucket 'no-such-bucket-kiln' does not exist at " + s3.endpoint in str(info.value)
    with pytest.raises(StoreError) as info:
        objectstore.list_keys("s3://no-such-bucket-kiln/")
    assert info.value.reason == "NoSuchBucket"
    with pytest.raises(StoreError) as info:
        objectstore.download(f"s3://{s3.test_bucket}/missing.onnx", tmp_path / "m")
    assert info.value.reason == "NoSuchKey" and f"s3://{s3.test_bucket}/missing.onnx: no such object" in str(info.value)
    assert objectstore.get_bytes(f"s3://{s3.test_bucket}/missing") is None


def test_stalled_connection_times_out_after_retries(s3: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = _put(s3, "k", b"x")
    with proxy(("127.0.0.1", s3.s3_port), "stall") as stall:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", stall.endpoint)
        events: list[dict[str, object]] = []
        start = time.monotonic()
        with pytest.raises(StoreError) as info:
            objectstore.download(uri, tmp_path / "k", timeout=1.0, retries=1, log=events.append)
        took = time.monotonic() - start
    assert info.value.reason == "Timeout" and "did not answer in time" in str(info.value)
    assert "after 2 attempts" in str(info.value)
    assert [e["reason"] for e in events] == ["Timeout"]  # one retry, logged with its reason
    assert stall.connections == 2  # one connection per attempt: botocore retries nothing itself here
    assert took < 10, f"a stalled store must fail within the timeouts, took {took:.1f}s"


def test_dropped_connection_is_a_connection_failure(s3: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = _put(s3, "k", b"x")
    with proxy(("127.0.0.1", s3.s3_port), "drop") as drop:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", drop.endpoint)
        with pytest.raises(StoreError) as info:
            objectstore.download(uri, tmp_path / "k", timeout=2.0, retries=2)
    assert info.value.reason == "ConnectionFailed" and info.value.retryable
    assert f"connection to {drop.endpoint} failed" in str(info.value) and "after 3 attempts" in str(info.value)
    assert drop.connections >= 3
    # Through a proxy that relays, the same call works: the failure above was the connection's.
    with proxy(("127.0.0.1", s3.s3_port), "pass") as ok:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", ok.endpoint)
        assert objectstore.download(uri, tmp_path / "k").size == 1


def test_upload_list_publish_and_delete(s3: SeaweedFS, tmp_path: Path) -> None:
    src = tmp_path / "out"
    (src / "logs" / "train").mkdir(parents=True)
    (src / "model.onnx").write_bytes(b"onnx")
    (src / "result.json").write_text("{}")
    (src / "logs" / "train" / "events").write_bytes(b"ev")
    base = f"s3://{s3.test_bucket}/run"
    objectstore.upload(src, f"{base}/.kiln-staging/abc", last=("result.json",))
    assert objectstore.list_keys(f"{base}/") == ["run/.kiln-staging/abc/logs/train/events", "run/.kiln-staging/abc/model.onnx",
                                                 "run/.kiln-staging/abc/result.json"]
    written = objectstore.publish(f"{base}/.kiln-staging/abc", base, last=("result.json",))
    assert written[-1] == "run/result.json"
    assert s3.keys(s3.test_bucket) == ["run/logs/train/events", "run/model.onnx", "run/result.json"]
    assert objectstore.get_bytes(f"{base}/model.onnx") == b"onnx"
    assert objectstore.delete_prefix(f"{base}/logs") == 1
    assert s3.keys(s3.test_bucket) == ["run/model.onnx", "run/result.json"]


@pytest.mark.unit
def test_gs_and_malformed_uris_are_refused() -> None:
    with pytest.raises(StoreError, match=r"gs:// is not supported: .* use s3://") as info:
        objectstore.parse("gs://bucket/model.onnx")
    assert info.value.reason == "Unsupported"
    with pytest.raises(StoreError, match="has no bucket"):
        objectstore.parse("s3:///key")
    assert objectstore.parse("s3://b/a/b.csv") == objectstore.S3URI("b", "a/b.csv")
    assert str(objectstore.parse("s3://b").child("x")) == "s3://b/x"


@pytest.mark.unit
def test_endpoint_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://general:1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert objectstore.endpoint() == "http://general:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:2")
    assert objectstore.endpoint() == "http://s3-only:2"
    assert objectstore.client().meta.endpoint_url == "http://s3-only:2"
