"""S3 for every Kiln part (trainer, the server's fetch, `kiln run`): one client, one set of error reasons.

Why one module in the core: the trainer image and the server image both carry `kiln`, and a dataset,
a checkpoint and a model must be found with the same credentials, endpoint and failure messages.
Credentials and endpoint come the way every AWS tool takes them: `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`), `AWS_REGION`, `AWS_ENDPOINT_URL_S3` /
`AWS_ENDPOINT_URL`, or botocore's own chain (IRSA web identity, instance profile, ~/.aws). boto3 is the
optional extra `s3`, imported only when an `s3://` URI is used.

Downloads are streamed with a per-read timeout, retried with exponential backoff (a stalled or dropped
connection fails with `Timeout`/`ConnectionFailed` after the last attempt instead of hanging), refused
before the transfer when larger than a limit, and checked against a sha256 when one is given.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from kiln.spec import Storage

CHUNK = 1 << 20
DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 4
INSTALL_HINT = "pip install 'kiln[s3]'"
GS_REFUSED = ("gs:// is not supported: Kiln reads and writes object storage through the S3 API; "
              "use s3:// (Google Cloud Storage answers it at https://storage.googleapis.com with HMAC keys) or pvc://")
# Error codes S3 servers answer with for credentials that are wrong, as opposed to permissions.
_BAD_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "AuthorizationHeaderMalformed"}
_NOT_FOUND_KEY = {"NoSuchKey", "404", "NotFound"}

LogFn = Callable[[dict[str, object]], None]


class StoreError(Exception):
    """An object-store operation failed. `reason` is a short CamelCase word for statuses
    (NoSuchBucket, NoSuchKey, BadCredentials, AccessDenied, Timeout, ConnectionFailed, TooLarge,
    ChecksumMismatch, MissingDependency, Unsupported, LocalFileError, StoreError); `retryable` says whether trying again may help."""

    def __init__(self, reason: str, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable


@dataclass(frozen=True)
class S3URI:
    """`s3://bucket/key`: the key may be empty (the whole bucket) or a prefix ending in `/`."""

    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def child(self, name: str) -> S3URI:
        """The URI of `name` under this one, taken as a folder."""
        base = self.key.rstrip("/")
        return S3URI(self.bucket, f"{base}/{name}" if base else name)


def is_remote(uri: str) -> bool:
    """True for the object-store schemes Kiln knows (`s3://`, and `gs://` only to refuse it clearly)."""
    return uri.startswith(("s3://", "gs://"))


def parse(uri: str) -> S3URI:
    """Split `s3://bucket/key`; `gs://` and a missing bucket are refused with a clear message."""
    if uri.startswith("gs://"):
        raise StoreError("Unsupported", GS_REFUSED)
    if not uri.startswith("s3://"):
        raise StoreError("Unsupported", f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StoreError("Unsupported", f"{uri!r} has no bucket (expected s3://BUCKET/KEY)")
    return S3URI(bucket, key)


def endpoint() -> str | None:
    """The S3 endpoint from the standard variables (`AWS_ENDPOINT_URL_S3` wins over `AWS_ENDPOINT_URL`)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def storage_env(storage: Storage | None) -> dict[str, str]:
    """The variables a manifest's `spec.storage` sets outside a cluster (`kiln run`): endpoint and region.
    (`secretName` names a Kubernetes Secret; locally the shell's own AWS_* variables or ~/.aws apply.)"""
    if storage is None:
        return {}
    env = {"AWS_ENDPOINT_URL_S3": storage.endpoint, "AWS_REGION": storage.region}
    return {k: str(v) for k, v in env.items() if v}


def client(timeout: float = DEFAULT_TIMEOUT, attempts: int = 3) -> Any:
    """A boto3 S3 client with connect/read timeouts, botocore's standard retries, path-style addressing
    for custom endpoints (MinIO, SeaweedFS, Ceph need it) and a default region when none is set.
    Clients are reused while the AWS_* variables stay the same (building one reads botocore's models)."""
    try:
        import boto3  # noqa: F401  (checked on every call: the cached clients below must not hide its absence)
    except ImportError as exc:
        raise StoreError("MissingDependency", f"s3:// needs the optional S3 support: {INSTALL_HINT} (missing module {exc.name!r})") from exc
    env = tuple(os.environ.get(k, "") for k in _CLIENT_ENV)
    return _client(timeout, attempts, endpoint(), env)


_CLIENT_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
               "AWS_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")


