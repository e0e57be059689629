"""Optimizers from `spec.training.optimizer`, rejecting hyperparameters the chosen optimizer ignores.

Why: `rho` on adam or `weightDecay` on sgd would be silently dropped by a permissive mapping; the
user asked for something they are not getting, so it is an error naming the field.
"""

from __future__ import annotations

from typing import Any

import keras

from kiln.spec import Optimizer
from kiln_trainer.errors import SpecError

# spec field -> Keras argument, per optimizer.
OPTIMIZER_FIELDS: dict[str, dict[str, str]] = {
    "sgd": {"momentum": "momentum", "nesterov": "nesterov"},
    "adam": {"beta1": "beta_1", "beta2": "beta_2", "epsilon": "epsilon"},
    "rmsprop": {"rho": "rho", "momentum": "momentum", "epsilon": "epsilon"},
    "adamw": {"beta1": "beta_1", "beta2": "beta_2", "epsilon": "epsilon", "weightDecay": "weight_decay"},
}
_CLASSES = {"sgd": "SGD", "adam": "Adam", "rmsprop": "RMSprop", "adamw": "AdamW"}
# Gradient clipping, taken by every optimizer: clipNorm rescales each gradient to at most this L2 norm,
# clipValue clips each gradient element to [-v, v]. Keras takes only one of them.
CLIP_FIELDS = {"clipNorm": "clipnorm", "clipValue": "clipvalue"}


def build(spec: Optimizer) -> keras.optimizers.Optimizer:
    """A fresh Keras optimizer for `spec.training.optimizer` (call it inside the strategy scope)."""
    where = "spec.training.optimizer"
    name = spec.name
    if name not in OPTIMIZER_FIELDS:
        raise SpecError(f"unknown optimizer {name!r} (known: {', '.join(OPTIMIZER_FIELDS)})", f"{where}.name")
    fields = {**OPTIMIZER_FIELDS[name], **CLIP_FIELDS}
    if spec.clip_norm is not None and spec.clip_value is not None:
        raise SpecError("set clipNorm or clipValue, not both (Keras applies only one kind of clipping)",
                        f"{where}.clipValue")
    kwargs: dict[str, Any] = {"learning_rate": float(spec.learning_rate)}
    for key, value in spec.to_dict().items():  # the fields set (name and learningRate always are)
        if key in ("name", "learningRate"):
            continue
        if key not in fields:
            takes = ", ".join(["learningRate", *fields])
            raise SpecError(f"{name} does not take {key!r} (it takes: {takes})", f"{where}.{key}")
        kwargs[fields[key]] = bool(value) if key == "nesterov" else float(value)
    return getattr(keras.optimizers, _CLASSES[name])(**kwargs)
