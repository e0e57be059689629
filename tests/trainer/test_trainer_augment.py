"""Augmentation beyond flips: vertical flip, crop, contrast, Gaussian noise (images and tabular) and mixup.

None of it may reach the exported model: the ONNX graph of a run with every augmentation is the
graph of the same run without any, node for node; only the trained weights differ.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from kiln_trainer import mixup, preprocess
from kiln_trainer.errors import SpecError
from support.trainer import blobs, manifest, write_csv, write_manifest

from kiln.spec import Augmentation, Preprocessing

pytestmark = pytest.mark.training
IMAGE_AUG = {"horizontalFlip": True, "verticalFlip": True, "crop": 0.25, "contrast": 0.3, "gaussianNoise": 0.1,
             "mixup": 0.2}


def test_new_layers_change_training_only() -> None:
    aug = {k: v for k, v in IMAGE_AUG.items() if k != "mixup"}
    layers = preprocess.augmentation(Preprocessing.from_dict({"augmentation": aug}), [8, 8, 1], seed=3)
    assert [a.name for a in layers] == ["augment_flip", "augment_vflip", "augment_crop", "augment_contrast",
                                        "augment_noise"]
    x = np.random.default_rng(0).random((4, 8, 8, 1)).astype("float32")
    for a in layers:
        trained = np.asarray(a(x, training=True))
        assert trained.shape == x.shape and not np.allclose(trained, x), a.name
        np.testing.assert_array_equal(np.asarray(a(x, training=False)), x)
    contrast = np.asarray(layers[3](x, training=True))  # centered: each image keeps its mean
    np.testing.assert_allclose(contrast.mean(axis=(1, 2)), x.mean(axis=(1, 2)), atol=1e-5)
    noise = preprocess.augmentation(Preprocessing.from_dict({"augmentation": {"gaussianNoise": 0.5}}), [30], seed=0)
    assert [a.name for a in noise] == ["augment_noise"]
    with pytest.raises(SpecError, match=r"image augmentation \(crop\)") as e:
        preprocess.augmentation(Preprocessing.from_dict({"augmentation": {"crop": 0.1, "gaussianNoise": 0.1}}), [30], seed=0)
    assert e.value.field == "spec.dataset.preprocessing.augmentation"


def test_mixup_batches_are_convex_mixtures_weighted_by_lambda() -> None:
    import tensorflow as tf

    x = np.arange(16, dtype="float32").reshape(8, 2)
    y = np.arange(8) % 2
    batches = list(mixup.dataset(tf, x, y, 4, 0.4, 7, {0: 1.0, 1: 3.0}))
    assert len(batches) == 2
    first = [b.numpy() for b in batches[0]]
    again = [b.numpy() for b in next(iter(mixup.dataset(tf, x, y, 4, 0.4, 7, {0: 1.0, 1: 3.0})))]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)  # seeded: repeatable
    mx, my, mw = first
    assert mx.shape == (8, 2) and my.shape == (8,) and mw.shape == (8,)
    np.testing.assert_array_equal(mx[:4], mx[4:])  # each mixed row twice: once per label
    cw = np.where(my == 1, 3.0, 1.0)
    lam = mw[:4] / (2 * cw[:4])
    assert ((lam >= 0) & (lam <= 1)).all()
    np.testing.assert_allclose(mw[4:] / (2 * cw[4:]), 1 - lam, atol=1e-6)
    np.testing.assert_allclose(mx[:, 1] - mx[:, 0], 1, rtol=1e-5)  # a convex mix of rows (k, k + 1) keeps the difference
    with pytest.raises(SpecError, match="mixup needs a loss linear") as e:
        mixup.alpha(Augmentation.from_dict({"mixup": 0.2}), "mae")
    assert e.value.field == "spec.dataset.preprocessing.augmentation.mixup"


def _graph(path: Path) -> tuple[list, list]:
    """Nodes with tensor names replaced: int/scalar constants by value, float tensors by shape, the rest by
    order of appearance (Keras/tf2onnx name counters and constant sharing differ per run); weights in use order."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    ids: dict[str, int] = {}
    weights: list[np.ndarray] = []

    def canon(name: str) -> object:
        if name in inits:
            a = inits[name]
            if a.dtype.kind != "f" or a.size == 1:  # shapes, indices, scalars: compared by value
                return ("const", a.dtype.str, a.shape, a.tobytes())
            weights.append(a)
            return ("weight", a.shape)
        return name if name in ("input", "output", "") else ids.setdefault(name, len(ids))

    nodes = [(n.op_type, [canon(i) for i in n.input], [canon(o) for o in n.output]) for n in g.node]
    return nodes, weights


def _compare(tmp_path: Path, kiln_train, write_data, spec: dict, aug: dict) -> None:
    graphs = []
    for name, augmentation in (("plain", {}), ("augmented", aug)):
        folder = tmp_path / name
        folder.mkdir()
        ds = write_data(folder)
        ds["preprocessing"] = {"normalization": "standard", **({"augmentation": augmentation} if augmentation else {})}
        run = kiln_train(write_manifest(folder, manifest(dataset=ds, **spec)))
        assert run.code == 0, run.err
        graphs.append(_graph(run.output / "model.onnx"))
    (nodes_a, w_a), (nodes_b, w_b) = graphs
    assert nodes_a == nodes_b and [w.shape for w in w_a] == [w.shape for w in w_b]
    assert any(not np.array_equal(a, b) for a, b in zip(w_a, w_b, strict=True))


def test_exported_image_graph_is_unchanged_by_augmentation(tmp_path: Path, kiln_train) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()

    def data(folder: Path) -> dict:
        np.savez(folder / "digits.npz", x=d.images[:300, :, :, None], y=d.target[:300])
        return {"uri": "digits.npz"}

    model = {"inputShape": [8, 8, 1], "layers": [
        {"type": "Conv2D", "filters": 4, "kernelSize": 3, "activation": "relu"},
        {"type": "Flatten"}, {"type": "Dense", "units": 10, "activation": "softmax"}]}
    _compare(tmp_path, kiln_train, data, {"model": model}, IMAGE_AUG)


def test_exported_tabular_graph_is_unchanged_by_mixup(tmp_path: Path, kiln_train) -> None:
    x, y = blobs(n=200)

    def data(folder: Path) -> dict:
        write_csv(folder / "data.csv", x, y)
        return {"uri": "data.csv"}

    _compare(tmp_path, kiln_train, data, {}, {"mixup": 0.4})  # seeded and deterministic: only mixup differs
