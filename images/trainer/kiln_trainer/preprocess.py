"""Imputation, normalization and augmentation as Keras layers.

Why layers: imputation and normalization are fitted on the training split and then become part of
the exported model, so clients of the served ONNX model send raw features (NaN where a value is
missing). Augmentation layers are placed only in the training model, never in the exported one.
Statistics are per entry of the last axis: per feature for flat inputs, per channel for images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import ops

from kiln.spec import Preprocessing, camel
from kiln_trainer.errors import SpecError


@keras.saving.register_keras_serializable(package="kiln")
class Preprocess(keras.layers.Layer):
    """`(where(isnan(x), fill, x) - offset) * scale` with fitted, non-trainable per-channel vectors."""

    def __init__(self, channels: int, impute: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.channels = int(channels)
        self.impute = bool(impute)

    def build(self, input_shape: Any) -> None:
        shape = (self.channels,)
        self.fill = self.add_weight(name="fill", shape=shape, initializer="zeros", trainable=False)
        self.offset = self.add_weight(name="offset", shape=shape, initializer="zeros", trainable=False)
        self.scale = self.add_weight(name="scale", shape=shape, initializer="ones", trainable=False)

    def call(self, x: Any) -> Any:
        if self.impute:
            x = ops.where(ops.isnan(x), ops.cast(self.fill, x.dtype), x)
        return (x - self.offset) * self.scale

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "channels": self.channels, "impute": self.impute}


@dataclass
class PreprocessState:
    """Fitted values; saved with each checkpoint so a resumed run uses exactly the same ones."""

    fill: np.ndarray
    offset: np.ndarray
    scale: np.ndarray
    impute: bool
    normalization: str

    @property
    def active(self) -> bool:
        return self.impute or self.normalization != "none"

    def to_json(self) -> dict[str, Any]:
        return {"fill": self.fill.tolist(), "offset": self.offset.tolist(), "scale": self.scale.tolist(),
                "impute": self.impute, "normalization": self.normalization}

    def transform(self, x: np.ndarray) -> np.ndarray:
        """What the fitted layer computes, in NumPy (float64): for fitting what comes after it (PCA)."""
        flat = x.reshape(-1, x.shape[-1]).astype("float64")
        if self.impute:
            flat = np.where(np.isnan(flat), self.fill, flat)
        out: np.ndarray = (flat - self.offset) * self.scale
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PreprocessState:
        return cls(np.asarray(d["fill"], dtype="float64"), np.asarray(d["offset"], dtype="float64"),
                   np.asarray(d["scale"], dtype="float64"), bool(d["impute"]), str(d["normalization"]))


def fit(x_train: np.ndarray, preprocessing: Preprocessing) -> PreprocessState:
    """Fit imputation and normalization on the training split only (no peeking at validation rows)."""
    missing = preprocessing.missing_values
    normalization = preprocessing.normalization
    channels = x_train.shape[-1]
    impute = missing in ("mean", "median", "zero")
    if not impute and normalization == "none":  # nothing to fit: skip the pass over the data
        return PreprocessState(np.zeros(channels), np.zeros(channels), np.ones(channels), False, "none")
    flat = x_train.reshape(-1, channels).astype("float64")
    all_nan = np.isnan(flat).all(axis=0) if len(flat) else np.ones(channels, dtype=bool)
    if missing == "mean":
        fill = np.nanmean(np.where(all_nan, 0.0, flat), axis=0)
    elif missing == "median":
        fill = np.nanmedian(np.where(all_nan, 0.0, flat), axis=0)
    else:
        fill = np.zeros(channels)
    filled = np.where(np.isnan(flat), fill, flat)
    if normalization == "standard":
        offset = filled.mean(axis=0)
        std = filled.std(axis=0)
        scale = np.where(std > 1e-12, 1.0 / np.where(std > 1e-12, std, 1.0), 1.0)
    elif normalization == "minmax":
        offset = filled.min(axis=0)
        span = filled.max(axis=0) - offset
        scale = np.where(span > 1e-12, 1.0 / np.where(span > 1e-12, span, 1.0), 1.0)
    elif normalization == "none":
        offset, scale = np.zeros(channels), np.ones(channels)
    else:
        raise SpecError(f"unknown normalization {normalization!r}", "spec.dataset.preprocessing.normalization")
    return PreprocessState(fill, offset, scale, impute, normalization)


def layer(state: PreprocessState, channels: int) -> Preprocess | None:
    """The fitted preprocessing layer, or None when there is nothing to do (no ops in the graph)."""
    if not state.active:
        return None
    pre = Preprocess(channels, state.impute, name="kiln_preprocess")
    pre.build((None, channels))
    pre.set_weights([state.fill.astype("float32"), state.offset.astype("float32"), state.scale.astype("float32")])
    return pre


IMAGE_AUGMENTATIONS = ("horizontal_flip", "vertical_flip", "rotation", "zoom", "translation", "crop", "contrast")


def augmentation(spec: Preprocessing, input_shape: list[int], seed: int | None) -> list[keras.layers.Layer]:
    """Random layers for the training model only (after the normalization); image ones need H x W x C inputs."""
    from kiln_trainer.augment import RandomContrastCentered, RandomCropResize

    aug = spec.augmentation
    if aug is None:
        return []
    image = [camel(k) for k in IMAGE_AUGMENTATIONS if getattr(aug, k)]
    if image and len(input_shape) != 3:
        raise SpecError(f"image augmentation ({', '.join(image)}) needs an image inputShape [height, width, channels], "
                        f"got {input_shape}; flat inputs take gaussianNoise", "spec.dataset.preprocessing.augmentation")
    layers: list[keras.layers.Layer] = []
    if aug.horizontal_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed, name="augment_flip"))
    if aug.vertical_flip:
        layers.append(keras.layers.RandomFlip("vertical", seed=seed, name="augment_vflip"))
    if aug.rotation:
        layers.append(keras.layers.RandomRotation(float(aug.rotation), seed=seed, name="augment_rotation"))
    if aug.zoom:
        layers.append(keras.layers.RandomZoom(float(aug.zoom), seed=seed, name="augment_zoom"))
    if aug.translation:
        shift = float(aug.translation)
        layers.append(keras.layers.RandomTranslation(shift, shift, seed=seed, name="augment_translation"))
    if aug.crop:
        layers.append(RandomCropResize(float(aug.crop), input_shape[0], input_shape[1], seed, name="augment_crop"))
    if aug.contrast:
        layers.append(RandomContrastCentered(float(aug.contrast), seed, name="augment_contrast"))
    if aug.gaussian_noise:  # on the normalized values: stddev is in standard deviations with `standard`
        layers.append(keras.layers.GaussianNoise(float(aug.gaussian_noise), seed=seed, name="augment_noise"))
    return layers
