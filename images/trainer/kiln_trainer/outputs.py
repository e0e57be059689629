"""The output location: staged writes, atomic commit, the result summary and the termination message.

Why staging: the operator and `kiln run` treat `result.json` (and `model.onnx`) as "training
succeeded". Files are built in `<output>/.kiln-staging/` and moved into place only at the end,
`result.json` last; a failed run removes the staging folder, and a new run first removes the
success markers of an earlier one. For `s3://` outputs everything is built locally, uploaded to a
staging prefix and then copied into place (storage.stage_and_publish); checkpoints and TensorBoard logs
are uploaded after every epoch so that a replacement pod, with a fresh local disk, resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from kiln import DEFAULT_OUTPUT_DIR
from kiln_trainer import storage
from kiln_trainer.errors import TrainerError
from kiln_trainer.jobspec import Job
from kiln_trainer.settings import TrainerSettings
from kiln_trainer.storage import Location

RESULT = "result.json"
# Files a successful run leaves; removed at the start of a run so a failure never leaves old ones behind.
ARTIFACTS = (RESULT, "model.onnx", "model-int8.onnx", "model.tflite", "model-int8.tflite", "model.keras", "model.h5",
             "metrics.json", "history.json", "training-curves.png", "data-report.json", "labels.json",
             "explanations.json", "explanations.png", "tuning.json")
TRIAL_KEYS = ("trial", "parameters", "metrics", "score", "error", "field")
"""The termination message of one parallel trial's pod (kiln_trainer.tuning.run_trial)."""
RESULT_KEYS = ("metrics", "modelUri", "onnxSha256", "parityMaxAbsDiff", "inputs", "outputs", "formats", "topFeatures")
TERMINATION_LIMIT = 4096
SCRATCH_PREFIX = "kiln-out-"


def resolve_output(job: Job, override: str | None, env: dict[str, str] | None = None) -> tuple[storage.Location, Path]:
    """The output location and the local folder written to.

    Precedence: `--output`, then `KILN_OUTPUT_DIR` (the mounted folder in a pod, reported under
    `spec.output.uri` when set), then `spec.output.uri`, then `./kiln-output/<name>`.
    """
    env = dict(os.environ if env is None else env)
    field = "spec.output.uri"
    if override:
        loc = storage.resolve(override, Path.cwd(), "--output")
    elif env.get("KILN_OUTPUT_DIR"):
        local = Path(env["KILN_OUTPUT_DIR"])
        uri = job.typed.output.uri
        return (storage.Location(uri, path=local) if uri and not uri.startswith("s3://")
                else storage.Location(uri, remote=uri) if uri else storage.Location(str(local), path=local)), local
    elif job.typed.output.uri:
        loc = storage.resolve(job.typed.output.uri, job.base_dir, field)
    else:
        loc = storage.resolve(str(Path.cwd() / DEFAULT_OUTPUT_DIR / job.name), Path.cwd(), field)
    if loc.path is not None:
        return loc, loc.path
    return loc, Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX))



class Output:
    """Where this process writes: the real output folder (chief) or a private temp folder (other workers)."""

    def __init__(self, loc: Location, local_dir: Path, chief: bool) -> None:
        self.loc = loc
        self.chief = chief
        self.dir = local_dir if chief else Path(tempfile.mkdtemp(prefix="kiln-worker-out-"))
        self.shared_dir = local_dir  # where the chief's checkpoints are, read by every worker on resume
        self.staging = self.dir / ".kiln-staging"
        # A remote output without KILN_OUTPUT_DIR is built in a temp folder, removed after the upload.
        self.scratch = loc.is_remote and local_dir.name.startswith(SCRATCH_PREFIX) and chief

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def shared_checkpoints(self) -> Path:
        return self.shared_dir / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    def prepare(self) -> None:
        """Create folders and remove an earlier run's success markers (result.json first)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not os.access(self.dir, os.W_OK):
            raise PermissionError(f"output folder {self.dir} is not writable")
        for name in ARTIFACTS:
            storage.rmtree_quiet(self.dir / name)
        storage.rmtree_quiet(self.staging)
        self.staging.mkdir()
        if self.chief and self.loc.is_remote:
            storage.remove_remote(self.loc, list(ARTIFACTS), "spec.output.uri")

    def pull_checkpoints(self) -> None:
        """A fresh pod with an `s3://` output: fetch the stored checkpoint (every worker reads it)."""
        if self.loc.is_remote and not (self.shared_checkpoints / "latest").exists():
            n = storage.pull_folder(self.loc, "checkpoints", self.shared_checkpoints, "spec.output.uri")
            if n:
                print(f"checkpoint: fetched {n} files from {self.loc.child_uri('checkpoints')}", flush=True)

    def push_checkpoint(self, name: str) -> None:
        """After each epoch (chief, `s3://` output): upload checkpoint `name`, then the `latest` pointer,
        then drop older stored epochs; the TensorBoard logs so far go along."""
        if not (self.chief and self.loc.is_remote):
            return
        field = "spec.output.uri"
        storage.push_folder(self.checkpoints / name, self.loc, f"checkpoints/{name}", field)
        storage.push_folder(self.checkpoints / "latest", self.loc, "checkpoints/latest", field)
        storage.remove_stale_checkpoints(self.loc, name, field)
        storage.push_folder(self.logs, self.loc, "logs", field)

    def drop_checkpoints(self) -> None:
        """A finished run's checkpoints are no longer needed (here and in the store; the latter best effort)."""
        storage.rmtree_quiet(self.checkpoints)
        if self.chief and self.loc.is_remote:
            with contextlib.suppress(TrainerError):
                storage.remove_remote_folder(self.loc, "checkpoints", "spec.output.uri")

    def commit(self) -> list[str]:
        """Move staged files into place, `result.json` last; upload them for remote outputs."""
        names = sorted((p.name for p in self.staging.iterdir()), key=lambda n: n == RESULT)
        for name in names:
            dst = self.dir / name
            storage.rmtree_quiet(dst)
            os.replace(self.staging / name, dst)
        self.staging.rmdir()
        if self.loc.is_remote:
            storage.upload_dir(self.dir, self.loc, [*names, "logs"] if self.logs.exists() else names,
                               "spec.output.uri")
        return names

    def abort(self) -> None:
        """Leave nothing that looks like a model after a failure."""
        storage.rmtree_quiet(self.staging)
        for name in (RESULT, "model.onnx"):
            storage.rmtree_quiet(self.dir / name)
        if not self.chief:
            storage.rmtree_quiet(self.dir)

    def finish_worker(self) -> None:
        """Non-chief workers discard their private copy of the outputs."""
        if not self.chief:
            storage.rmtree_quiet(self.dir)

    def uri(self, name: str) -> str:
        """How clients address a file of this output (pvc://, s3:// or file://)."""
        return self.loc.public_uri(name, self.dir)


