"""Augmentation layers Keras lacks in the form Kiln needs: shape-keeping random crop, centered contrast.

Why custom: Keras' RandomCrop changes the image size (and centre-crops outside training, which
would make the validation metrics disagree with the exported model), and RandomContrast clips to
a 0..255 value range, which breaks on normalized inputs. These are identities outside training,
so `fit`'s validation pass sees exactly what the exported model sees. Training model only.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


class RandomCropResize(keras.layers.Layer):
    """Crop a random window of at least `1 - fraction` of height and width, resized back to the input size."""

    def __init__(self, fraction: float, height: int, width: int, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fraction, self.height, self.width = float(fraction), int(height), int(width)
        ch, cw = max(1, round(height * (1 - fraction))), max(1, round(width * (1 - fraction)))
        self.crop = keras.layers.RandomCrop(ch, cw, seed=seed)
        self.resize = keras.layers.Resizing(self.height, self.width)

    def call(self, x: Any, training: bool | None = None) -> Any:
        if not training:
            return x
        return self.resize(self.crop(x, training=True))

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape


class RandomContrastCentered(keras.layers.Layer):
    """Per image and channel: `mean + (x - mean) * f`, f uniform in [1 - factor, 1 + factor]; no clipping."""

    def __init__(self, factor: float, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.factor = float(factor)
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, x: Any, training: bool | None = None) -> Any:
        if not training:
            return x
        mean = ops.mean(x, axis=(1, 2), keepdims=True)
        f = keras.random.uniform(ops.shape(mean), 1 - self.factor, 1 + self.factor, seed=self.generator)
        return mean + (x - mean) * f

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape
