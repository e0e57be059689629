"""Where data and outputs live: `file://`, plain paths, mounted `pvc://claim/path` and `s3://`.

Why one module: the dataset and the output location accept the same URI forms, and the rules for
resolving them (relative to the manifest, PVCs under the mount root, S3 through fsspec) must agree.
S3 support is optional (extra `s3`); its libraries are imported only when an `s3://` URI is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln_trainer.errors import DataError, SpecError, TrainerError
from kiln_trainer.settings import TrainerSettings

PVC_ROOT_DEFAULT = "/kiln/pvc"


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
    if uri.startswith("s3://"):
        if len(uri) <= len("s3://") or uri[5] == "/":
            raise SpecError(f"{uri!r} has no bucket", field)
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


def s3_filesystem(field: str) -> Any:
    """An fsspec S3 filesystem, or a clear error when the optional `s3` extra is not installed."""
    try:
        import fsspec
        import s3fs  # noqa: F401  (registers the s3 protocol with fsspec)
    except ImportError as exc:
        raise SpecError(
            f"s3:// needs the optional S3 support: pip install 'kiln[s3]' (missing module {exc.name!r})", field
        ) from exc
    kwargs: dict[str, Any] = {}
    endpoint = os.environ.get("KILN_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        kwargs["client_kwargs"] = {"endpoint_url": endpoint}
    return fsspec.filesystem("s3", **kwargs)


def fetch(loc: Location, field: str) -> Path:
    """A local path holding the data of `loc` (downloaded into $TMPDIR for remote URIs)."""
    if loc.path is not None:
        if not loc.path.exists():
            raise DataError(f"{loc.uri}: not found (looked at {loc.path})", field)
        if not os.access(loc.path, os.R_OK):
            raise DataError(f"{loc.uri}: not readable (permission denied on {loc.path})", field)
        return loc.path
    fs = s3_filesystem(field)
    name = loc.remote.rstrip("/").rsplit("/", 1)[-1] if loc.remote else "data"
    target = Path(tempfile.mkdtemp(prefix="kiln-data-")) / name
    try:
        fs.get(loc.remote, str(target))
    except FileNotFoundError as exc:
        raise DataError(f"{loc.uri}: not found", field) from exc
    except PermissionError as exc:
        raise DataError(f"{loc.uri}: access denied", field) from exc
    except Exception as exc:  # network or credential trouble: a retry may help
        raise TrainerError(f"{loc.uri}: download failed: {type(exc).__name__}: {exc}", field) from exc
    return target


def upload_dir(local: Path, loc: Location, names: list[str], field: str) -> None:
    """Copy the finished outputs to a remote location; `result.json` goes last as the success marker."""
    fs = s3_filesystem(field)
    ordered = sorted(names, key=lambda n: n == "result.json")
    try:
        for name in ordered:
            src = local / name
            files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src]
            for f in files:  # file by file: `put` of a folder nests differently when the prefix exists
                fs.put_file(str(f), loc.child_uri(f.relative_to(local).as_posix()))
    except Exception as exc:
        raise TrainerError(f"upload to {loc.uri} failed: {type(exc).__name__}: {exc}", field) from exc


def remove_remote(loc: Location, names: list[str], field: str) -> None:
    """Remove stale success markers of an earlier run at a remote output location (best effort)."""
    fs = s3_filesystem(field)
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(loc.child_uri(name), recursive=True)


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
