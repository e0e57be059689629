"""Learning-rate schedules from `spec.training.learningRateSchedule`, applied once per epoch.

Why per epoch and a pure function of the history: the learning rate of epoch e depends only on e,
the spec and (for `plateau`) the monitored values of the epochs before it. A resumed run restores
the history from its checkpoint, so it continues with exactly the rate an uninterrupted run would
have used, with no extra state to save. Every epoch's rate is written to the logs as
`learning_rate` (history.json, training-curves.png, the epoch line), with or without a schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import keras

from kiln.spec import Training
from kiln_trainer.errors import SpecError

WHERE = "spec.training.learningRateSchedule"
LR_KEY = "learning_rate"
PLATEAU_MONITOR = "val_loss"
# Per type: the fields it takes besides `type` (a field it would ignore is an error naming it).
SCHEDULE_FIELDS: dict[str, tuple[str, ...]] = {
    "constant": ("warmupEpochs",),
    "exponential": ("warmupEpochs", "decayRate", "decaySteps", "minLearningRate"),
    "step": ("warmupEpochs", "decayRate", "decaySteps", "minLearningRate"),
    "cosine": ("warmupEpochs", "decaySteps", "minLearningRate"),
    "plateau": ("warmupEpochs", "patience", "factor", "minLearningRate"),
}


@dataclass(frozen=True)
class Schedule:
    """A validated schedule: `rate(epoch, history)` is the learning rate of 0-based `epoch`."""

    kind: str
    base: float
    epochs: int
    warmup: int = 0
    decay_rate: float = 0.5
    decay_steps: int = 1
    min_lr: float = 0.0
    patience: int = 2
    factor: float = 0.5

    def _decayed(self, t: int) -> float:
        if self.kind == "exponential":
            return float(self.base * self.decay_rate ** (t / self.decay_steps))
        if self.kind == "step":
            return float(self.base * self.decay_rate ** (t // self.decay_steps))
        if self.kind == "cosine":
            span = max(1, self.decay_steps)
            frac = min(t, span) / span
            return self.min_lr + (self.base - self.min_lr) * 0.5 * (1 + math.cos(math.pi * frac))
        return self.base

    def _plateau(self, epoch: int, monitored: list[float]) -> float:
        """Multiply by `factor` each time `patience` epochs pass without a new best (after warmup)."""
        lr, best, wait = self.base, math.inf, 0
        for value in monitored[self.warmup:epoch]:
            if value < best:
                best, wait = value, 0
                continue
            wait += 1
            if wait >= self.patience:
                lr, wait = max(self.min_lr, lr * self.factor), 0
        return lr

    def rate(self, epoch: int, history: dict[str, list[float]]) -> float:
        if epoch < self.warmup:
            return self.base * (epoch + 1) / (self.warmup + 1)
        if self.kind == "plateau":
            return self._plateau(epoch, history.get(PLATEAU_MONITOR, []))
        return max(self.min_lr, self._decayed(epoch - self.warmup))


def parse(tr_spec: Training) -> Schedule:
    """The schedule of `spec.training` (constant without warmup when none is given), checked against the run.

    The fallbacks below apply only to fields the schedule's type takes and the spec leaves out; they
    are not CRD defaults because which fields apply depends on `type`.
    """
    given = tr_spec.learning_rate_schedule
    sched = given.to_dict() if given is not None else {}
    kind = str(sched.pop("type", "constant"))
    if kind not in SCHEDULE_FIELDS:
        raise SpecError(f"unknown schedule {kind!r} (known: {', '.join(SCHEDULE_FIELDS)})", f"{WHERE}.type")
    for key in sched:
        if key not in SCHEDULE_FIELDS[kind]:
            raise SpecError(f"a {kind} schedule does not take {key!r} (it takes: {', '.join(SCHEDULE_FIELDS[kind])})",
                            f"{WHERE}.{key}")
    base = float(tr_spec.optimizer.learning_rate)
    epochs = int(tr_spec.epochs)
    warmup = int(sched.get("warmupEpochs", 0))
    if warmup >= epochs:
        raise SpecError(f"warmupEpochs {warmup} leaves no epoch of the {epochs} to train at the full rate",
                        f"{WHERE}.warmupEpochs")
    min_lr = float(sched.get("minLearningRate", 0.0))
    if min_lr >= base:
        raise SpecError(f"minLearningRate {min_lr:g} is not below the optimizer's learningRate {base:g}",
                        f"{WHERE}.minLearningRate")
    steps = int(sched.get("decaySteps", epochs - warmup if kind == "cosine" else 1))
    return Schedule(kind, base, epochs, warmup, float(sched.get("decayRate", 0.5)), steps, min_lr,
                    int(sched.get("patience", 2)), float(sched.get("factor", 0.5)))


class LearningRateCallback(keras.callbacks.Callback):
    """Sets the optimizer's rate before each epoch and records it in the epoch's logs.

    `history` is the CheckpointCallback's (restored on resume): the plateau rule reads the
    monitored values of earlier epochs from it. This callback must run before the checkpoint one
    so the rate lands in the same history entry as the epoch's metrics.
    """

    def __init__(self, schedule: Schedule, history: dict[str, list[float]]) -> None:
        super().__init__()
        self.schedule = schedule
        self.history = history
        self.current = schedule.base

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.current = self.schedule.rate(epoch, self.history)
        self.model.optimizer.learning_rate.assign(self.current)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None:  # read back from the optimizer: the rate it really trained with
            logs[LR_KEY] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))  # Mirrored too


class StopOnDivergence(keras.callbacks.Callback):
    """Stops training after an epoch whose loss is NaN or infinite (a learning rate too high, no clipping).

    Why per epoch and not Keras' TerminateOnNaN: a per-batch hook makes Keras turn every batch's
    logs into Python numbers, a device sync per step that costs wall time on every healthy run.
    The trainer then fails the run with advice (`spec.training.optimizer`) instead of exporting NaN.
    """

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.model.stop_training = True
