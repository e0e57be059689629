"""Where data and outputs live: `file://`, plain paths, mounted `pvc://claim/path` and `s3://`.

Why one module: the dataset and the output location accept the same URI forms, and the rules for
resolving them (relative to the manifest, PVCs under the mount root, S3 through `kiln.objectstore`)
must agree. S3 support is optional (extra `s3`); boto3 is imported only when an `s3://` URI is used.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from kiln import objectstore
from kiln_trainer.errors import DataError, SpecError, TrainerError
from kiln_trainer.settings import TrainerSettings

PVC_ROOT_DEFAULT = "/kiln/pvc"
STAGING = ".kiln-staging"
RESULT = "result.json"
T = TypeVar("T")


@dataclass(frozen=True)
class Location:
    """A resolved URI: either a local path (`path`) or a remote object store URL (`remote`)."""

    uri: str
    path: Path | None = None
    remote: str | None = None

    @property
    def is_remote(self) -> bool:
        return self.remote is not None

    def child_uri(self, name: str) -> str:
        """The URI of a file under this location, in the same scheme the user wrote."""
        return self.uri.rstrip("/") + "/" + name

    def public_uri(self, name: str, local_dir: Path) -> str:
        """How clients address a file of this output: pvc://, s3:// or file:// (plain paths become file://)."""
        if self.uri.startswith(("pvc://", "s3://", "file://")):
            return self.child_uri(name)
        return (local_dir / name).resolve().as_uri()


def pvc_root() -> Path:
    """Where the operator mounts PVCs named in `pvc://claim/path` URIs."""
    return Path(TrainerSettings.from_env().pvc_root or PVC_ROOT_DEFAULT)


def resolve(uri: str, base_dir: Path, field: str) -> Location:
    """Resolve a dataset or output URI; relative paths and `file://` resolve against `base_dir`."""
    if objectstore.is_remote(uri):
        try:
            objectstore.parse(uri)  # gs:// and a missing bucket are refused here, before any work
        except objectstore.StoreError as err:
            raise SpecError(str(err), field) from None
        return Location(uri, remote=uri)
    if uri.startswith("pvc://"):
        rest = uri[len("pvc://"):].strip("/")
        if not rest:
            raise SpecError(f"{uri!r} names no claim (expected pvc://claim/path)", field)
        return Location(uri, path=pvc_root() / rest)
    if uri.startswith("file://"):
        raw = uri[len("file://"):]
        return Location(uri, path=(base_dir / raw).resolve() if not raw.startswith("/") else Path(raw))
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise SpecError(f"unsupported scheme {scheme!r} in {uri!r} (use file://, a path, pvc:// or s3://)", field)
    path = Path(uri)
    return Location(uri, path=path if path.is_absolute() else (base_dir / path).resolve())


def _store_error(err: objectstore.StoreError, field: str) -> TrainerError:
    """An object-store failure as a trainer error: retryable (exit 1) only when a retry may help."""
    message = f"{err.reason}: {err}"
    if err.retryable:
        return TrainerError(message, field)
    return DataError(message, field) if field == "spec.dataset.uri" else SpecError(message, field)


def remote_call(field: str, op: Callable[[], T]) -> T:
    """Run an object-store operation, turning its StoreError into a TrainerError about `field`."""
    try:
        return op()
    except objectstore.StoreError as err:
        raise _store_error(err, field) from None


