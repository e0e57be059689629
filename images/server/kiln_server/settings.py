"""Server settings: one dataclass, filled from command-line flags with environment fallbacks.

The operator renders a Deployment whose container sets `KILN_*` environment variables, while
people on a laptop type flags; both land here. A flag always wins over its variable.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Settings:
    """Everything `kiln serve` can be told. Each field documents its flag and variable."""

    model: str
    """Model location (`--model`, `KILN_MODEL`): a path, `file://`, `pvc://claim/path`, `http(s)://` or `s3://`."""

    name: str = ""
    """Model name in the routes (`--name`, `KILN_MODEL_NAME`); defaults to the file name without `.onnx`."""

    version: str = "1"
    """Model version (`--version`, `KILN_MODEL_VERSION`); `/versions/{v}` routes accept only this one."""

    host: str = "127.0.0.1"
    """Address to listen on (`--host`, `KILN_HOST`); the container image sets 0.0.0.0."""

    port: int = 8080
    """TCP port (`--port`, `KILN_PORT`)."""

    max_batch_size: int = 1
    """Dynamic batching: most rows per ONNX Runtime call (`--max-batch-size`, `KILN_MAX_BATCH_SIZE`); 1 = off."""

    max_latency_ms: float = 2.0
    """Dynamic batching: longest wait for a batch to fill (`--max-latency-ms`, `KILN_MAX_LATENCY_MS`)."""

    max_body_bytes: int = 64 * 1024 * 1024
    """Largest request body accepted; larger gets 413 (`--max-body-bytes`, `KILN_MAX_BODY_BYTES`)."""

    max_elements: int = 16 * 1024 * 1024
    """Most tensor elements over all inputs of one request; more gets 413 (`--max-elements`, `KILN_MAX_ELEMENTS`)."""

    sha256: str = ""
    """Expected sha256 of the model file; a different file is refused (`--sha256`, `KILN_MODEL_SHA256`)."""

    exit_on_load_failure: bool = False
    """Exit with status 1 when the model cannot be loaded, instead of staying up and not ready
    (`--exit-on-load-failure`, `KILN_EXIT_ON_LOAD_FAILURE`)."""

    pvc_root: str = "/kiln/pvc"
    """Where `pvc://claim/...` volumes are mounted (`--pvc-root`, `KILN_PVC_ROOT`)."""

    cache_dir: str = "/tmp/kiln-models"
    """Where `http(s)://` and `s3://` models are downloaded when no init container fetched them
    (`--cache-dir`, `KILN_CACHE_DIR`)."""

    providers: str = "auto"
    """ONNX Runtime providers (`--providers`, `KILN_PROVIDERS`): `auto` (CUDA when available), `cpu`, `cuda`."""

    inference_threads: int = 1
    """Threads that call ONNX Runtime, off the event loop (`--inference-threads`, `KILN_INFERENCE_THREADS`)."""

    intra_op_threads: int = 0
    """ONNX Runtime intra-op threads, 0 = the CPUs this process may use (affinity and cgroup CPU quota)
    (`--intra-op-threads`, `KILN_INTRA_OP_THREADS`)."""

    graceful_timeout_s: float = 30.0
    """On SIGTERM, how long in-flight requests may take to finish (`--graceful-timeout`, `KILN_GRACEFUL_TIMEOUT`)."""

    keep_alive_timeout_s: float = 75.0
    """Idle keep-alive connections close after this (`--keep-alive-timeout`, `KILN_KEEP_ALIVE_TIMEOUT`)."""

    request_timeout_s: float = 60.0
    """A request whose headers and body take longer than this to arrive gets 408
    (`--request-timeout`, `KILN_REQUEST_TIMEOUT`)."""

    log_level: str = "INFO"
    """Log level (`--log-level`, `KILN_LOG_LEVEL`)."""

    access_log: bool = False
    """Log one JSON line per request (`--access-log`, `KILN_ACCESS_LOG`); off for speed."""

    auth_token_file: str = ""
    """Bearer tokens, one per line (`--auth-token-file`, `KILN_AUTH_TOKEN_FILE`); empty: no authentication."""

    auth_open_routes: str = "health"
    """Routes served without a token (`--auth-open-routes`, `KILN_AUTH_OPEN_ROUTES`): health, metrics, both, none."""

    @property
    def model_name(self) -> str:
        """The name used in routes: `name`, or the model file's stem."""
        if self.name:
            return self.name
        base = self.model.rstrip("/").rsplit("/", 1)[-1]
        return base[: -len(".onnx")] if base.endswith(".onnx") else (base or "model")