@functools.lru_cache(maxsize=16)
def _client(timeout: float, attempts: int, url: str | None, env: tuple[str, ...]) -> Any:
    import boto3
    from botocore.config import Config

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    config = Config(connect_timeout=timeout, read_timeout=timeout, retries={"total_max_attempts": attempts, "mode": "standard"},
                    s3={"addressing_style": "path"} if url else {}, user_agent_extra="kiln")
    return boto3.session.Session().client("s3", endpoint_url=url, region_name=region, config=config)


def _where() -> str:
    return endpoint() or "AWS S3"


def translate(exc: BaseException, uri: str) -> StoreError:
    """A botocore/network exception as a StoreError with a reason a status can show."""
    if isinstance(exc, StoreError):
        return exc
    from botocore import exceptions as bx

    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code == "NoSuchBucket":
            return StoreError("NoSuchBucket", f"{uri}: bucket {parse(uri).bucket!r} does not exist at {_where()}")
        if code in _NOT_FOUND_KEY:
            return StoreError("NoSuchKey", f"{uri}: no such object")
        if code in _BAD_CREDENTIALS:
            return StoreError("BadCredentials", f"{uri}: the store at {_where()} rejected the credentials ({code}); "
                              "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (spec.storage.secretName)")
        if code == "AccessDenied" or status == 403:
            return StoreError("AccessDenied", f"{uri}: access denied ({code or status}): the credentials lack permission")
        return StoreError("StoreError", f"{uri}: {code or status}: {err.get('Message', exc)}", retryable=status >= 500)
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return StoreError("BadCredentials", f"{uri}: no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                          "(spec.storage.secretName) or use workload identity (IRSA)")
    if isinstance(exc, FileNotFoundError | IsADirectoryError | PermissionError):
        return StoreError("LocalFileError", f"{uri}: cannot read the local file to upload: {exc}")
    if isinstance(exc, bx.ReadTimeoutError | bx.ConnectTimeoutError | TimeoutError):
        return StoreError("Timeout", f"{uri}: {_where()} did not answer in time ({exc})", retryable=True)
    if isinstance(exc, bx.EndpointConnectionError | bx.ConnectionClosedError | bx.ResponseStreamingError
                  | bx.IncompleteReadError | ConnectionError | OSError):
        return StoreError("ConnectionFailed", f"{uri}: connection to {_where()} failed ({type(exc).__name__}: {exc})", retryable=True)
    if isinstance(exc, bx.BotoCoreError):
        return StoreError("StoreError", f"{uri}: {type(exc).__name__}: {exc}")
    return StoreError("StoreError", f"{uri}: {type(exc).__name__}: {exc}")


def _retrying(uri: str, attempts: int, log: LogFn | None, op: Callable[[], Any]) -> Any:
    """Run `op`, retrying retryable failures with exponential backoff (1 s, 2 s, 4 s, ... capped at 30 s)."""
    delay = 1.0
    for attempt in range(1, attempts + 1):
        try:
            return op()
        except Exception as exc:
            err = translate(exc, uri)
            if not err.retryable or attempt == attempts:
                if attempt > 1:
                    err = StoreError(err.reason, f"{err} (after {attempt} attempts)", err.retryable)
                raise err from None
            if log is not None:
                log({"event": "s3_retry", "uri": uri, "attempt": attempt, "reason": err.reason, "error": str(err), "sleep_s": delay})
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
    raise AssertionError("unreachable")


@dataclass
class Downloaded:
    """What a download wrote: the path, its size and sha256."""

    path: Path
    size: int
    sha256: str


def download(uri: str, dest: Path, *, max_bytes: int | None = None, sha256: str | None = None,
             timeout: float = DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES, log: LogFn | None = None) -> Downloaded:
    """Stream one object to `dest` (written to `dest.part`, renamed when complete and verified)."""
    loc = parse(uri)
    s3 = client(timeout, attempts=1)  # retries are ours: they also cover a body that stalls mid-transfer
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.part")

    def once() -> Downloaded:
        # GET, not HEAD first: a HEAD's error has no body, so "no such bucket" and "no such key" look alike.
        obj = s3.get_object(Bucket=loc.bucket, Key=loc.key)
        size, body = int(obj.get("ContentLength", 0)), obj["Body"]
        if max_bytes is not None and size > max_bytes:
            body.close()
            raise StoreError("TooLarge", f"{uri}: {size} bytes is over the limit of {max_bytes} bytes")
        h, n = hashlib.sha256(), 0
        with open(part, "wb") as out:
            for chunk in iter(lambda: body.read(CHUNK), b""):
                n += len(chunk)
                if max_bytes is not None and n > max_bytes:
                    raise StoreError("TooLarge", f"{uri}: more than the limit of {max_bytes} bytes")
                out.write(chunk)
                h.update(chunk)
        if n != size:
            raise ConnectionError(f"connection closed after {n} of {size} bytes")
        return Downloaded(dest, n, h.hexdigest())

    try:
        got: Downloaded = _retrying(uri, retries + 1, log, once)
        if sha256 and got.sha256 != sha256.lower():
            raise StoreError("ChecksumMismatch", f"{uri}: sha256 mismatch: expected {sha256.lower()}, got {got.sha256}")
        os.replace(part, dest)
        return got
    finally:
        part.unlink(missing_ok=True)


def list_keys(uri: str, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
    """Every key under the prefix of `uri` (sorted); a missing bucket or bad credentials raise."""
    loc = parse(uri)
    s3 = client(timeout)
    keys: list[str] = []
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.key):
            keys += [obj["Key"] for obj in page.get("Contents", [])]
    except Exception as exc:
        raise translate(exc, uri) from None
    return sorted(keys)


def _files(local: Path) -> Iterator[Path]:
    yield from (sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local])


