"""Mixup (`spec.dataset.preprocessing.augmentation.mixup: alpha`): training batches of convex mixtures of pairs of rows.

How, without changing the labels' form or the loss: a mixed row x = lam * x_i + (1 - lam) * x_j
(lam ~ Beta(alpha, alpha), per row, j a shuffle of the batch) is trained twice, once against
y_i with sample weight 2 * lam and once against y_j with 2 * (1 - lam). For cross-entropy the loss
is linear in the target, so this is exactly the loss against the mixed label; for mse the two
differ by a constant, so the gradients are the same. Other losses (mae, huber) are rejected. The
training pipeline only: validation, export and the served model never see it.

Mixing happens on the raw rows in front of the in-graph preprocessing; selection, normalization and
PCA are affine, so that equals mixing the normalized rows. A NaN (left for in-graph imputation)
stays NaN in the mixture and is imputed as the fill value.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kiln.spec import Augmentation
from kiln_trainer.errors import SpecError

WHERE = "spec.dataset.preprocessing.augmentation.mixup"
EXACT_LOSSES = ("sparse_categorical_crossentropy", "categorical_crossentropy", "binary_crossentropy", "mse")


def alpha(aug: Augmentation | None, loss: str) -> float:
    """The Beta parameter, 0 when mixup is off; an error for losses where the weighting trick is not exact."""
    value = float(aug.mixup or 0) if aug is not None else 0.0
    if value and loss not in EXACT_LOSSES:
        raise SpecError(f"mixup needs a loss linear in the target ({', '.join(EXACT_LOSSES)}), not {loss}", WHERE)
    return value


def dataset(tf: Any, x: np.ndarray, y: np.ndarray, batch: int, a: float, seed: int,
            class_weight: dict[int, float] | None) -> Any:
    """A shuffled, batched tf.data pipeline of (mixed x twice, both labels, their weights)."""
    weights = np.ones(len(x), dtype="float32")
    if class_weight:  # fit() does not combine class_weight with sample weights: fold it in here
        labels = y.argmax(axis=1) if y.ndim == 2 and y.shape[1] > 1 else y.reshape(-1).astype("int64")
        weights = np.array([class_weight[int(c)] for c in labels], dtype="float32")
    base = tf.data.Dataset.from_tensor_slices((x, y, weights)).shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    seeds = tf.data.Dataset.random(seed=seed).batch(2)  # one stateless seed pair per batch: repeatable
    return tf.data.Dataset.zip((base.batch(batch), seeds)).map(
        lambda xyw, s: _mix(tf, xyw, tf.cast(s, "int32"), a), num_parallel_calls=1)


def _mix(tf: Any, xyw: tuple[Any, Any, Any], s: Any, a: float) -> tuple[Any, Any, Any]:
    x, y, w = xyw
    n = tf.shape(x)[0]
    g1 = tf.random.stateless_gamma([n], seed=s, alpha=a)
    g2 = tf.random.stateless_gamma([n], seed=s + 1, alpha=a)
    lam = g1 / (g1 + g2)
    perm = tf.random.experimental.stateless_shuffle(tf.range(n), seed=s + 2)
    shape = tf.concat([[n], tf.ones([tf.rank(x) - 1], dtype="int32")], axis=0)
    lx = tf.cast(tf.reshape(lam, shape), x.dtype)
    mixed = lx * x + (1 - lx) * tf.gather(x, perm)
    lam = tf.cast(lam, "float32")
    return (tf.concat([mixed, mixed], 0), tf.concat([y, tf.gather(y, perm)], 0),
            tf.concat([2 * lam * w, 2 * (1 - lam) * tf.gather(w, perm)], 0))