# flag name -> (field, env var, type, help)
_FLAGS: list[tuple[str, str, str, type, str]] = [
    ("--model", "model", "KILN_MODEL", str, "model location: path, file://, pvc://, http(s)://, s3://"),
    ("--name", "name", "KILN_MODEL_NAME", str, "model name in routes (default: file stem)"),
    ("--version", "version", "KILN_MODEL_VERSION", str, "model version (default 1)"),
    ("--host", "host", "KILN_HOST", str, "listen address (default 127.0.0.1)"),
    ("--port", "port", "KILN_PORT", int, "listen port (default 8080)"),
    ("--max-batch-size", "max_batch_size", "KILN_MAX_BATCH_SIZE", int, "dynamic batching rows, 1 = off"),
    ("--max-latency-ms", "max_latency_ms", "KILN_MAX_LATENCY_MS", float, "dynamic batching wait (ms)"),
    ("--max-body-bytes", "max_body_bytes", "KILN_MAX_BODY_BYTES", int, "largest request body"),
    ("--max-elements", "max_elements", "KILN_MAX_ELEMENTS", int, "most tensor elements per request"),
    ("--sha256", "sha256", "KILN_MODEL_SHA256", str, "expected sha256 of the model file"),
    ("--pvc-root", "pvc_root", "KILN_PVC_ROOT", str, "mount root of pvc:// claims"),
    ("--cache-dir", "cache_dir", "KILN_CACHE_DIR", str, "download folder for remote models"),
    ("--providers", "providers", "KILN_PROVIDERS", str, "auto | cpu | cuda"),
    ("--inference-threads", "inference_threads", "KILN_INFERENCE_THREADS", int, "ORT calling threads"),
    ("--intra-op-threads", "intra_op_threads", "KILN_INTRA_OP_THREADS", int, "ORT intra-op threads"),
    ("--graceful-timeout", "graceful_timeout_s", "KILN_GRACEFUL_TIMEOUT", float, "SIGTERM drain (s)"),
    ("--keep-alive-timeout", "keep_alive_timeout_s", "KILN_KEEP_ALIVE_TIMEOUT", float, "idle close (s)"),
    ("--request-timeout", "request_timeout_s", "KILN_REQUEST_TIMEOUT", float, "slow request 408 (s)"),
    ("--log-level", "log_level", "KILN_LOG_LEVEL", str, "DEBUG, INFO, WARNING, ERROR"),
    ("--auth-token-file", "auth_token_file", "KILN_AUTH_TOKEN_FILE", str, "bearer tokens, one per line (default: no auth)"),
    ("--auth-open-routes", "auth_open_routes", "KILN_AUTH_OPEN_ROUTES", str, "routes open without a token: health,metrics or none"),
]
_BOOL_FLAGS: list[tuple[str, str, str, str]] = [
    ("--exit-on-load-failure", "exit_on_load_failure", "KILN_EXIT_ON_LOAD_FAILURE", "exit 1 if load fails"),
    ("--access-log", "access_log", "KILN_ACCESS_LOG", "one JSON log line per request"),
]

class SettingsError(ValueError):
    """A flag or variable has a value the server cannot use."""


def _parse_bool(env: str, value: str) -> bool:
    low = value.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise SettingsError(f"{env}={value!r} is not a boolean (use true/false)")


def build_parser() -> argparse.ArgumentParser:
    """The `kiln serve` argument parser; every default comes from the environment at parse time."""
    parser = argparse.ArgumentParser(
        prog="kiln serve",
        description="Serve an ONNX model over the Open Inference Protocol (KServe V2) and V1. "
        "Every flag can also be set by the KILN_* variable named in its help.",
    )
    for flag, dest, env, typ, help_text in _FLAGS:
        parser.add_argument(flag, dest=dest, type=typ, default=None, help=f"{help_text} [{env}]")
    for flag, dest, env, help_text in _BOOL_FLAGS:
        parser.add_argument(flag, dest=dest, action="store_true", default=None, help=f"{help_text} [{env}]")
    return parser


def from_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from flags, then `KILN_*` variables, then defaults; raises SettingsError or SystemExit(2)."""
    env = os.environ if environ is None else environ
    ns = build_parser().parse_args(list(argv))
    values: dict[str, Any] = {}
    for _flag, dest, var, typ, _h in _FLAGS:
        value = getattr(ns, dest)
        if value is None and env.get(var, "") != "":
            try:
                value = typ(env[var])
            except ValueError as exc:
                raise SettingsError(f"{var}={env[var]!r} is not a valid {typ.__name__}") from exc
        if value is not None:
            values[dest] = value
    for _flag, dest, var, _h in _BOOL_FLAGS:
        value = getattr(ns, dest)
        if value is None and var in env:
            value = _parse_bool(var, env[var])
        if value is not None:
            values[dest] = value
    if not values.get("model"):
        raise SettingsError("no model given: pass --model PATH_OR_URI or set KILN_MODEL")
    settings = Settings(**values)
    _validate(settings)
    return settings


def _validate(s: Settings) -> None:
    if not 0 < s.port < 65536:
        raise SettingsError(f"port {s.port} is out of range 1-65535")
    if s.max_batch_size < 1:
        raise SettingsError("max batch size must be >= 1 (1 turns dynamic batching off)")
    if s.max_latency_ms < 0:
        raise SettingsError("max latency must be >= 0 ms")
    if s.max_body_bytes < 1024:
        raise SettingsError("max body bytes must be at least 1024")
    if s.max_elements < 1:
        raise SettingsError("max elements must be >= 1")
    if s.providers not in ("auto", "cpu", "cuda"):
        raise SettingsError(f"providers {s.providers!r}: use auto, cpu or cuda")
    if s.inference_threads < 1:
        raise SettingsError("inference threads must be >= 1")
    if s.sha256 and (len(s.sha256) != 64 or any(c not in "0123456789abcdefABCDEF" for c in s.sha256)):
        raise SettingsError("sha256 must be 64 hex digits")
    if "/" in s.model_name or not s.model_name:
        raise SettingsError(f"model name {s.model_name!r} must be non-empty and contain no '/'")