def fetch(loc: Location, field: str) -> Path:
    """A local path holding the data of `loc`: the file itself, or for `s3://` a download into $TMPDIR
    (a single object, or every object under the prefix `uri/` as a folder of parts)."""
    if loc.path is not None:
        if not loc.path.exists():
            raise DataError(f"{loc.uri}: not found (looked at {loc.path})", field)
        if not os.access(loc.path, os.R_OK):
            raise DataError(f"{loc.uri}: not readable (permission denied on {loc.path})", field)
        return loc.path
    uri = objectstore.parse(str(loc.remote))
    keys = remote_call(field, lambda: objectstore.list_keys(str(uri)))
    folder = uri.key.rstrip("/") + "/"
    parts = [k for k in keys if k.startswith(folder) and not k.endswith("/")]
    if uri.key not in keys and not parts:
        raise DataError(f"NoSuchKey: {loc.uri}: no such object, and no objects under {uri.bucket}/{folder}", field)
    root = Path(tempfile.mkdtemp(prefix="kiln-data-"))
    if uri.key in keys:
        target = root / (uri.key.rsplit("/", 1)[-1] or "data")
        remote_call(field, lambda: objectstore.download(str(uri), target))
        return target
    target = root / (uri.key.rstrip("/").rsplit("/", 1)[-1] or uri.bucket)
    for key in parts:
        dest = target / key[len(folder):]
        remote_call(field, functools.partial(objectstore.download, f"s3://{uri.bucket}/{key}", dest))
    return target


def stage_and_publish(local: Path, loc: Location, names: list[str], field: str) -> None:
    """Upload the finished outputs to `<uri>/.kiln-staging/<id>/`, then copy them into place
    (server-side, `result.json` last) and delete the staging copy: a failure at any point leaves no
    half-written model at `<uri>`, only a staging prefix that the next run removes."""
    staging = f"{loc.child_uri(STAGING)}/{uuid.uuid4().hex[:12]}"
    try:
        for name in names:
            remote_call(field, functools.partial(objectstore.upload, local / name, f"{staging}/{name}"))
        remote_call(field, lambda: objectstore.publish(staging, str(loc.remote), last=(RESULT,)))
    except BaseException:
        with contextlib.suppress(objectstore.StoreError):
            objectstore.delete_prefix(staging)
        raise


def upload_dir(local: Path, loc: Location, names: list[str], field: str) -> None:
    """Copy finished outputs to a remote location through a staging prefix (see `stage_and_publish`)."""
    stage_and_publish(local, loc, names, field)


def remove_remote(loc: Location, names: list[str], field: str) -> None:
    """Remove an earlier run's success markers (result.json first) and any leftover staging prefix."""
    uri = objectstore.parse(str(loc.remote))
    keys = [uri.child(n).key for n in sorted(names, key=lambda n: n != RESULT)]
    remote_call(field, lambda: objectstore.delete_keys(uri.bucket, keys))
    remote_call(field, lambda: objectstore.delete_prefix(loc.child_uri(STAGING)))


def push_folder(local: Path, loc: Location, name: str, field: str) -> None:
    """Upload the folder `local` to `<uri>/<name>/` (checkpoints, TensorBoard logs: as they are written)."""
    if local.exists():
        remote_call(field, lambda: objectstore.upload(local, loc.child_uri(name)))


def pull_folder(loc: Location, name: str, local: Path, field: str) -> int:
    """Download `<uri>/<name>/` into `local`; returns how many files (0 when there is nothing)."""
    prefix = objectstore.parse(loc.child_uri(name) + "/")
    keys = remote_call(field, lambda: objectstore.list_keys(str(prefix)))
    for key in keys:
        dest = local / key[len(prefix.key):]
        remote_call(field, functools.partial(objectstore.download, f"s3://{prefix.bucket}/{key}", dest))
    return len(keys)


def remove_stale_checkpoints(loc: Location, keep: str, field: str) -> None:
    """Delete stored `checkpoints/epoch-*` other than `keep` (after `latest` points at it)."""
    uri = objectstore.parse(loc.child_uri("checkpoints") + "/")
    keys = remote_call(field, lambda: objectstore.list_keys(str(uri)))
    stale = [k for k in keys if k[len(uri.key):].startswith("epoch-") and not k[len(uri.key):].startswith(keep + "/")]
    remote_call(field, lambda: objectstore.delete_keys(uri.bucket, stale))


def remove_remote_folder(loc: Location, name: str, field: str) -> None:
    """Delete `<uri>/<name>/` (checkpoints of a finished run)."""
    remote_call(field, lambda: objectstore.delete_prefix(loc.child_uri(name)))


def rmtree_quiet(path: Path) -> None:
    """Remove a file or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def sha256(path: Path) -> str:
    """Hex sha256 of a file (reported so a server can verify what it loads)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
