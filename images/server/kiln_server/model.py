"""The ONNX Runtime session wrapper: loading, integrity checks, metadata, and the served model's state.

Metadata (names, V2 datatypes, shapes with -1 for symbolic dims) comes from the model itself so
that the server needs no side configuration; the metadata JSON is encoded once at load time.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from kiln_server.protocol import ONNX_TO_DATATYPE, TensorSpec

PLATFORM = "onnxruntime_onnx"


class ModelLoadError(Exception):
    """The model cannot be served; the message says why (missing file, bad sha256, not ONNX...)."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, streamed so large models do not need to fit in memory twice."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def choose_providers(preference: str) -> list[str]:
    """ONNX Runtime providers: CUDA first when available (or demanded), CPU always as fallback."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if preference == "cpu":
        return ["CPUExecutionProvider"]
    if preference == "cuda" and "CUDAExecutionProvider" not in available:
        raise ModelLoadError(
            f"--providers cuda was requested but ONNX Runtime offers only {available} "
            "(install onnxruntime-gpu and run on a node with a GPU)"
        )
    if "CUDAExecutionProvider" in available:
        # onnxruntime-gpu with the CUDA/cuDNN wheels (`onnxruntime-gpu[cuda,cudnn]`): load those libraries
        # from site-packages, where the dynamic loader would not look (a no-op on a CUDA base image).
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            with contextlib.suppress(Exception):  # only on a GPU image; the session then says what is missing
                preload()
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def available_cpus() -> int:
    """CPUs this process may really use: affinity mask, capped by a cgroup v2/v1 CPU quota.

    ONNX Runtime sizes its thread pool from the machine's cores, which in a pod limited to 1 CPU on
    a 64-core node means 64 threads fighting over one CPU's quota (and CFS throttling).
    """
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = None
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            quota = int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        try:
            q = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            p = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            if q > 0 and p > 0:
                quota = q / p
        except (OSError, ValueError):
            pass
    if quota is not None:
        n = min(n, max(1, int(quota + 0.999)))
    return max(1, n)


def _spec(node: Any) -> TensorSpec:
    datatype = ONNX_TO_DATATYPE.get(node.type)
    if datatype is None:
        raise ModelLoadError(f"tensor '{node.name}' has type {node.type}, which V2 cannot carry")
    dims = node.shape or []
    shape = [d if isinstance(d, int) and d >= 0 else -1 for d in dims]
    symbols = tuple(d if isinstance(d, str) and d else None for d in dims)
    return TensorSpec(node.name, datatype, shape, symbols if any(symbols) else ())


class OnnxModel:
    """One loaded ONNX model: its session, specs and precomputed metadata document."""

    def __init__(
        self,
        path: str,
        name: str,
        version: str,
        providers: list[str],
        intra_op_threads: int = 0,
        sha256: str = "",
    ) -> None:
        import onnxruntime as ort

        self.path = path
        self.name = name
        self.version = version
        self.sha256 = sha256
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads if intra_op_threads > 0 else available_cpus()
        opts.log_severity_level = 4  # ORT errors surface as exceptions; its own log lines are not JSON
        # ORT's pool threads busy-wait after each parallel op by default; in a server they would burn
        # the CPU the event loop needs to parse the next requests (measured: ~2x CPU per request).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(path, sess_options=opts, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf types
            raise ModelLoadError(f"ONNX Runtime cannot load {path}: {str(exc).strip()[:500]}") from None
        self.providers: list[str] = self.session.get_providers()
        self.inputs: dict[str, TensorSpec] = {i.name: _spec(i) for i in self.session.get_inputs()}
        self.outputs: dict[str, TensorSpec] = {o.name: _spec(o) for o in self.session.get_outputs()}
        self.output_names: list[str] = list(self.outputs)
        self.batchable = all(s.shape and s.shape[0] == -1 for s in self.inputs.values()) and all(
            s.shape and s.shape[0] == -1 for s in self.outputs.values()
        )
        self.metadata_json = orjson.dumps(self.metadata())
        # The binding under InferenceSession.run: its Python wrapper re-checks what the protocol layer
        # has already checked (every input present, no foreign OrtValues) on every call, ~1.5 us.
        self._run = self.session._sess.run
        self._ep_fail: type[BaseException] = getattr(ort.capi.onnxruntime_pybind11_state, "EPFail", RuntimeError)

    def metadata(self) -> dict[str, Any]:
        """The V2 model metadata document."""
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": PLATFORM,
            "inputs": [{"name": s.name, "datatype": s.datatype, "shape": s.shape} for s in self.inputs.values()],
            "outputs": [{"name": s.name, "datatype": s.datatype, "shape": s.shape} for s in self.outputs.values()],
            # which hardware runs it: "CUDAExecutionProvider,CPUExecutionProvider" on a GPU image with a GPU
            "parameters": {"execution_providers": ",".join(self.providers)},
        }

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
        """Run the session; called from an inference thread (ORT releases the GIL while it computes)."""
        try:
            outputs: list[np.ndarray] = self._run(output_names, feeds, None)
        except self._ep_fail:  # the wrapper's provider fallback (e.g. CUDA -> CPU) lives in InferenceSession.run
            outputs = self.session.run(output_names, feeds)
        return outputs


@dataclass
class LoadResult:
    """What a load attempt produced: the model (None if it failed; the handle has the reason) and how long it took."""

    model: OnnxModel | None
    seconds: float


class ModelHandle:
    """The served model's lifecycle: loading -> ready, or failed with a reason shown on /ready."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"

    def __init__(self, name: str, version: str) -> None:
        self.name = name
        self.version = version
        self.state = self.LOADING
        self.reason = f"model '{name}' is loading"
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        """True once the session is loaded and usable."""
        return self.state == self.READY

    def load(
        self, path: str, providers: str, intra_op_threads: int, expected_sha256: str
    ) -> LoadResult:
        """Load (blocking; run it in a thread): check the file and sha256, open the session."""
        start = time.perf_counter()
        try:
            p = Path(path)
            if not p.exists():
                raise ModelLoadError(f"model file {path} does not exist")
            if not p.is_file():
                raise ModelLoadError(f"model path {path} is not a file")
            digest = sha256_file(p)
            if expected_sha256 and digest != expected_sha256.lower():
                raise ModelLoadError(
                    f"sha256 mismatch for {path}: expected {expected_sha256.lower()}, file has {digest}"
                )
            model = OnnxModel(path, self.name, self.version, choose_providers(providers), intra_op_threads, digest)
            if providers == "cuda" and "CUDAExecutionProvider" not in model.providers:
                raise ModelLoadError(
                    f"--providers cuda was requested but the session fell back to {model.providers} "
                    "(no usable GPU or CUDA/cuDNN libraries: see the ONNX Runtime log with --log-level DEBUG)"
                )
        except (ModelLoadError, OSError) as exc:
            with self._lock:
                self.state = self.FAILED
                self.reason = f"model '{self.name}' failed to load: {exc}"
            return LoadResult(None, time.perf_counter() - start)
        with self._lock:
            self.state = self.READY
            self.reason = ""
        return LoadResult(model, time.perf_counter() - start)

    def fail(self, reason: str) -> None:
        """Mark the model failed before a session could be tried (e.g. the download failed)."""
        with self._lock:
            self.state = self.FAILED
            self.reason = f"model '{self.name}' failed to load: {reason}"
