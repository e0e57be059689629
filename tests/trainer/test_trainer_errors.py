"""Every failure: non-zero exit, a one-line error naming the field, the termination message, no model left."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from support.trainer import blobs, manifest, write_csv, write_manifest

pytestmark = pytest.mark.training


def _csv(tmp: Path) -> None:
    x, y = blobs(n=60)
    write_csv(tmp / "data.csv", x, y)


def missing_dataset(tmp: Path) -> dict:
    return manifest(dataset={"uri": "nope.csv"})


def unreadable_dataset(tmp: Path) -> dict:
    (tmp / "data.parquet").write_bytes(b"not parquet at all")
    return manifest(dataset={"uri": "data.parquet"})


def unknown_format(tmp: Path) -> dict:
    (tmp / "data.bin").write_bytes(b"1,2,3")
    return manifest(dataset={"uri": "data.bin"})


def absent_label(tmp: Path) -> dict:
    (tmp / "data.csv").write_text("a,b,c,d\n1,2,3,4\n")
    return manifest(dataset={"uri": "data.csv", "labelColumn": "target"})


def all_rows_dropped(tmp: Path) -> dict:
    (tmp / "data.csv").write_text("a,b,c,d,label\n1,,3,4,0\n,2,3,4,1\n")
    return manifest(dataset={"uri": "data.csv", "preprocessing": {"missingValues": "drop"}})


def unknown_layer(tmp: Path) -> dict:
    _csv(tmp)
    return manifest(model={"inputShape": [4], "layers": [{"type": "LSTM", "units": 3}]})


def unknown_optimizer(tmp: Path) -> dict:
    _csv(tmp)
    return manifest(training={"optimizer": {"name": "lbfgs"}})


def field_not_taken(tmp: Path) -> dict:
    _csv(tmp)
    return manifest(model={"inputShape": [4], "layers": [{"type": "Dense", "units": 3},
                                                         {"type": "Dropout", "rate": 0.5, "units": 3}]})


def shape_mismatch(tmp: Path) -> dict:
    _csv(tmp)
    return manifest(model={"inputShape": [5], "layers": [{"type": "Dense", "units": 3}]})


def non_numeric(tmp: Path) -> dict:
    (tmp / "data.csv").write_text("a,colour,c,d,label\n1,red,3,4,0\n2,blue,3,4,1\n")
    return manifest()


def too_few_units(tmp: Path) -> dict:
    _csv(tmp)
    return manifest(model={"inputShape": [4], "layers": [{"type": "Dense", "units": 2, "activation": "softmax"}]})


CASES: list[tuple[Callable[[Path], dict], str, str]] = [
    (missing_dataset, "spec.dataset.uri", "nope.csv: not found"),
    (unreadable_dataset, "spec.dataset.uri", "cannot read data.parquet as parquet"),
    (unknown_format, "spec.dataset.format", "cannot infer the format of 'data.bin'"),
    (absent_label, "spec.dataset.labelColumn", "column 'target' not in data.csv (columns: a, b, c, d)"),
    (all_rows_dropped, "spec.dataset.preprocessing.missingValues", "no rows left"),
    (unknown_layer, "spec.model.layers[0].type", "LSTM"),
    (unknown_optimizer, "spec.training.optimizer.name", "lbfgs"),
    (field_not_taken, "spec.model.layers[1].units", "Dropout does not take 'units'"),
    (shape_mismatch, "spec.model.inputShape", "needs 5 values per example but data.csv has 4 feature columns"),
    (non_numeric, "spec.dataset.featureColumns", "feature column 'colour' in data.csv is not numeric"),
    (too_few_units, "spec.model.layers[0].units", "labels go up to 2 but the last layer has 2 units"),
]


@pytest.mark.parametrize(("make", "field", "text"), CASES, ids=[c[0].__name__ for c in CASES])
def test_spec_and_data_errors(tmp_path: Path, kiln_train, make, field: str, text: str) -> None:
    run = kiln_train(write_manifest(tmp_path, make(tmp_path)))
    assert run.code == 2
    lines = [ln for ln in run.err.splitlines() if ln.startswith("kiln train: error:")]
    assert len(lines) == 1 and f"error: {field}: " in lines[0] and text in lines[0], run.err
    assert run.termination["field"] == field
    assert text in run.termination["error"] and "\n" not in run.termination["error"]
    assert set(run.termination) == {"error", "field"}
    assert run.left_model() == []
    assert not (run.output / ".kiln-staging").exists()


def test_failure_after_export_leaves_no_model_even_from_an_earlier_run(tmp_path: Path, kiln_train) -> None:
    x, _ = blobs(n=200)
    y_reg = x @ np.array([0.5, -1.0, 2.0, 0.1])
    write_csv(tmp_path / "data.csv", x, y_reg)
    base = {"model": {"inputShape": [4], "layers": [{"type": "Dense", "units": 8, "activation": "relu"},
                                                    {"type": "Dense", "units": 1}]},
            "training": {"epochs": 2, "seed": 1, "loss": "mse", "metrics": ["mse"]}}
    ok = kiln_train(write_manifest(tmp_path, manifest(**base)))
    assert ok.code == 0 and ok.left_model() == ["model.onnx", "result.json"]

    # int8 weights always change the mse a little; a tolerance of 0 fails after model.onnx was staged.
    bad = manifest(**base, output={"formats": ["onnx", "onnx-int8"], "formatTolerance": 0})
    run = kiln_train(write_manifest(tmp_path, bad))
    assert run.code == 2 and run.termination["field"] == "spec.output.formatTolerance"
    assert run.left_model() == [] and not (run.output / "model-int8.onnx").exists()
    assert not (run.output / ".kiln-staging").exists()


def test_unexpected_failure_exits_1(tmp_path: Path, kiln_train) -> None:
    _csv(tmp_path)
    (tmp_path / "occupied").write_text("a file where the output folder should go")
    run = kiln_train(write_manifest(tmp_path, manifest()), output=tmp_path / "occupied")
    assert run.code == 1
    assert run.termination["field"] is None and run.termination["error"]


def test_missing_manifest_and_schema_errors(tmp_path: Path, kiln_train) -> None:
    run = kiln_train(tmp_path / "absent.yaml")
    assert run.code == 2 and "not found" in run.termination["error"]
    doc = manifest()
    doc["spec"]["training"]["epochs"] = 0
    run = kiln_train(write_manifest(tmp_path, doc))
    assert run.code == 2 and run.termination["field"] == "spec.training.epochs"
