"""Server settings: one dataclass, filled from command-line flags with environment fallbacks.

The operator renders a Deployment whose container sets `KILN_*` environment variables, while
people on a laptop type flags; both land here, read by the shared core's `kiln.settings` (a flag
always wins over its variable).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kiln import settings as reader
from kiln.settings import SettingsError, option

__all__ = ["Settings", "SettingsError", "build_parser", "from_args"]


@dataclass(frozen=True)
class Settings:
    """Everything `kiln serve` can be told. Each field documents its flag and variable."""

    model: str = field(metadata=option("--model", env="KILN_MODEL", help="model location: path, file://, pvc://, http(s)://, s3://"))
    """Model location (`--model`, `KILN_MODEL`): a path, `file://`, `pvc://claim/path`, `http(s)://` or `s3://`."""

    name: str = field(default="", metadata=option("--name", env="KILN_MODEL_NAME", help="model name in routes (default: file stem)"))
    """Model name in the routes (`--name`, `KILN_MODEL_NAME`); defaults to the file name without `.onnx`."""

    version: str = field(default="1", metadata=option("--version", env="KILN_MODEL_VERSION", help="model version (default 1)"))
    """Model version (`--version`, `KILN_MODEL_VERSION`); `/versions/{v}` routes accept only this one."""

    revision: str = field(default="", metadata=option(
        "--revision", env="KILN_MODEL_REVISION", help="model identity for the metrics' revision label (default: none)"))
    """Which build of the model this server runs (`--revision`, `KILN_MODEL_REVISION`), as the `revision`
    label of the model and request metrics, so two models behind one Service (a canary) can be compared;
    the operator passes the model's short digest. Empty (a hand-started server): no such label."""

    host: str = field(default="127.0.0.1", metadata=option("--host", env="KILN_HOST", help="listen address (default 127.0.0.1)"))
    """Address to listen on (`--host`, `KILN_HOST`); the container image sets 0.0.0.0."""

    port: int = field(default=8080, metadata=option("--port", env="KILN_PORT", help="listen port (default 8080)"))
    """TCP port (`--port`, `KILN_PORT`)."""

    grpc_port: int = field(default=0, metadata=
        option("--grpc-port", env="KILN_GRPC_PORT", help="gRPC (Open Inference Protocol) port, 0 = off"))
    """Port of the Open Inference Protocol's gRPC service (`--grpc-port`, `KILN_GRPC_PORT`); 0 = no gRPC."""

    workers: int = field(default=1, metadata=
        option("--workers", env="KILN_WORKERS", help="server processes sharing the ports (default 1)"))
    """Server processes sharing the ports with SO_REUSEPORT, each with its own model session
    (`--workers`, `KILN_WORKERS`); 1 = this process serves alone."""

    max_batch_size: int = field(default=1, metadata=
        option("--max-batch-size", env="KILN_MAX_BATCH_SIZE", help="dynamic batching rows, 1 = off"))
    """Dynamic batching: most rows per ONNX Runtime call (`--max-batch-size`, `KILN_MAX_BATCH_SIZE`); 1 = off."""

    max_latency_ms: float = field(default=2.0, metadata=
        option("--max-latency-ms", env="KILN_MAX_LATENCY_MS", help="dynamic batching wait (ms)"))
    """Dynamic batching: longest wait for a batch to fill (`--max-latency-ms`, `KILN_MAX_LATENCY_MS`).

    2 ms is the default of a hand-started `kiln serve` only. A ModelDeployment's server always gets its
    `spec.batching.maxLatencyMs` (CRD default 5) as a flag through `kiln.serverargs`, so this number
    never applies to a cluster's or `kiln run`'s servers."""

    max_body_bytes: int = field(default=64 * 1024 * 1024, metadata=
        option("--max-body-bytes", env="KILN_MAX_BODY_BYTES", help="largest request body"))
    """Largest request body accepted; larger gets 413 (`--max-body-bytes`, `KILN_MAX_BODY_BYTES`)."""

    max_elements: int = field(default=16 * 1024 * 1024, metadata=
        option("--max-elements", env="KILN_MAX_ELEMENTS", help="most tensor elements per request"))
    """Most tensor elements over all inputs of one request; more gets 413 (`--max-elements`, `KILN_MAX_ELEMENTS`)."""

    sha256: str = field(default="", metadata=option("--sha256", env="KILN_MODEL_SHA256", help="expected sha256 of the model file"))
    """Expected sha256 of the model file; a different file is refused (`--sha256`, `KILN_MODEL_SHA256`)."""

    exit_on_load_failure: bool = field(default=False, metadata=
        option("--exit-on-load-failure", env="KILN_EXIT_ON_LOAD_FAILURE", help="exit 1 if load fails"))
    """Exit with status 1 when the model cannot be loaded, instead of staying up and not ready
    (`--exit-on-load-failure`, `KILN_EXIT_ON_LOAD_FAILURE`)."""

    pvc_root: str = field(default="/kiln/pvc", metadata=option("--pvc-root", env="KILN_PVC_ROOT", help="mount root of pvc:// claims"))
    """Where `pvc://claim/...` volumes are mounted (`--pvc-root`, `KILN_PVC_ROOT`)."""

    cache_dir: str = field(default="/tmp/kiln-models", metadata=
        option("--cache-dir", env="KILN_CACHE_DIR", help="download folder for remote models"))
    """Where `http(s)://` and `s3://` models are downloaded when no init container fetched them
    (`--cache-dir`, `KILN_CACHE_DIR`)."""

    providers: str = field(default="auto", metadata=option("--providers", env="KILN_PROVIDERS", help="auto | cpu | cuda"))
    """ONNX Runtime providers (`--providers`, `KILN_PROVIDERS`): `auto` (CUDA when available), `cpu`, `cuda`."""

    inference_threads: int = field(default=1, metadata=
        option("--inference-threads", env="KILN_INFERENCE_THREADS", help="ORT calling threads"))
    """Threads that call ONNX Runtime, off the event loop (`--inference-threads`, `KILN_INFERENCE_THREADS`)."""

    intra_op_threads: int = field(default=0, metadata=
        option("--intra-op-threads", env="KILN_INTRA_OP_THREADS", help="ORT intra-op threads"))
    """ONNX Runtime intra-op threads, 0 = the CPUs this process may use (affinity and cgroup CPU quota)
    (`--intra-op-threads`, `KILN_INTRA_OP_THREADS`)."""

    graceful_timeout_s: float = field(default=30.0, metadata=
        option("--graceful-timeout", kind="duration", env="KILN_GRACEFUL_TIMEOUT", help="SIGTERM drain (s)"))
    """On SIGTERM, how long in-flight requests may take to finish (`--graceful-timeout`, `KILN_GRACEFUL_TIMEOUT`)."""

    keep_alive_timeout_s: float = field(default=75.0, metadata=
        option("--keep-alive-timeout", kind="duration", env="KILN_KEEP_ALIVE_TIMEOUT", help="idle close (s)"))
    """Idle keep-alive connections close after this (`--keep-alive-timeout`, `KILN_KEEP_ALIVE_TIMEOUT`)."""

    request_timeout_s: float = field(default=60.0, metadata=
        option("--request-timeout", kind="duration", env="KILN_REQUEST_TIMEOUT", help="slow request 408 (s)"))
    """A request whose headers and body take longer than this to arrive gets 408
    (`--request-timeout`, `KILN_REQUEST_TIMEOUT`)."""

    warmup: int = field(default=3, metadata=
        option("--warmup", env="KILN_WARMUP", help="warmup inferences per batch size before ready (0 = none)"))
    """Inferences on synthetic inputs at each batch size the batcher uses, before ready turns true
    (`--warmup`, `KILN_WARMUP`); 0 = none."""

    max_queue: int = field(default=1024, metadata=
        option("--max-queue", env="KILN_MAX_QUEUE", help="most queued inference requests, then 503 (0 = no limit)"))
    """Most inference requests queued or running; past it 503 with Retry-After at once
    (`--max-queue`, `KILN_MAX_QUEUE`); 0 = no limit."""

    request_deadline_ms: float = field(default=0.0, metadata=
        option("--request-deadline-ms", env="KILN_REQUEST_DEADLINE_MS", help="queue deadline, then 504"))
    """A request still queued this long after it arrived is answered 504 without running
    (`--request-deadline-ms`, `KILN_REQUEST_DEADLINE_MS`); 0 = none. Clients may ask for less with
    the `X-Request-Deadline-Ms` header."""

    inline_max_us: float = field(default=250.0, metadata=
        option("--inline-max-us", env="KILN_INLINE_MAX_US",
               help="batching off: run a lone ORT call estimated shorter than this on the loop (0 = never)"))
    """Batching off: a request that is alone (nothing else queued or running) and whose ONNX Runtime
    call is estimated under this many microseconds runs on the event loop instead of the inference
    thread (`--inline-max-us`, `KILN_INLINE_MAX_US`); 0 = never. Several requests at once still go to
    the thread in one hand-off (measured cheaper per request under concurrency: docs/benchmarks.md)."""

    log_level: str = field(default="INFO", metadata=option("--log-level", env="KILN_LOG_LEVEL", help="DEBUG, INFO, WARNING, ERROR"))
    """Log level (`--log-level`, `KILN_LOG_LEVEL`)."""

    access_log: bool = field(default=False, metadata=option("--access-log", env="KILN_ACCESS_LOG", help="one JSON log line per request"))
    """Log one JSON line per request (`--access-log`, `KILN_ACCESS_LOG`); off for speed."""

    auth_token_file: str = field(default="", metadata=option(
        "--auth-token-file", env="KILN_AUTH_TOKEN_FILE", help="bearer tokens, one per line (default: no auth)"))
    """Bearer tokens, one per line (`--auth-token-file`, `KILN_AUTH_TOKEN_FILE`); empty: no authentication."""

    auth_open_routes: str = field(default="health", metadata=option(
        "--auth-open-routes", env="KILN_AUTH_OPEN_ROUTES", help="routes open without a token: health,metrics or none"))
    """Routes served without a token (`--auth-open-routes`, `KILN_AUTH_OPEN_ROUTES`): health, metrics, both, none."""

    @property
    def model_name(self) -> str:
        """The name used in routes: `name`, or the model file's stem."""
        if self.name:
            return self.name
        base = self.model.rstrip("/").rsplit("/", 1)[-1]
        return base[: -len(".onnx")] if base.endswith(".onnx") else (base or "model")


