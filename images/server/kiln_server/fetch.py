"""Model fetching: `python -m kiln_server.fetch URI DEST [--sha256 HEX]`.

The operator runs this as the init container (same image as the server) so that downloads,
retries and checksum failures show up as an init-container status with a clear message instead
of a server that hangs. Supported: `http(s)://` (http.client through `fetchguard`, timeouts, retries
with backoff), `s3://` (kiln.objectstore: boto3 from the `s3` extra, the same timeouts and retries,
credentials and endpoint from the AWS_* variables) and local sources (`file://`, plain paths,
`pvc://claim/path`) which are copied; `gs://` is refused with a clear message. Writes are atomic
(temporary file in the destination folder, then rename), the size limit (`--max-bytes`) and sha256 are
checked before the rename.

http(s) downloads follow `fetchguard`'s rules: https only, no redirect to another host, no loopback,
link-local or private address, sha256 required and a size limit, unless `--allow-http`,
`--allow-private`, `--allow-missing-sha256`, `--max-bytes` (or `KILN_FETCH_*`) say otherwise.

Exit status: 0 fetched (or already present with the right sha256), 1 download failed (the reason, e.g.
Timeout, NoSuchKey, BadCredentials, TooLarge, is the first word of the message), 2 usage or missing
dependency, 3 sha256 mismatch, 4 refused by a fetch rule.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from kiln import objectstore
from kiln.netguard import FetchPolicy
from kiln_server.fetchguard import FetchRefused, HTTPStatusError, download, fetch_policy_from_env

CHUNK = 1 << 20
RETRYABLE_HTTP = {408, 425, 429, 500, 502, 503, 504}


class FetchError(Exception):
    """The model could not be fetched; `exit_code` is what the CLI exits with."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class FetchResult:
    """Where the model landed, its sha256 and size, and whether it was already there."""

    path: Path
    sha256: str
    size: int
    cached: bool


def resolve_local(uri: str, pvc_root: str = "/kiln/pvc") -> str | None:
    """The local path for `file://`, `pvc://` and plain paths; None for remote URIs."""
    if uri.startswith("file://"):
        return unquote(urlparse(uri).path)
    if uri.startswith("pvc://"):
        rest = uri[len("pvc://") :].lstrip("/")
        return str(Path(pvc_root) / rest)
    if "://" in uri:
        return None
    return uri


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _dest_path(uri: str, dest: str | os.PathLike[str]) -> Path:
    d = Path(dest)
    if str(dest).endswith("/") or d.is_dir():
        name = Path(urlparse(uri).path).name or "model.onnx"
        return d / name
    return d


def _copy_stream(src: BinaryIO, out: BinaryIO, h: hashlib._Hash) -> int:
    n = 0
    while chunk := src.read(CHUNK):
        out.write(chunk)
        h.update(chunk)
        n += len(chunk)
    return n


def _http_once(uri: str, out: BinaryIO, guard: FetchPolicy, timeout: float) -> int:
    try:
        return download(uri, out, guard, timeout)
    except FetchRefused as exc:
        raise FetchError(f"refused: {exc}", exit_code=4) from None


def fetch(
    uri: str,
    dest: str | os.PathLike[str],
    sha256: str | None = None,
    timeout: float = 30.0,
    retries: int = 4,
    pvc_root: str = "/kiln/pvc",
    log: Callable[[dict[str, object]], None] | None = None,
    max_bytes: int | None = None,
    guard: FetchPolicy | None = None,
) -> FetchResult:
    """Fetch `uri` to `dest` (a file, or a folder to keep the URI's file name), atomically, checking sha256.

    `guard`: the http(s) rules (default: `fetch_policy_from_env()`, strict unless `KILN_FETCH_*` relax it).
    """
    target = _dest_path(uri, dest)
    want = sha256.lower() if sha256 else None
    guard = guard or fetch_policy_from_env()
    if urlparse(uri).scheme in ("http", "https") and guard.require_sha256 and not want:
        raise FetchError(f"{uri}: a sha256 is required for http(s) models (--sha256, or --allow-missing-sha256)", exit_code=4)
    if want and target.is_file() and _sha256(target) == want:
        return FetchResult(target, want, target.stat().st_size, True)
    if objectstore.is_remote(uri):
        return _fetch_object(uri, target, want, timeout, retries, log, max_bytes)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            h = hashlib.sha256()
            scheme = urlparse(uri).scheme
            if scheme in ("http", "https"):
                size = _fetch_http(uri, out, timeout, retries, log, guard)
                h = _rehash(tmp, out)
            else:
                local = resolve_local(uri, pvc_root)
                if local is None:
                    raise FetchError(f"unsupported model URI scheme {scheme!r} in {uri}", exit_code=2)
                try:
                    with open(local, "rb") as src:
                        size = _copy_stream(src, out, h)
                except OSError as exc:
                    raise FetchError(f"cannot read {local}: {exc.strerror or exc}") from None
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        if max_bytes is not None and size > max_bytes:
            raise FetchError(f"TooLarge: {uri}: {size} bytes is over the limit of {max_bytes} bytes")
        if want and digest != want:
            raise FetchError(f"sha256 mismatch for {uri}: expected {want}, got {digest}", exit_code=3)
        os.replace(tmp, target)
        return FetchResult(target, digest, size, False)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fetch_object(uri: str, target: Path, want: str | None, timeout: float, retries: int,
                  log: Callable[[dict[str, object]], None] | None, max_bytes: int | None) -> FetchResult:
    """`s3://` through kiln.objectstore; its reason word (Timeout, NoSuchKey, ...) leads the message."""
    try:
        got = objectstore.download(uri, target, max_bytes=max_bytes, sha256=want, timeout=timeout, retries=retries, log=log)
    except objectstore.StoreError as err:
        code = {"ChecksumMismatch": 3, "MissingDependency": 2, "Unsupported": 2}.get(err.reason, 1)
        raise FetchError(f"{err.reason}: {err}", exit_code=code) from None
    return FetchResult(got.path, got.sha256, got.size, False)


