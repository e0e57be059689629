"""Preprocessing layers, augmentation, layer building and optimizers, with real Keras."""

from __future__ import annotations

import numpy as np
import pytest
from kiln_trainer import model as model_lib
from kiln_trainer import optimizers, preprocess
from kiln_trainer.errors import SpecError

from kiln.spec import Layer, Optimizer, Preprocessing

pytestmark = pytest.mark.training

X = np.array([[1.0, 10.0], [3.0, np.nan], [5.0, 30.0], [7.0, 20.0]])


def test_standard_and_mean_imputation_fitted_values() -> None:
    st = preprocess.fit(X, Preprocessing.from_dict({"missingValues": "mean", "normalization": "standard"}))
    assert st.fill.tolist() == [4.0, 20.0]
    filled = np.array([[1, 10], [3, 20], [5, 30], [7, 20]], dtype=float)
    np.testing.assert_allclose(st.offset, filled.mean(axis=0))
    np.testing.assert_allclose(st.scale, 1 / filled.std(axis=0))


def test_median_zero_minmax_and_none() -> None:
    assert preprocess.fit(X, Preprocessing.from_dict({"missingValues": "median"})).fill.tolist() == [4.0, 20.0]
    assert preprocess.fit(X, Preprocessing.from_dict({"missingValues": "zero"})).fill.tolist() == [0.0, 0.0]
    mm = preprocess.fit(X, Preprocessing.from_dict({"missingValues": "zero", "normalization": "minmax"}))
    assert mm.offset.tolist() == [1.0, 0.0]
    np.testing.assert_allclose(mm.scale, [1 / 6, 1 / 30])
    none = preprocess.fit(X, Preprocessing.from_dict({"missingValues": "drop", "normalization": "none"}))
    assert not none.active and preprocess.layer(none, 2) is None


def test_constant_feature_does_not_divide_by_zero() -> None:
    st = preprocess.fit(np.array([[1.0, 2.0], [1.0, 4.0]]), Preprocessing.from_dict({"normalization": "standard"}))
    assert st.scale[0] == 1.0


def test_layer_applies_fill_then_scaling() -> None:
    st = preprocess.fit(X, Preprocessing.from_dict({"missingValues": "mean", "normalization": "minmax"}))
    layer = preprocess.layer(st, 2)
    out = np.asarray(layer(np.array([[np.nan, np.nan], [7.0, 30.0]], dtype="float32")))
    expected = (np.array([[4.0, 20.0], [7.0, 30.0]]) - st.offset) * st.scale
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_per_channel_statistics_for_images() -> None:
    imgs = np.stack([np.full((2, 2, 2), [0.0, 10.0]), np.full((2, 2, 2), [2.0, 30.0])])
    st = preprocess.fit(imgs, Preprocessing.from_dict({"normalization": "standard"}))
    assert st.offset.tolist() == [1.0, 20.0]


def test_augmentation_changes_training_only() -> None:
    layers = preprocess.augmentation(Preprocessing.from_dict({"augmentation": {"horizontalFlip": True, "rotation": 0.2, "zoom": 0.2,
                                                                               "translation": 0.2}}), [8, 8, 1], seed=3)
    assert [type(a).__name__ for a in layers] == ["RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation"]
    x = np.random.default_rng(0).random((4, 8, 8, 1)).astype("float32")
    trained = inferred = x
    for a in layers:
        trained = a(trained, training=True)
        inferred = a(inferred, training=False)
    assert not np.allclose(np.asarray(trained), x)
    np.testing.assert_array_equal(np.asarray(inferred), x)
    with pytest.raises(SpecError) as e:
        preprocess.augmentation(Preprocessing.from_dict({"augmentation": {"horizontalFlip": True}}), [64], seed=0)
    assert e.value.field == "spec.dataset.preprocessing.augmentation"


def test_layer_field_errors_name_the_field() -> None:
    cases = [
        ([{"type": "Dense", "units": 4}, {"type": "Dropout", "rate": 0.1, "units": 3}], "spec.model.layers[1].units"),
        ([{"type": "Dense"}], "spec.model.layers[0].units"),
        ([{"type": "LSTM", "units": 3}], "spec.model.layers[0].type"),
        ([{"type": "Conv2D", "filters": 2, "kernelSize": 3}], "spec.model.layers[0]"),
    ]
    for layers, field in cases:
        with pytest.raises(SpecError) as e:
            model_lib.build([4], [Layer.from_dict(x) for x in layers], None, [])
        assert e.value.field == field, (layers, e.value)


def test_image_model_builds_every_layer_type() -> None:
    layers = [{"type": "Conv2D", "filters": 4, "kernelSize": 3, "padding": "same", "activation": "relu"},
              {"type": "BatchNormalization", "momentum": 0.9}, {"type": "MaxPooling2D", "poolSize": 2},
              {"type": "AveragePooling2D", "poolSize": 2, "strides": 1, "padding": "same"},
              {"type": "GlobalAveragePooling2D"}, {"type": "Reshape", "targetShape": [2, 2]}, {"type": "Flatten"},
              {"type": "Dropout", "rate": 0.2}, {"type": "Dense", "units": 3, "activation": "softmax", "name": "probs"}]
    aug = preprocess.augmentation(Preprocessing.from_dict({"augmentation": {"horizontalFlip": True}}), [8, 8, 1], seed=0)
    models = model_lib.build([8, 8, 1], [Layer.from_dict(x) for x in layers], None, aug)
    assert models.inference.output_shape == (None, 3)
    assert models.training is not models.inference
    assert not any("augment" in lay.name for lay in models.inference.layers)
    assert {w.path for w in models.training.weights} >= {w.path for w in models.inference.weights}


def _fit_losses(opt_spec: dict) -> list[float]:
    import keras

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 4)).astype("float32")
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0]) > 0).astype("int64")
    m = model_lib.build([4], [Layer.from_dict(x) for x in [{"type": "Dense", "units": 8, "activation": "relu"},
                              {"type": "Dense", "units": 2, "activation": "softmax"}]], None, []).training
    m.compile(optimizer=optimizers.build(Optimizer.from_dict(opt_spec)), loss="sparse_categorical_crossentropy")
    return m.fit(x, y, epochs=5, batch_size=32, verbose=0).history["loss"]


@pytest.mark.parametrize("opt", [
    {"name": "sgd", "learningRate": 0.1, "momentum": 0.9, "nesterov": True},
    {"name": "adam", "learningRate": 0.01, "beta1": 0.8, "beta2": 0.99, "epsilon": 1e-6},
    {"name": "rmsprop", "learningRate": 0.01, "rho": 0.8, "momentum": 0.1},
    {"name": "adamw", "learningRate": 0.01, "weightDecay": 0.01},
])
def test_each_optimizer_trains(opt: dict) -> None:
    built = optimizers.build(Optimizer.from_dict(opt))
    assert float(built.learning_rate) == pytest.approx(opt["learningRate"])
    losses = _fit_losses(opt)
    assert losses[-1] < losses[0] * 0.8, losses


def test_optimizer_rejects_fields_it_ignores() -> None:
    with pytest.raises(SpecError) as e:
        optimizers.build(Optimizer.from_dict({"name": "adam", "rho": 0.9}))
    assert e.value.field == "spec.training.optimizer.rho"
    with pytest.raises(SpecError) as e:
        optimizers.build(Optimizer.from_dict({"name": "lbfgs"}))
    assert e.value.field == "spec.training.optimizer.name"
    assert optimizers.build(Optimizer.from_dict({"name": "adamw", "weightDecay": 0.05})).weight_decay == pytest.approx(0.05)
