"""dropColumns, varianceThreshold and PCA: fitted on the training split, in the exported graph, raw rows in."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from kiln_trainer import features
from kiln_trainer.errors import SpecError
from support.trainer import EXAMPLES, blobs, manifest, write_csv, write_manifest

from kiln.spec import Layer, Preprocessing

pytestmark = pytest.mark.training


def _digits_with_gaps(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """digits.csv with 5 % of the values missing (NaN), so imputation sits between selection and PCA."""
    import pandas as pd

    df = pd.read_csv(EXAMPLES / "digits" / "digits.csv").iloc[:900]
    x = df.drop(columns="label").to_numpy(dtype="float64")
    x[np.random.default_rng(0).random(x.shape) < 0.05] = np.nan
    write_csv(folder / "data.csv", x, df["label"].to_numpy(), names=[f"p{i}" for i in range(64)])
    return x, df["label"].to_numpy()


def test_selection_and_pca_in_the_graph_parity_on_raw_rows(tmp_path: Path, kiln_train) -> None:
    import onnxruntime as ort
    from kiln_trainer.trainer import split_indices
    from sklearn.decomposition import PCA

    from kiln.local import heldout_rows

    x, _ = _digits_with_gaps(tmp_path)
    pp = {"missingValues": "mean", "normalization": "standard", "dropColumns": ["p36"], "varianceThreshold": 0.0,
          "pca": {"varianceRatio": 0.9}}
    doc = manifest(dataset={"uri": "data.csv", "preprocessing": pp},
                   training={"epochs": 6, "batchSize": 32, "seed": 2, "optimizer": {"learningRate": 0.01}},
                   output={"formats": ["onnx", "onnx-int8"], "formatTolerance": 0.05})
    doc["spec"]["model"] = {"inputShape": [64], "layers": [{"type": "Dense", "units": 32, "activation": "relu"},
                                                            {"type": "Dense", "units": 10, "activation": "softmax"}]}
    run = kiln_train(write_manifest(tmp_path, doc))
    assert run.code == 0, run.err

    # What was dropped and kept, checked against the training split computed here.
    tr, _ = split_indices(len(x), 0.2, 2)
    var = np.nanvar(x[tr], axis=0)
    report = json.loads((run.output / "data-report.json").read_text())
    constant = [f"p{i}" for i in range(64) if var[i] <= 0 and i != 36]
    assert report["droppedColumns"] == {"dropColumns": ["p36"], "varianceThreshold": constant} and constant
    kept = [i for i in range(64) if f"p{i}" not in constant and i != 36]
    xs = x[tr][:, kept]
    xs = np.where(np.isnan(xs), np.nanmean(xs, axis=0), xs)
    expected = PCA(n_components=0.9, svd_solver="full").fit((xs - xs.mean(0)) / xs.std(0)).n_components_
    assert report["pca"]["components"] == expected and report["pca"]["explainedVariance"] >= 0.9

    # The served model takes all 64 raw columns, NaN included, and agrees with Keras on them.
    sess = ort.InferenceSession(str(run.output / "model.onnx"))
    assert sess.get_inputs()[0].shape[1] == 64
    ops = {n.op_type for n in __import__("onnx").load(str(run.output / "model.onnx")).graph.node}
    assert "Gather" in ops
    x_val, y_val = heldout_rows(doc["spec"], tmp_path / "data.csv")
    assert np.isnan(x_val).any()
    onnx_pred = sess.run(None, {"input": x_val.astype("float32")})[0]
    import keras

    keras_pred = keras.saving.load_model(run.output / "model.keras").predict(x_val, verbose=0)
    np.testing.assert_allclose(onnx_pred, keras_pred, atol=1e-4)
    assert (onnx_pred.argmax(1) == y_val).mean() > 0.85
    assert run.result()["metrics"]["heldout_accuracy"] > 0.85
    assert {f["format"] for f in run.result()["formats"]} == {"onnx", "onnx-int8"}


def test_fitted_selection_and_pca_values() -> None:
    x = np.array([[1.0, 5.0, 0.0, 2.0], [2.0, 5.0, 1.0, 4.0], [3.0, 5.0, 0.0, 6.0], [4.0, 5.0, 1.0, 8.0]])
    st = features.fit_selection(x, Preprocessing.from_dict({"varianceThreshold": 0.3, "dropColumns": ["d"]}), ["a", "b", "c", "d"])
    assert st.keep == [0] and st.dropped == {"dropColumns": ["d"], "varianceThreshold": ["b", "c"]}
    pca = features.fit_pca(features.FeatureState(None, {}), x[:, [0, 3]], Preprocessing.from_dict({"pca": {"components": 1}}))
    assert pca.explained == pytest.approx(1.0)  # column 3 is 2 * column 0: one component explains all
    direction = pca.pca_components[:, 0] / np.linalg.norm(pca.pca_components[:, 0])
    assert abs(direction @ np.array([1, 2]) / np.sqrt(5)) == pytest.approx(1.0)


@pytest.mark.parametrize(("pp", "shape", "field", "words"), [
    ({"pca": {"components": 2}}, [8, 8, 1], "spec.dataset.preprocessing.pca", "not on inputShape [8, 8, 1]"),
    ({"dropColumns": ["nope"]}, [4], "spec.dataset.preprocessing.dropColumns", "'nope', not a feature column"),
    ({"pca": {"components": 9}}, [4], "spec.dataset.preprocessing.pca.components", "exceeds"),
    ({"dropColumns": ["f0", "f1", "f2", "f3"]}, [4], "spec.dataset.preprocessing.dropColumns", "no feature column left"),
])
def test_nonsense_combinations_fail_with_the_field(tmp_path: Path, kiln_train, pp: dict, shape: list[int],
                                                    field: str, words: str) -> None:
    if len(shape) == 3:
        np.savez(tmp_path / "data.npz", x=np.zeros((20, *shape), dtype="float32"), y=np.arange(20) % 3)
        ds = {"uri": "data.npz"}
        model = {"inputShape": shape, "layers": [{"type": "Flatten"}, {"type": "Dense", "units": 3}]}
    else:
        x, y = blobs(n=60)
        write_csv(tmp_path / "data.csv", x, y)
        ds, model = {"uri": "data.csv"}, None
    doc = manifest(dataset={**ds, "preprocessing": pp})
    if model:
        doc["spec"]["model"] = model
    run = kiln_train(write_manifest(tmp_path, doc))
    assert run.code == 2 and run.termination["field"] == field, run.err
    assert words in run.termination["error"]
    assert run.left_model() == []


def test_schema_rejects_pca_with_both_or_neither() -> None:
    from kiln.schema import ManifestError, validate

    for pca in ({"components": 2, "varianceRatio": 0.9}, {}, {"varianceRatio": 1.5}):
        with pytest.raises(ManifestError):
            validate(manifest(dataset={"uri": "d.csv", "preprocessing": {"pca": pca}}), "TrainingJob")
    with pytest.raises(SpecError):
        features.fit_pca(features.FeatureState(None, {}), np.zeros((3, 2)),
                         Preprocessing.from_dict({"pca": {"components": 1, "varianceRatio": 0.5}}))


def test_calibration_rows_fill_the_kept_raw_columns() -> None:
    """int8 calibration feeds raw-width rows: the fill values of the selected columns land at their raw positions."""
    from kiln_trainer import formats, preprocess
    from kiln_trainer import model as model_lib

    x = np.array([[1.0, 7.0, 3.0], [3.0, 7.0, np.nan], [np.nan, 7.0, 5.0]])
    feats = features.fit_selection(x, Preprocessing.from_dict({"varianceThreshold": 0.0}), ["a", "b", "c"])
    state = preprocess.fit(features.select(feats, x), Preprocessing.from_dict({"missingValues": "mean"}))
    pre = [*features.layers(feats)[0], preprocess.layer(state, 2)]
    models = model_lib.build([3], [Layer.from_dict({"type": "Dense", "units": 2})], pre, [])
    rows = formats.calibration_rows(models.inference, x.astype("float32"))
    np.testing.assert_allclose(rows, [[1, 7, 3], [3, 7, 4], [2, 7, 5]])
