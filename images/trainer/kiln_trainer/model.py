"""Building the network from `spec.model.layers`, with the fitted preprocessing in front.

Why strict field checks: a field the layer type does not take (say `units` on Dropout) is almost
always a mistake; silently ignoring it would train a different model from the one the user wrote.
The schema allows every field on every layer, so this check lives here, naming `spec.model.layers[i].f`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras

from kiln.spec import Layer
from kiln_trainer.errors import SpecError

# Per layer type: (required fields, optional fields). `type` and `name` apply to all.
LAYER_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Dense": (("units",), ("activation", "kernelInitializer", "kernelRegularizer")),
    "Dropout": (("rate",), ()),
    "BatchNormalization": ((), ("momentum",)),
    "Conv2D": (("filters", "kernelSize"), ("strides", "padding", "activation", "kernelInitializer",
                                          "kernelRegularizer")),
    "MaxPooling2D": ((), ("poolSize", "strides", "padding")),
    "AveragePooling2D": ((), ("poolSize", "strides", "padding")),
    "Flatten": ((), ()),
    "GlobalAveragePooling2D": ((), ()),
    "Reshape": (("targetShape",), ()),
}
INPUT_NAME = "input"
OUTPUT_NAME = "output"


def _kernel_args(spec: Layer, where: str) -> dict[str, Any]:
    """`kernel_initializer` (Keras' default glorot_uniform when unset) and an L1/L2 `kernel_regularizer`."""
    args: dict[str, Any] = {"kernel_initializer": spec.kernel_initializer or "glorot_uniform"}
    reg = spec.kernel_regularizer
    if reg is not None:
        l1, l2 = float(reg.l1 or 0), float(reg.l2 or 0)
        if not (l1 or l2):
            raise SpecError("kernelRegularizer needs l1 or l2 above 0", f"{where}.kernelRegularizer")
        args["kernel_regularizer"] = keras.regularizers.L1L2(l1=l1, l2=l2)
    return args


def _one_layer(i: int, spec: Layer) -> keras.layers.Layer:
    """One Keras layer; a field its type does not take (or lacks) is a SpecError naming it.

    The fallbacks below (activation, pool size, strides, padding, momentum, kernel initializer) are
    Keras' own defaults for that layer type; they cannot be CRD defaults, which would put them on every
    layer of every type.
    """
    where = f"spec.model.layers[{i}]"
    kind = spec.type
    if kind not in LAYER_FIELDS:
        raise SpecError(f"unknown layer type {kind!r} (known: {', '.join(LAYER_FIELDS)})", f"{where}.type")
    required, optional = LAYER_FIELDS[kind]
    given = spec.to_dict()
    for key in given:
        if key not in ("type", "name", *required, *optional):
            raise SpecError(f"{kind} does not take {key!r} (it takes: {', '.join((*required, *optional)) or 'nothing'})",
                            f"{where}.{key}")
    for key in required:
        if key not in given:
            raise SpecError(f"{kind} needs {key!r}", f"{where}.{key}")
    name, act, padding = spec.name, spec.activation or "linear", spec.padding or "valid"
    if kind == "Dense":
        return keras.layers.Dense(int(given["units"]), activation=act, name=name, **_kernel_args(spec, where))
    if kind == "Dropout":
        return keras.layers.Dropout(float(given["rate"]), name=name)
    if kind == "BatchNormalization":
        return keras.layers.BatchNormalization(momentum=float(0.99 if spec.momentum is None else spec.momentum), name=name)
    if kind == "Conv2D":
        k = int(given["kernelSize"])
        return keras.layers.Conv2D(int(given["filters"]), (k, k), strides=int(spec.strides or 1),
                                   padding=padding, activation=act, name=name, **_kernel_args(spec, where))
    if kind in ("MaxPooling2D", "AveragePooling2D"):
        cls = keras.layers.MaxPooling2D if kind == "MaxPooling2D" else keras.layers.AveragePooling2D
        pool = int(spec.pool_size or 2)
        return cls((pool, pool), strides=int(spec.strides) if spec.strides else None, padding=padding, name=name)
    if kind == "Flatten":
        return keras.layers.Flatten(name=name)
    if kind == "GlobalAveragePooling2D":
        return keras.layers.GlobalAveragePooling2D(name=name)
    return keras.layers.Reshape(tuple(int(d) for d in given["targetShape"]), name=name)


@dataclass
class Models:
    """`inference` is what gets exported; `training` adds augmentation in front and shares all weights."""

    inference: keras.Model
    training: keras.Model


def build(input_shape: list[int], layer_specs: list[Layer], pre: list[keras.layers.Layer] | None,
          augment: list[keras.layers.Layer]) -> Models:
    """The inference model (input -> preprocessing layers -> layers) and the training model that shares it."""
    if not layer_specs:
        raise SpecError("needs at least one layer", "spec.model.layers")
    layers = [_one_layer(i, s) for i, s in enumerate(layer_specs)]
    inp = keras.Input(shape=tuple(int(d) for d in input_shape), name=INPUT_NAME, dtype="float32")
    train_inp = keras.Input(shape=tuple(int(d) for d in input_shape), name=INPUT_NAME, dtype="float32")
    h, t = inp, train_inp
    for p in pre or []:
        h, t = p(h), p(t)
    for a in augment:
        t = a(t)
    for i, lay in enumerate(layers):
        try:
            h = lay(h)
            t = lay(t)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SpecError(f"{layer_specs[i].type} cannot take input of shape {list(h.shape[1:])}: {msg}",
                            f"spec.model.layers[{i}]") from exc
    inference = keras.Model(inp, h, name="kiln_model")
    training = keras.Model(train_inp, t, name="kiln_training") if augment else inference
    return Models(inference=inference, training=training)
