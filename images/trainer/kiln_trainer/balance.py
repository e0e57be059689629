"""Imbalanced classes: `spec.dataset.balance.strategy` (classWeights, oversample, undersample) on the training split.

Why only the training split: the held-out rows measure the model on the data as it is; resampling
them would report a recall the served model never has. Resampling is seeded (the run's seed), so a
seeded run stays repeatable. What was applied (class counts before and after, or the weights) goes
to data-report.json and the log, so it is visible that it reached training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.spec import TrainingJobSpec
from kiln_trainer.errors import SpecError

WHERE = "spec.dataset.balance"
CLASSIFICATION = ("sparse_categorical_crossentropy", "categorical_crossentropy", "binary_crossentropy")
STRATEGIES = ("classWeights", "oversample", "undersample")


@dataclass
class Balanced:
    """Training rows after balancing, the class weights for fit (or None), and what was done."""

    x: np.ndarray
    y: np.ndarray
    class_weight: dict[int, float] | None
    report: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        r = self.report
        if not r:
            return ""
        if r["strategy"] == "classWeights":
            return "balance: classWeights " + ", ".join(f"{c}={w:.3g}" for c, w in r["classWeights"].items())
        return f"balance: {r['strategy']} class counts {r['before']} -> {r['after']}"


def class_labels(y: np.ndarray) -> np.ndarray:
    """Integer class per row, for sparse labels, one-hot rows or a single binary column."""
    labels: np.ndarray = y.argmax(axis=1) if y.ndim == 2 and y.shape[1] > 1 else y.reshape(-1).astype("int64")
    return labels


def class_weights(y: np.ndarray) -> dict[int, float]:
    """`balanced`: n / (k * count_c), as scikit-learn defines it."""
    labels = class_labels(y)
    classes, counts = np.unique(labels, return_counts=True)
    return {int(c): float(len(labels) / (len(classes) * n)) for c, n in zip(classes, counts, strict=True)}


def _counts(labels: np.ndarray) -> dict[str, int]:
    classes, counts = np.unique(labels, return_counts=True)
    return {str(int(c)): int(n) for c, n in zip(classes, counts, strict=True)}


def _resample(labels: np.ndarray, strategy: str, seed: int) -> np.ndarray:
    """Row indices with every class at the majority count (oversample) or the minority count (undersample)."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    target = int(counts.max() if strategy == "oversample" else counts.min())
    picked = []
    for c, n in zip(classes, counts, strict=True):
        rows = np.flatnonzero(labels == c)
        extra = rng.choice(rows, size=target - n, replace=True) if target > n else np.empty(0, dtype="int64")
        picked.append(np.concatenate([rows, extra]) if target >= n else rng.choice(rows, size=target, replace=False))
    order: np.ndarray = rng.permutation(np.concatenate(picked))
    return order


def apply(spec: TrainingJobSpec, x: np.ndarray, y: np.ndarray, loss: str, seed: int) -> Balanced:
    """Balance the training rows as `spec.dataset.balance` (and the older `training.classWeight`) asks."""
    chosen = spec.dataset.balance if spec.dataset else None
    strategy = chosen.strategy if chosen is not None else None
    legacy = spec.training.class_weight == "balanced"
    if strategy and legacy:
        raise SpecError("set dataset.balance or training.classWeight: balanced, not both", WHERE)
    if legacy:
        strategy, where = "classWeights", "spec.training.classWeight"
    else:
        where = f"{WHERE}.strategy"
    if not strategy:
        return Balanced(x, y, None)
    if loss not in CLASSIFICATION:
        raise SpecError(f"balancing classes needs a classification loss, not {loss}", where)
    labels = class_labels(y)
    if len(np.unique(labels)) < 2:
        raise SpecError("balancing needs at least two classes in the training split", where)
    if strategy == "classWeights":
        weights = class_weights(y)
        return Balanced(x, y, weights, {"strategy": strategy, "classWeights": {str(k): v for k, v in weights.items()}})
    if strategy not in STRATEGIES:
        raise SpecError(f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})", where)
    idx = _resample(labels, strategy, seed)
    return Balanced(x[idx], y[idx], None, {"strategy": strategy, "before": _counts(labels),
                                            "after": _counts(labels[idx])})
