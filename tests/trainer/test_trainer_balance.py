"""dataset.balance on a 1:9 subsample of scikit-learn's breast_cancer: minority recall on held-out rows rises."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from kiln_trainer import balance
from kiln_trainer.errors import SpecError
from support.trainer import example_module, manifest, write_csv, write_manifest

from kiln.spec import TrainingJobSpec

pytestmark = pytest.mark.training


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """examples/imbalanced: 270 benign (1) and 30 malignant (0) training rows; the rest held out of the CSV."""
    import pandas as pd

    folder = tmp_path_factory.mktemp("imbalanced")
    example_module("imbalanced").make(folder)
    train, held = pd.read_csv(folder / "data.csv"), pd.read_csv(folder / "heldout.csv")
    return {"x": train.drop(columns="label").to_numpy(), "y": train["label"].to_numpy(),
            "x_held": held.drop(columns="label").to_numpy(), "y_held": held["label"].to_numpy()}


def _run(tmp_path: Path, kiln_train, data: dict, strategy: str | None):
    folder = tmp_path / (strategy or "none")
    folder.mkdir()
    write_csv(folder / "data.csv", data["x"], data["y"])
    ds = {"uri": "data.csv", "preprocessing": {"normalization": "standard"}}
    if strategy:
        ds["balance"] = {"strategy": strategy}
    doc = manifest(dataset=ds, training={"epochs": 3, "batchSize": 32, "seed": 4,
                                         "optimizer": {"learningRate": 0.003}})
    doc["spec"]["model"] = {"inputShape": [30], "layers": [{"type": "Dense", "units": 8, "activation": "relu"},
                                                            {"type": "Dense", "units": 2, "activation": "softmax"}]}
    run = kiln_train(write_manifest(folder, doc))
    assert run.code == 0, run.err
    return run


def _minority_recall(run, data: dict) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(run.output / "model.onnx"))
    pred = sess.run(None, {"input": data["x_held"].astype("float32")})[0].argmax(axis=1)
    minority = data["y_held"] == 0
    return float((pred[minority] == 0).mean())


def test_each_strategy_raises_minority_recall(tmp_path: Path, kiln_train, imbalanced: dict) -> None:
    base = _minority_recall(_run(tmp_path, kiln_train, imbalanced, None), imbalanced)
    for strategy in balance.STRATEGIES:
        run = _run(tmp_path, kiln_train, imbalanced, strategy)
        recall = _minority_recall(run, imbalanced)
        print(f"{strategy}: minority recall {recall:.3f} (unbalanced {base:.3f})")
        assert recall > base + 0.05, (strategy, recall, base)
        applied = json.loads((run.output / "data-report.json").read_text())["balance"]
        assert applied["strategy"] == strategy and f"balance: {strategy}" in run.out
        if strategy == "classWeights":
            weights = {int(k): v for k, v in applied["classWeights"].items()}
            assert weights[0] > 4 * weights[1]  # about 9:1 inverse to the counts
        else:
            before, after = applied["before"], applied["after"]
            assert before["0"] * 5 < before["1"] and after["0"] == after["1"]
            assert after["0"] == (before["1"] if strategy == "oversample" else before["0"])


def test_resampling_touches_only_the_given_rows_and_is_seeded() -> None:
    x = np.arange(20, dtype="float32").reshape(10, 2)
    y = np.array([0] * 8 + [1] * 2)
    spec = {"dataset": {"uri": "d.csv", "balance": {"strategy": "oversample"}}}
    a = balance.apply(TrainingJobSpec.from_dict(spec), x, y, "sparse_categorical_crossentropy", 3)
    b = balance.apply(TrainingJobSpec.from_dict(spec), x, y, "sparse_categorical_crossentropy", 3)
    np.testing.assert_array_equal(a.x, b.x)
    assert np.bincount(a.y).tolist() == [8, 8] and {tuple(r) for r in a.x} == {tuple(r) for r in x}
    under = balance.apply(TrainingJobSpec.from_dict({"dataset": {"uri": "d.csv", "balance": {"strategy": "undersample"}}}), x, y, "binary_crossentropy", 3)
    assert np.bincount(under.y).tolist() == [2, 2] and under.class_weight is None


@pytest.mark.parametrize(("spec", "loss", "field", "words"), [
    ({"dataset": {"uri": "d.csv", "balance": {"strategy": "oversample"}}}, "mse", "spec.dataset.balance.strategy", "classification loss"),
    ({"dataset": {"uri": "d.csv", "balance": {"strategy": "classWeights"}}, "training": {"classWeight": "balanced"}},
     "sparse_categorical_crossentropy", "spec.dataset.balance", "not both"),
])
def test_balance_errors(spec: dict, loss: str, field: str, words: str) -> None:
    with pytest.raises(SpecError) as e:
        balance.apply(TrainingJobSpec.from_dict(spec), np.zeros((4, 1)), np.array([0, 0, 0, 1]), loss, 0)
    assert e.value.field == field and words in str(e.value)