def upload(local: Path, uri: str, timeout: float = DEFAULT_TIMEOUT, last: tuple[str, ...] = ()) -> list[str]:
    """Upload a file, or a folder file by file under the prefix `uri`; names in `last` go last."""
    loc = parse(uri)
    s3 = client(timeout)
    files = sorted(_files(local), key=lambda p: p.name in last)
    written = []
    for f in files:
        key = loc.key if not local.is_dir() else loc.child(f.relative_to(local).as_posix()).key
        try:
            s3.upload_file(str(f), loc.bucket, key)
        except Exception as exc:
            raise translate(exc, str(S3URI(loc.bucket, key))) from None
        written.append(key)
    return written


def put_bytes(uri: str, data: bytes, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Write a small object (a pointer or a marker) in one request."""
    loc = parse(uri)
    try:
        client(timeout).put_object(Bucket=loc.bucket, Key=loc.key, Body=data)
    except Exception as exc:
        raise translate(exc, uri) from None


def get_bytes(uri: str, timeout: float = DEFAULT_TIMEOUT) -> bytes | None:
    """A small object's content, or None when there is no such key."""
    loc = parse(uri)
    try:
        body: BinaryIO = client(timeout).get_object(Bucket=loc.bucket, Key=loc.key)["Body"]
        return body.read()
    except Exception as exc:
        err = translate(exc, uri)
        if err.reason == "NoSuchKey":
            return None
        raise err from None


def delete_prefix(uri: str, timeout: float = DEFAULT_TIMEOUT) -> int:
    """Delete every object under the prefix (a folder: `uri` + `/`); returns how many."""
    loc = parse(uri)
    prefix = loc.key.rstrip("/") + "/" if loc.key else ""
    keys = list_keys(str(S3URI(loc.bucket, prefix)), timeout)
    delete_keys(loc.bucket, keys, timeout)
    return len(keys)


def delete_keys(bucket: str, keys: list[str], timeout: float = DEFAULT_TIMEOUT) -> None:
    """Delete these keys (missing ones are fine)."""
    s3 = client(timeout)
    for key in keys:
        try:
            s3.delete_object(Bucket=bucket, Key=key)
        except Exception as exc:
            raise translate(exc, f"s3://{bucket}/{key}") from None


def publish(staging: str, final: str, last: tuple[str, ...] = (), timeout: float = DEFAULT_TIMEOUT) -> list[str]:
    """Copy every object under the staging prefix to the final prefix (server-side), names in `last`
    last (the success markers), then delete the staging objects. Returns the final keys."""
    src, dst = parse(staging), parse(final)
    src_prefix = src.key.rstrip("/") + "/"
    keys = sorted(list_keys(str(S3URI(src.bucket, src_prefix)), timeout), key=lambda k: k.rsplit("/", 1)[-1] in last)
    s3 = client(timeout)
    written: list[str] = []
    for key in keys:
        target = dst.child(key[len(src_prefix):]).key
        try:
            s3.copy_object(Bucket=dst.bucket, Key=target, CopySource={"Bucket": src.bucket, "Key": key})
        except Exception as exc:
            err = translate(exc, str(S3URI(dst.bucket, target)))
            with contextlib.suppress(StoreError):  # take back what was copied: no partial set stays visible
                delete_keys(dst.bucket, written, timeout)
            raise err from None
        written.append(target)
    delete_keys(src.bucket, keys, timeout)
    return written
