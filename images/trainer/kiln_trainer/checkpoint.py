"""Per-epoch checkpoints in the output location, so a restarted pod continues instead of starting over.
(For an `s3://` output each checkpoint is also uploaded to `<output>/checkpoints/`: see outputs.Output.)

Each finished epoch writes `checkpoints/epoch-NNNNN/` (weights with optimizer state, plus
`state.json`: the epoch, seed, fitted preprocessing, history so far, early-stopping counters and a
hash of the spec) and then atomically repoints `checkpoints/latest`. A checkpoint from a different
spec is ignored, so editing the manifest and rerunning starts fresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

log = logging.getLogger("kiln_trainer.checkpoint")
WEIGHTS = "model.weights.h5"
STATE = "state.json"


def spec_hash(spec: dict[str, Any]) -> str:
    """Hash of what determines the trained weights: dataset, model and training sections."""
    relevant = {k: spec.get(k) for k in ("dataset", "model", "training", "workers")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Resumed:
    """The state of the last finished epoch found in the checkpoint folder."""

    epoch: int
    seed: int
    preprocess: dict[str, Any]
    history: dict[str, list[float]]
    early_stopping: dict[str, Any] | None
    weights: Path
    stopped: bool = False


def latest(folder: Path, expected_hash: str) -> Resumed | None:
    """The newest complete checkpoint made with the same spec, or None."""
    pointer = folder / "latest"
    try:
        name = pointer.read_text().strip()
        state = json.loads((folder / name / STATE).read_text())
    except (OSError, ValueError):
        return None
    if state.get("specHash") != expected_hash:
        log.warning("checkpoint in %s was made with a different spec; starting over", folder)
        return None
    weights = folder / name / WEIGHTS
    if not weights.exists():
        return None
    return Resumed(int(state["epoch"]), int(state["seed"]), state["preprocess"], state.get("history", {}),
                   state.get("earlyStopping"), weights, bool(state.get("stopped", False)))


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping whose patience counter and best value survive a restart."""

    def __init__(self, initial: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.initial = initial

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        super().on_train_begin(logs)
        if self.initial:
            self.wait = int(self.initial.get("wait", 0))
            best = self.initial.get("best")
            if best is not None:
                self.best = float(best)
            self.best_epoch = int(self.initial.get("bestEpoch", 0))

    def state(self) -> dict[str, Any]:
        best = self.best
        return {"wait": int(self.wait), "best": None if best is None else float(best),
                "bestEpoch": int(getattr(self, "best_epoch", 0) or 0)}


class CheckpointCallback(keras.callbacks.Callback):
    """Writes a checkpoint after every epoch; history accumulates across restarts."""

    def __init__(self, folder: Path, spec_digest: str, seed: int, preprocess: dict[str, Any],
                 history: dict[str, list[float]], early: ResumableEarlyStopping | None,
                 on_saved: Callable[[str], None] | None = None) -> None:
        super().__init__()
        self.folder = folder
        self.on_saved = on_saved  # e.g. upload to the object store, so a replacement pod resumes
        self.digest = spec_digest
        self.seed = seed
        self.preprocess = preprocess
        self.history = {k: list(v) for k, v in history.items()}
        self.early = early

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        self.save(epoch + 1)

    def save(self, epoch: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"epoch-{epoch:05d}"
        tmp = self.folder / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        self.model.save_weights(str(tmp / WEIGHTS))
        state = {"epoch": epoch, "seed": self.seed, "specHash": self.digest, "preprocess": self.preprocess,
                 "history": self.history, "earlyStopping": self.early.state() if self.early else None,
                 "stopped": bool(getattr(self.model, "stop_training", False))}
        (tmp / STATE).write_text(json.dumps(state))
        final = self.folder / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer_tmp = self.folder / ".latest.tmp"
        pointer_tmp.write_text(name)
        os.replace(pointer_tmp, self.folder / "latest")
        for old in self.folder.glob("epoch-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        if self.on_saved is not None:
            self.on_saved(name)


def restore(model: keras.Model, resumed: Resumed) -> None:
    """Load weights and optimizer state of a checkpoint into a compiled, built model."""
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(str(resumed.weights))