def build_parser() -> argparse.ArgumentParser:
    """The `kiln serve` argument parser; the environment fills what no flag gives at load time."""
    parser = argparse.ArgumentParser(
        prog="kiln serve",
        description="Serve an ONNX model over the Open Inference Protocol (KServe V2) and V1. "
        "Every flag can also be set by the KILN_* variable named in its help.",
    )
    reader.add_arguments(parser, Settings)
    return parser


def from_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from flags, then `KILN_*` variables, then defaults; raises SettingsError or SystemExit(2)."""
    env = os.environ if environ is None else environ
    found = reader.values(Settings, build_parser().parse_args(list(argv)), env)
    if not found.get("model"):
        raise SettingsError("no model given: pass --model PATH_OR_URI or set KILN_MODEL")
    settings = Settings(**found)
    _validate(settings)
    return settings


def _validate(s: Settings) -> None:
    if not 0 < s.port < 65536:
        raise SettingsError(f"port {s.port} is out of range 1-65535")
    if not 0 <= s.grpc_port < 65536 or (s.grpc_port and s.grpc_port == s.port):
        raise SettingsError(f"gRPC port {s.grpc_port} must be 0 (off) or 1-65535 and differ from the HTTP port")
    if not 1 <= s.workers <= 256:
        raise SettingsError(f"workers {s.workers} must be between 1 and 256")
    if s.max_batch_size < 1:
        raise SettingsError("max batch size must be >= 1 (1 turns dynamic batching off)")
    if not (math.isfinite(s.max_latency_ms) and s.max_latency_ms >= 0):
        raise SettingsError(f"max latency must be a finite number >= 0 ms, got {s.max_latency_ms}")
    _validate_limits(s)
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


def _validate_limits(s: Settings) -> None:
    """Timeouts must be finite and positive: `nan` compares false with everything and would disable them."""
    for flag, value in (
        ("--keep-alive-timeout", s.keep_alive_timeout_s),
        ("--request-timeout", s.request_timeout_s),
    ):
        if not (math.isfinite(value) and value > 0):
            raise SettingsError(f"{flag} must be a finite number of seconds > 0, got {value}")
    if not (math.isfinite(s.graceful_timeout_s) and s.graceful_timeout_s >= 0):
        raise SettingsError(f"--graceful-timeout must be a finite number of seconds >= 0, got {s.graceful_timeout_s}")
    if not (math.isfinite(s.request_deadline_ms) and s.request_deadline_ms >= 0):
        raise SettingsError(f"--request-deadline-ms must be a finite number >= 0 (0 = none), got {s.request_deadline_ms}")
    if not (math.isfinite(s.inline_max_us) and s.inline_max_us >= 0):
        raise SettingsError(f"--inline-max-us must be a finite number >= 0 (0 = never), got {s.inline_max_us}")
    if s.warmup < 0:
        raise SettingsError("--warmup must be >= 0 (0 = none)")
    if s.max_queue < 0:
        raise SettingsError("--max-queue must be >= 0 (0 = no limit)")
