"""Per-epoch progress: one log line, a PATCH of the TrainingJob's `status.progress`, and a Python callback.

Why plain urllib and not the kubernetes client: the trainer image stays small, and the trainer only
ever makes this one request. A failing PATCH logs a warning and never fails training: progress is
a convenience, the model is the product.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras

log = logging.getLogger("kiln_trainer.progress")
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass
class Progress:
    """What `status.progress` holds: finished epochs, planned epochs, percent, latest metrics, when."""

    epoch: int
    epochs: int
    metrics: dict[str, float] = field(default_factory=dict)
    update_time: str = ""

    @property
    def percent(self) -> int:
        return max(0, min(100, int(100 * self.epoch / self.epochs))) if self.epochs else 0

    def to_status(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "epochs": self.epochs, "percent": self.percent,
                "metrics": {k: v for k, v in self.metrics.items() if math.isfinite(v)},
                "updateTime": self.update_time}

    def line(self) -> str:
        def order(key: str) -> tuple[bool, bool, str]:
            base = key.removeprefix("val_")
            return (key.startswith("val_"), base != "loss", base)

        ordered = sorted(self.metrics, key=order)
        parts = [f"epoch {self.epoch}/{self.epochs}"] + [
            f"{k}={self.metrics[k]:.3g}" if k == "learning_rate" else f"{k}={self.metrics[k]:.4f}" for k in ordered]
        return " ".join(parts)


ProgressFn = Callable[[Progress], None]


def now() -> str:
    """RFC 3339 UTC timestamp, as Kubernetes writes them."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class StatusPatcher:
    """PATCHes `status.progress` of one TrainingJob through the Kubernetes API (merge patch)."""

    def __init__(self, base_url: str, namespace: str, name: str, token_file: Path | None,
                 ca_file: Path | None, insecure: bool, timeout: float = 5.0) -> None:
        self.url = (f"{base_url.rstrip('/')}/apis/kiln.dev/v1alpha1/namespaces/{namespace}"
                    f"/trainingjobs/{name}/status")
        self.token_file = token_file
        self.timeout = timeout
        self.context: ssl.SSLContext | None = None
        if self.url.startswith("https://"):
            if insecure:
                self.context = ssl._create_unverified_context()
            else:
                self.context = ssl.create_default_context(
                    cafile=str(ca_file) if ca_file and ca_file.exists() else None)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> StatusPatcher | None:
        """A patcher when running in a cluster (or pointed at an API server by env), else None."""
        env = dict(os.environ if env is None else env)
        name, namespace = env.get("KILN_TRAININGJOB"), env.get("KILN_NAMESPACE")
        if not name or not namespace:
            return None
        base = env.get("KILN_API_SERVER")
        if not base:
            host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                return None
            host = f"[{host}]" if ":" in host else host
            base = f"https://{host}:{port}"
        token = Path(env.get("KILN_API_TOKEN_FILE", str(SA_DIR / "token")))
        if "KILN_API_SERVER" not in env and not token.exists():
            return None
        ca = Path(env.get("KILN_API_CA_FILE", str(SA_DIR / "ca.crt")))
        return cls(base, namespace, name, token if token.exists() else None, ca,
                   env.get("KILN_API_INSECURE", "") in ("1", "true", "yes"))

    def patch(self, progress: Progress) -> bool:
        """Send one progress update; True when the API server accepted it. Never raises."""
        return self.patch_status({"progress": progress.to_status()})

    def patch_status(self, status: dict[str, Any]) -> bool:
        """Merge `status` into the TrainingJob's status (progress, tuning); never raises."""
        body = json.dumps({"status": status}).encode()
        headers = {"Content-Type": "application/merge-patch+json", "Accept": "application/json"}
        try:
            if self.token_file is not None:
                headers["Authorization"] = "Bearer " + self.token_file.read_text().strip()
            req = urllib.request.Request(self.url, data=body, method="PATCH", headers=headers)
            with urllib.request.urlopen(req, timeout=self.timeout, context=self.context) as resp:
                resp.read()
            return True
        except urllib.error.HTTPError as exc:
            detail = exc.read(300).decode(errors="replace").replace("\n", " ")
            log.warning("progress: PATCH %s failed: HTTP %s %s", self.url, exc.code, detail)
        except Exception as exc:
            log.warning("progress: PATCH %s failed: %s: %s", self.url, type(exc).__name__, exc)
        return False


class ProgressReporter:
    """Fans one epoch's progress out to the log, the API server (chief only) and a Python callback."""

    def __init__(self, epochs: int, patcher: StatusPatcher | None, callback: ProgressFn | None,
                 chief: bool, prefix: str = "") -> None:
        self.epochs = epochs
        self.patcher = patcher if chief else None
        self.callback = callback if chief else None
        self.prefix = prefix

    def report(self, epoch: int, metrics: dict[str, float], log_line: bool = True) -> Progress:
        p = Progress(epoch, self.epochs, {k: float(v) for k, v in metrics.items()}, now())
        if log_line:
            print(self.prefix + p.line(), flush=True)
        if self.patcher is not None:
            self.patcher.patch(p)
        if self.callback is not None:
            try:
                self.callback(p)
            except Exception as exc:  # a broken progress bar must not kill training
                log.warning("progress callback failed: %s: %s", type(exc).__name__, exc)
        return p


class EpochLogger(keras.callbacks.Callback):
    """Keras callback: after each epoch (and after the checkpoint is written) report progress."""

    def __init__(self, reporter: ProgressReporter) -> None:
        super().__init__()
        self.reporter = reporter

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.reporter.report(epoch + 1, dict(logs or {}))


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg,unused-ignore]
    """Writes to whatever sys.stderr is at the time (it may be replaced, e.g. by a test runner)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class EpochSummaries(keras.callbacks.Callback):
    """TensorBoard scalars once per epoch, in the layout Keras' TensorBoard callback uses
    (`<logs>/train` and `<logs>/validation`, tags `epoch_<metric>`).

    Why not keras.callbacks.TensorBoard: it runs Python on every batch (about 1 ms each here), which
    cost 10-20% of the wall time of a small model; epoch-level curves are what `logs/` is for.
    """

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder
        self.writers: dict[str, Any] = {}

    def _writer(self, split: str) -> Any:
        import tensorflow as tf

        if split not in self.writers:
            self.writers[split] = tf.summary.create_file_writer(str(self.folder / split))
        return self.writers[split]

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        import tensorflow as tf

        for key, value in (logs or {}).items():
            split, name = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
            with self._writer(split).as_default():
                tf.summary.scalar(f"epoch_{name}", float(value), step=epoch)
        for writer in self.writers.values():
            writer.flush()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()


def setup_logging() -> None:
    """Plain one-line log records on stderr (no progress bars, no carriage returns)."""
    root = logging.getLogger()
    if not any(isinstance(h, _CurrentStderr) for h in root.handlers):
        handler = _CurrentStderr(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    for noisy in ("tensorflow", "tf2onnx", "absl", "h5py", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
