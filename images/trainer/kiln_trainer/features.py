"""Feature selection and PCA from `spec.dataset.preprocessing`, fitted on the training split, exported in the graph.

Why in the graph: clients of the served model send the same raw rows the dataset has (every
column, NaN where a value is missing). `dropColumns` and `varianceThreshold` become one Gather of
the kept columns in front of the fitted imputation/normalization, and `pca` a fixed projection
after it, so model.onnx takes raw features in. Order: select -> impute/normalize -> PCA (PCA on
standardized features when `normalization: standard` is set, as is usual).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import ops

from kiln.spec import Preprocessing
from kiln_trainer.errors import SpecError

WHERE = "spec.dataset.preprocessing"
SELECT = "kiln_select"
PCA = "kiln_pca"


@keras.saving.register_keras_serializable(package="kiln")
class SelectColumns(keras.layers.Layer):
    """Keeps the listed columns of the last axis (a Gather in ONNX)."""

    def __init__(self, keep: list[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keep = [int(i) for i in keep]

    def call(self, x: Any) -> Any:
        return ops.take(x, np.asarray(self.keep, dtype="int32"), axis=-1)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return (*input_shape[:-1], len(self.keep))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "keep": self.keep}


@keras.saving.register_keras_serializable(package="kiln")
class Projection(keras.layers.Layer):
    """`(x - mean) @ components`: a fitted PCA, non-trainable."""

    def __init__(self, inputs: int, outputs: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.inputs, self.outputs = int(inputs), int(outputs)

    def build(self, input_shape: Any) -> None:
        self.mean = self.add_weight(name="mean", shape=(self.inputs,), initializer="zeros", trainable=False)
        self.components = self.add_weight(name="components", shape=(self.inputs, self.outputs),
                                          initializer="zeros", trainable=False)

    def call(self, x: Any) -> Any:
        return ops.matmul(x - self.mean, self.components)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return (*input_shape[:-1], self.outputs)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "inputs": self.inputs, "outputs": self.outputs}


@dataclass
class FeatureState:
    """What was fitted: kept raw columns (None: all), dropped ones by reason, the PCA (None: off)."""

    keep: list[int] | None
    dropped: dict[str, list[str]]
    pca_mean: np.ndarray | None = None
    pca_components: np.ndarray | None = None
    explained: float | None = None

    def to_json(self) -> dict[str, Any]:
        pca = None if self.pca_mean is None or self.pca_components is None else {
            "mean": self.pca_mean.tolist(), "components": self.pca_components.tolist(), "explained": self.explained}
        return {"keep": self.keep, "dropped": self.dropped, "pca": pca}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> FeatureState:
        if not d:
            return cls(None, {})
        pca = d.get("pca")
        return cls(d.get("keep"), dict(d.get("dropped", {})),
                   None if pca is None else np.asarray(pca["mean"], dtype="float64"),
                   None if pca is None else np.asarray(pca["components"], dtype="float64"),
                   None if pca is None else pca.get("explained"))

    def report(self) -> dict[str, Any]:
        """For data-report.json: which columns were dropped and why, and what the PCA kept."""
        out: dict[str, Any] = {"droppedColumns": self.dropped}
        if self.pca_components is not None:
            out["pca"] = {"components": int(self.pca_components.shape[1]), "explainedVariance": self.explained}
        return out


def wanted(pp: Preprocessing) -> bool:
    return bool(pp.drop_columns or pp.variance_threshold is not None or pp.pca is not None)


def check_input(pp: Preprocessing, input_shape: list[int]) -> None:
    """Selection and PCA work on flat feature rows; on images they make no sense."""
    if wanted(pp) and len(input_shape) != 1:
        given = pp.to_dict()
        key = next(k for k in ("pca", "dropColumns", "varianceThreshold") if k in given)
        raise SpecError(f"{key} works on flat feature rows (inputShape [N]), not on inputShape {input_shape}; "
                        "for images use Conv2D/pooling layers instead", f"{WHERE}.{key}")


def fit_selection(x_train: np.ndarray, pp: Preprocessing, names: list[str]) -> FeatureState:
    """Columns to keep: all but `dropColumns`, then those whose training-split variance is above the threshold."""
    n = x_train.shape[-1]
    names = names if len(names) == n else [f"x[{i}]" for i in range(n)]
    keep, dropped = list(range(n)), {}
    drop = list(pp.drop_columns or [])
    if drop:
        unknown = [c for c in drop if c not in names]
        if unknown:
            raise SpecError(f"dropColumns names {unknown[0]!r}, not a feature column (features: "
                            f"{', '.join(names[:20])}{', ...' if n > 20 else ''})", f"{WHERE}.dropColumns")
        keep = [i for i in keep if names[i] not in drop]
        dropped["dropColumns"] = drop
    if pp.variance_threshold is not None:
        threshold = float(pp.variance_threshold)
        with np.errstate(all="ignore"):
            var = np.nan_to_num(np.nanvar(x_train.astype("float64"), axis=0), nan=0.0)
        low = [i for i in keep if var[i] <= threshold]
        keep = [i for i in keep if var[i] > threshold]
        dropped["varianceThreshold"] = [names[i] for i in low]
    if not keep:
        raise SpecError(f"no feature column left after dropColumns/varianceThreshold (of {n})",
                        f"{WHERE}.varianceThreshold" if pp.variance_threshold is not None else f"{WHERE}.dropColumns")
    return FeatureState(None if len(keep) == n else keep, dropped)


def fit_pca(state: FeatureState, x: np.ndarray, pp: Preprocessing) -> FeatureState:
    """PCA by SVD of the (selected, imputed, normalized) training rows: `components` or enough for `varianceRatio`."""
    spec = pp.pca
    if spec is None:
        return state
    if (spec.components is None) == (spec.variance_ratio is None):
        raise SpecError("pca needs exactly one of components and varianceRatio", f"{WHERE}.pca")
    width = x.shape[1]
    if len(x) < 2:
        raise SpecError("pca needs at least 2 training rows", f"{WHERE}.pca")
    mean = x.mean(axis=0)
    _, sv, vt = np.linalg.svd(x - mean, full_matrices=False)
    var = sv**2
    ratio = np.cumsum(var) / var.sum() if var.sum() > 0 else np.ones_like(var)
    if spec.components is not None:
        k = int(spec.components)
        if k > len(sv):
            raise SpecError(f"pca components {k} exceeds the {len(sv)} that {width} features and {len(x)} "
                            "training rows allow", f"{WHERE}.pca.components")
    else:
        k = int(np.searchsorted(ratio, float(spec.variance_ratio or 0) - 1e-12) + 1)
        k = min(k, len(sv))
    return FeatureState(state.keep, state.dropped, mean, vt[:k].T.copy(), float(ratio[k - 1]))


def layers(state: FeatureState) -> tuple[list[keras.layers.Layer], list[keras.layers.Layer]]:
    """(layers before the imputation/normalization, layers after it)."""
    before: list[keras.layers.Layer] = []
    if state.keep is not None:
        before.append(SelectColumns(state.keep, name=SELECT))
    after: list[keras.layers.Layer] = []
    if state.pca_mean is not None and state.pca_components is not None:
        proj = Projection(*state.pca_components.shape, name=PCA)
        proj.build((None, state.pca_components.shape[0]))
        proj.set_weights([state.pca_mean.astype("float32"), state.pca_components.astype("float32")])
        after.append(proj)
    return before, after


def select(state: FeatureState, x: np.ndarray) -> np.ndarray:
    return x if state.keep is None else x[..., state.keep]
