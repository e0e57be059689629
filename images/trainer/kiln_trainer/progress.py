"""Per-epoch progress: one log line, a PATCH of the TrainingJob's `status.progress`, and a Python callback.

The PATCH goes through the shared core's one Kubernetes client (`kiln.kube`, its blocking shim) with the
pod's service account; `kiln.kube` (and aiohttp under it) is imported only when there is a TrainingJob
to patch, so `kiln train` on a laptop does not pay for loading it. A failing PATCH logs a warning and never fails training: progress is a
convenience, the model is the product.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras

from kiln import API_VERSION
from kiln.settings import SettingsError
from kiln_trainer.settings import TrainerSettings

log = logging.getLogger("kiln_trainer.progress")


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
        from kiln import kube

        self.namespace, self.name = namespace, name
        creds = kube.Credentials(base_url.rstrip("/"), kube.token_file(token_file),
                                 str(ca_file) if ca_file and ca_file.exists() else None, verify=not insecure)
        self.url = creds.host + kube.path(API_VERSION, "TrainingJob", namespace, name, "status")
        self.context = creds.ssl_context()
        # No retries: one attempt per epoch, the next epoch reports again.
        self.client = kube.Client(kube.AsyncClient(creds, pool_size=1, timeout=timeout, retries=0, user_agent="kiln-trainer"))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StatusPatcher | None:
        """A patcher when running in a cluster (or pointed at an API server by env), else None."""
        env = os.environ if env is None else env
        try:
            s = TrainerSettings.from_env(env)
        except SettingsError as exc:  # progress is a convenience: a bad variable only turns it off
            log.warning("progress: not reported: %s", exc)
            return None
        if not s.trainingjob or not s.namespace:
            return None
        from kiln import kube

        base = s.api_server or kube.service_account_host(env)
        if not base:
            return None
        token = Path(s.api_token_file or kube.SA_DIR / "token")
        if not s.api_server and not token.exists():
            return None
        ca = Path(s.api_ca_file or kube.SA_DIR / "ca.crt")
        return cls(base, s.namespace, s.trainingjob, token if token.exists() else None, ca, s.api_insecure)

    def patch(self, progress: Progress) -> bool:
        """Send one progress update; True when the API server accepted it. Never raises."""
        return self.patch_status({"progress": progress.to_status()})

    def patch_status(self, status: dict[str, Any]) -> bool:
        """Merge `status` into the TrainingJob's status (progress, tuning) through kiln.kube; never raises."""
        from kiln import kube

        try:
            self.client.patch_status(API_VERSION, "TrainingJob", self.namespace, self.name, status)
            return True
        except kube.ApiError as exc:
            detail = exc.body[:300].replace("\n", " ") if exc.body else exc.reason
            log.warning("progress: PATCH %s failed: HTTP %s %s", self.url, exc.status, detail)
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