def _rehash(tmp: Path, out: BinaryIO) -> hashlib._Hash:
    """Hash what was written (retries may have truncated and rewritten the file)."""
    out.flush()
    h = hashlib.sha256()
    with open(tmp, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h


def _fetch_http(
    uri: str, out: BinaryIO, timeout: float, retries: int, log: Callable[[dict[str, object]], None] | None,
    guard: FetchPolicy,
) -> int:
    delay = 1.0
    for attempt in range(retries + 1):
        out.seek(0)
        out.truncate()
        try:
            return _http_once(uri, out, guard, timeout)
        except HTTPStatusError as exc:
            if exc.code not in RETRYABLE_HTTP or attempt == retries:
                raise FetchError(f"GET {uri} failed: HTTP {exc.code} {exc.reason}") from None
            reason = f"HTTP {exc.code}"
        except (OSError, ConnectionError, ValueError, http.client.HTTPException) as exc:
            if attempt == retries:
                raise FetchError(f"GET {uri} failed after {retries + 1} attempts: {exc}") from None
            reason = str(exc)
        if log is not None:
            log({"event": "fetch_retry", "uri": uri, "attempt": attempt + 1, "reason": reason, "sleep_s": delay})
        time.sleep(delay)
        delay = min(delay * 2, 30.0)
    raise FetchError(f"GET {uri} failed")  # unreachable: the loop returns or raises


def _log_line(doc: dict[str, object]) -> None:
    print(json.dumps(doc), file=sys.stderr, flush=True)


def _termination_message(reason: str) -> None:
    """`{"error": reason}` in the container's termination log, so the init container's status (and the
    ModelDeployment's, which reads it) carries the reason rather than a tail of retry log lines."""
    path = os.environ.get("KILN_TERMINATION_LOG") or "/dev/termination-log"
    if os.environ.get("KILN_TERMINATION_LOG") or (os.path.exists(path) and os.access(path, os.W_OK)):
        with contextlib.suppress(OSError):
            Path(path).write_text(json.dumps({"error": " ".join(reason.split())[:3500]}))


def main(argv: list[str] | None = None) -> int:
    """CLI for the init container."""
    parser = argparse.ArgumentParser(
        prog="python -m kiln_server.fetch", description="Fetch a model file atomically and verify its sha256."
    )
    parser.add_argument("uri", help="http(s)://, s3://, file://, pvc://claim/path or a path (gs:// is refused)")
    parser.add_argument("dest", help="destination file, or a folder (ending in /) to keep the URI's file name")
    parser.add_argument("--sha256", default=os.environ.get("KILN_MODEL_SHA256") or None, help="expected sha256")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per network operation")
    parser.add_argument("--retries", type=int, default=4, help="retries for transient failures")
    parser.add_argument("--pvc-root", default=os.environ.get("KILN_PVC_ROOT", "/kiln/pvc"))
    env = fetch_policy_from_env()
    parser.add_argument("--allow-http", action="store_true", default=env.allow_http, help="allow plain http:// (default: https only)")
    parser.add_argument("--allow-private", action="store_true", default=env.allow_private,
                        help="allow loopback, link-local and private addresses")
    parser.add_argument("--allow-missing-sha256", action="store_true", default=not env.require_sha256,
                        help="allow http(s) models without --sha256")
    parser.add_argument("--max-bytes", type=int, default=env.max_bytes,
                        help="refuse a model larger than this many bytes, from any source (KILN_FETCH_MAX_BYTES; "
                        "default 4 GiB)")
    args = parser.parse_args(argv)
    guard = FetchPolicy(args.allow_http, args.allow_private, not args.allow_missing_sha256, args.max_bytes)
    start = time.perf_counter()
    try:
        res = fetch(args.uri, args.dest, args.sha256, args.timeout, args.retries, args.pvc_root, _log_line,
                    args.max_bytes, guard)
    except FetchError as exc:
        _log_line({"event": "fetch_failed", "uri": args.uri, "dest": args.dest, "reason": str(exc)})
        _termination_message(str(exc))
        return exc.exit_code
    _log_line(
        {
            "event": "fetched",
            "uri": args.uri,
            "path": str(res.path),
            "sha256": res.sha256,
            "bytes": res.size,
            "cached": res.cached,
            "seconds": round(time.perf_counter() - start, 3),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