def write_json(path: Path, data: Any) -> None:
    """Pretty JSON, newline-terminated."""
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def plot_curves(history: dict[str, list[float]], path: Path) -> None:
    """training-curves.png: loss and each metric per epoch, training and validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases = [k for k in history if not k.startswith("val_") and k != "learning_rate"]
    panels = len(bases) + ("learning_rate" in history)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(5 * max(panels, 1), 3.6), squeeze=False)
    for ax, key in zip(axes[0], bases, strict=False):
        epochs = range(1, len(history[key]) + 1)
        ax.plot(epochs, history[key], marker="o", label="training")
        if f"val_{key}" in history:
            ax.plot(range(1, len(history[f"val_{key}"]) + 1), history[f"val_{key}"], marker="o", label="validation")
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    if "learning_rate" in history:  # the schedule, one value per epoch (log scale: decays are exponential)
        ax = axes[0][len(bases)]
        ax.plot(range(1, len(history["learning_rate"]) + 1), history["learning_rate"], marker="o", color="tab:green")
        ax.set_title("learning rate")
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    # Fixed margins instead of fig.tight_layout(): that lays the figure out by drawing it once more, which
    # cost 40 % of the plot (about 0.1 s per run); the tick labels here fit these margins.
    width = 5 * max(panels, 1)
    fig.subplots_adjust(left=0.65 / width, right=1 - 0.2 / width, bottom=0.15, top=0.9, wspace=0.3)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def termination_path(env: dict[str, str] | None = None) -> Path | None:
    """KILN_TERMINATION_LOG, else /dev/termination-log when it exists and is writable, else None."""
    configured = TrainerSettings.from_env(env).termination_log
    if configured:
        return Path(configured)
    default = Path("/dev/termination-log")
    if default.exists() and os.access(default, os.W_OK):
        return default
    return None


def summary(result: dict[str, Any]) -> str:
    """The termination message: exactly the `status.result` keys (a trial's report for a trial), under 4 KB."""
    out = {k: result[k] for k in (TRIAL_KEYS if "trial" in result else RESULT_KEYS) if k in result}
    text = json.dumps(out, separators=(",", ":"))
    if len(text) >= TERMINATION_LIMIT:
        out["formats"] = [{k: f[k] for k in ("format", "file", "sha256") if k in f} for f in out.get("formats", [])]
        text = json.dumps(out, separators=(",", ":"))
    if len(text) >= TERMINATION_LIMIT:
        keep = sorted(out.get("metrics", {}))[:16]
        out["metrics"] = {k: out["metrics"][k] for k in keep}
        text = json.dumps(out, separators=(",", ":"))
    return text


def write_termination(message: str, path: Path | None) -> None:
    """Best effort: a missing or read-only termination log must not change the exit code."""
    if path is None:
        return
    with contextlib.suppress(OSError):
        path.write_text(message)


def failure_message(error: str, field: str | None) -> str:
    """`{"error": one line, "field": spec path or null}`, under 4 KB."""
    line = " ".join(error.split())[:3500]
    return json.dumps({"error": line, "field": field})
