"""The trainer as a Python library, for `kiln run` (local mode) and tests.

`train_file(path, progress=cb)` trains like `kiln train FILE` and calls `cb(Progress)` after each
epoch (epoch, epochs, percent, metrics), so a caller can draw its own progress bar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln_trainer import runtime
from kiln_trainer.jobspec import Job, job_from_doc, load_job
from kiln_trainer.progress import Progress, ProgressFn

__all__ = ["Progress", "ProgressFn", "run_job", "train_doc", "train_file"]


def run_job(job: Job, output: str | None = None, progress: ProgressFn | None = None) -> tuple[dict[str, Any], bool]:
    """Train `job`; returns (result, whether this process is the chief that wrote the outputs)."""
    runtime.prepare_environment()
    from kiln_trainer import distributed

    cluster = distributed.setup()
    strategy = distributed.strategy(cluster)
    from kiln_trainer import trainer

    return trainer.train(job, output, progress, cluster=cluster, strategy=strategy), cluster.chief


def train_file(path: str | Path, output: str | None = None, progress: ProgressFn | None = None,
               name: str | None = None) -> dict[str, Any]:
    """Train the TrainingJob in a manifest file; returns the result written to result.json."""
    return run_job(load_job(path, name), output, progress)[0]


def train_doc(doc: dict[str, Any], base_dir: str | Path, output: str | None = None,
              progress: ProgressFn | None = None) -> dict[str, Any]:
    """Train an in-memory TrainingJob document whose relative paths resolve against `base_dir`."""
    return run_job(job_from_doc(doc, Path(base_dir)), output, progress)[0]
