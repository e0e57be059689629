"""output.explain: permutation importance on held-out rows through model.onnx (breast_cancer plus a noise column)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from kiln_trainer import export
from support.trainer import manifest, write_csv, write_manifest

pytestmark = pytest.mark.training


def test_importance_ranks_real_columns_above_noise(tmp_path: Path, kiln_train) -> None:
    from sklearn.datasets import load_breast_cancer

    from kiln.local import heldout_rows

    d = load_breast_cancer()
    names = [n.replace(" ", "_") for n in d.feature_names] + ["noise"]
    x = np.column_stack([d.data, np.random.default_rng(0).normal(size=len(d.data))])
    write_csv(tmp_path / "data.csv", x, d.target, names=names)
    doc = manifest(dataset={"uri": "data.csv", "preprocessing": {"normalization": "standard"}},
                   training={"epochs": 4, "seed": 3, "optimizer": {"learningRate": 0.01}},
                   output={"explain": True})
    doc["spec"]["model"] = {"inputShape": [31], "layers": [{"type": "Dense", "units": 2, "activation": "softmax"}]}
    run = kiln_train(write_manifest(tmp_path, doc))
    assert run.code == 0, run.err

    ranked = json.loads((run.output / "explanations.json").read_text())
    assert ranked["metric"] == "accuracy" and ranked["repeats"] == 5
    order = [r["feature"] for r in ranked["features"]]
    assert sorted(order) == sorted(names)
    assert order.index("noise") >= 10  # a column the model cannot use ranks in the lower part
    top = run.result()["topFeatures"]
    assert [t["feature"] for t in top] == order[:5] and top[0]["importance"] > 0
    assert run.termination["topFeatures"] == top
    assert (run.output / "explanations.png").stat().st_size > 5_000

    # Independently: shuffling the top column of the held-out rows costs accuracy, through model.onnx.
    x_val, y_val = heldout_rows(doc["spec"], tmp_path / "data.csv")
    j = names.index(order[0])

    def accuracy(rows: np.ndarray) -> float:
        return float((export.onnx_predict(run.output / "model.onnx", rows).argmax(1) == y_val).mean())

    base = accuracy(x_val)
    assert base == pytest.approx(ranked["baseline"])
    drops = []
    for seed in range(5):
        shuffled = x_val.copy()
        shuffled[:, j] = shuffled[np.random.default_rng(seed).permutation(len(x_val)), j]
        drops.append(base - accuracy(shuffled))
    assert np.mean(drops) > 0


def test_explain_on_images_is_an_error(tmp_path: Path, kiln_train) -> None:
    np.savez(tmp_path / "data.npz", x=np.zeros((20, 4, 4, 1), dtype="float32"), y=np.arange(20) % 3)
    doc = manifest(dataset={"uri": "data.npz"}, output={"explain": True},
                   model={"inputShape": [4, 4, 1], "layers": [{"type": "Flatten"}, {"type": "Dense", "units": 3}]})
    run = kiln_train(write_manifest(tmp_path, doc))
    assert run.code == 2 and run.termination["field"] == "spec.output.explain"
    assert "flat feature rows" in run.termination["error"]
