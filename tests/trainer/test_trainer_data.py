"""The data pipeline: formats, cleaning (duplicates, missing labels, missing features) and its errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from kiln_trainer import data
from kiln_trainer.errors import DataError, SpecError
from support.trainer import manifest, write_csv

from kiln.spec import TrainingJobSpec

pytestmark = pytest.mark.unit  # loading and cleaning only: no TensorFlow training, no processes


def spec(**dataset: object) -> dict:
    doc = manifest()["spec"]
    doc["dataset"] = {"uri": "data.csv", "labelColumn": "label", **dataset}
    doc["model"]["inputShape"] = [2]
    return doc


def dirty_csv(path: Path) -> Path:
    path.write_text("a,b,label\n1,2,0\n1,2,0\n3,,1\n5,6,\n7,8,1\n9,10,0\n")
    return path


def test_report_counts_each_reason(tmp_path: Path) -> None:
    ds = data.load(dirty_csv(tmp_path / "d.csv"), "d.csv", TrainingJobSpec.from_dict(spec(preprocessing={"missingValues": "drop"})))
    r = ds.report
    assert (r.rows_read, r.rows_kept) == (6, 3)
    assert r.dropped == {"missing label": 1, "duplicates": 1, "missing features": 1}
    assert "dropped 3 (missing label: 1, duplicates: 1, missing features: 1); kept 3" in r.line()
    assert ds.x.tolist() == [[1, 2], [7, 8], [9, 10]]


def test_duplicates_kept_when_asked(tmp_path: Path) -> None:
    ds = data.load(dirty_csv(tmp_path / "d.csv"), "d.csv",
                   TrainingJobSpec.from_dict(spec(preprocessing={"dropDuplicates": False, "missingValues": "drop"})))
    assert ds.report.rows_kept == 4 and "duplicates" not in ds.report.dropped


@pytest.mark.parametrize("mode", ["mean", "median", "zero"])
def test_imputation_keeps_rows_with_nan(tmp_path: Path, mode: str) -> None:
    ds = data.load(dirty_csv(tmp_path / "d.csv"), "d.csv", TrainingJobSpec.from_dict(spec(preprocessing={"missingValues": mode})))
    assert ds.report.rows_kept == 4 and ds.report.rows_imputed == 1
    assert np.isnan(ds.x).sum() == 1  # the model fills it in, not the loader


def test_string_labels_become_class_indices(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,b,label\n1,2,cat\n3,4,dog\n5,6,cat\n")
    ds = data.load(tmp_path / "d.csv", "d.csv", TrainingJobSpec.from_dict(spec()))
    assert ds.classes == ["cat", "dog"] and ds.y.tolist() == [0, 1, 0]


def test_feature_columns_select_and_order(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,b,c,label\n1,2,3,0\n4,5,6,1\n")
    ds = data.load(tmp_path / "d.csv", "d.csv", TrainingJobSpec.from_dict(spec(featureColumns=["c", "a"])))
    assert ds.x.tolist() == [[3, 1], [6, 4]]


def test_npz_images_and_parquet(tmp_path: Path) -> None:
    x = np.arange(5 * 4 * 4 * 1, dtype="float32").reshape(5, 4, 4, 1)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(5))
    s = spec()
    s["model"]["inputShape"] = [4, 4, 1]
    ds = data.load(tmp_path / "d.npz", "d.npz", TrainingJobSpec.from_dict(s))
    assert ds.x.shape == (5, 4, 4, 1) and ds.y.tolist() == [0, 1, 2, 3, 4]
    import pandas as pd

    pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0], "label": [0, 1]}).to_parquet(tmp_path / "d.parquet")
    ds = data.load(tmp_path / "d.parquet", "d.parquet", TrainingJobSpec.from_dict(spec()))
    assert ds.x.tolist() == [[1, 3], [2, 4]]


def test_errors_name_the_field(tmp_path: Path) -> None:
    write_csv(tmp_path / "d.csv", np.ones((3, 2)), [0, 1, 0], names=["a", "b"])
    with pytest.raises(DataError) as e:
        data.load(tmp_path / "d.csv", "d.csv", TrainingJobSpec.from_dict(spec(labelColumn="target")))
    assert e.value.field == "spec.dataset.labelColumn"
    assert "column 'target' not in d.csv (columns: a, b, label)" in e.value.message

    (tmp_path / "s.csv").write_text("a,b,label\n1,red,0\n2,blue,1\n")
    with pytest.raises(DataError) as e:
        data.load(tmp_path / "s.csv", "s.csv", TrainingJobSpec.from_dict(spec()))
    assert e.value.field == "spec.dataset.featureColumns" and "'b'" in e.value.message

    s = spec()
    s["model"]["inputShape"] = [3]
    with pytest.raises(SpecError) as e:
        data.load(tmp_path / "d.csv", "d.csv", TrainingJobSpec.from_dict(s))
    assert e.value.field == "spec.model.inputShape" and "2 feature columns" in e.value.message

    (tmp_path / "d.bin").write_bytes(b"x")
    with pytest.raises(SpecError) as e:
        data.load(tmp_path / "d.bin", "d.bin", TrainingJobSpec.from_dict(spec()))
    assert e.value.field == "spec.dataset.format"

    (tmp_path / "empty.csv").write_text("a,b,label\n1,2,\n")
    with pytest.raises(DataError) as e:
        data.load(tmp_path / "empty.csv", "empty.csv", TrainingJobSpec.from_dict(spec()))
    assert e.value.field == "spec.dataset.labelColumn" and "no rows left" in e.value.message


def test_duplicates_are_byte_equal_rows_nan_included() -> None:
    """NaN rows with the same bits are duplicates; 0.0 and -0.0 (other bytes) are not; the label counts too."""
    x = np.array([[1, 2], [1, 2], [np.nan, 3], [np.nan, 3], [0.0, 1], [-0.0, 1], [1, 2]], dtype="float32")
    y = np.array([0, 0, 1, 1, 0, 0, 1])
    assert data._duplicates(x, y).tolist() == [False, True, False, True, False, False, False]
    labels = np.array(["a", "a", "b", "c", "a", "a", "b"], dtype=object)
    assert data._duplicates(x.astype("float64"), labels).tolist() == [False, True, False, False, False, False, False]


def test_duplicates_in_wide_rows() -> None:
    x = np.random.default_rng(1).normal(size=(2000, 1000)).astype("float32")
    x[5] = x[7]
    x[100] = x[7]
    x[9] = x[8]
    x[9, 999] = np.nextafter(x[8, 999], np.float32(-np.inf))  # one ulp apart in the last column: not equal
    assert np.flatnonzero(data._duplicates(x, np.zeros(len(x)))).tolist() == [7, 100]
