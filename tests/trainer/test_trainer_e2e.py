"""`kiln train` end to end on tiny data: outputs, ONNX parity, in-graph preprocessing, augmentation,
repeatability, class weights, early stopping and the Python progress callback."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from kiln_trainer import export
from kiln_trainer.outputs import RESULT_KEYS
from support.trainer import EXAMPLES, ROOT, Run, blobs, manifest, write_csv, write_manifest

pytestmark = pytest.mark.training


def test_digits_example_reaches_95_percent_through_onnx(tmp_path: Path, kiln_train) -> None:
    shutil.copy(EXAMPLES / "digits" / "digits.csv", tmp_path)
    shutil.copy(EXAMPLES / "digits" / "trainingjob.yaml", tmp_path)
    run: Run = kiln_train(tmp_path / "trainingjob.yaml")
    assert run.code == 0, run.err
    out = run.output
    for name in ("model.onnx", "model.keras", "metrics.json", "history.json", "training-curves.png",
                 "result.json", "data-report.json"):
        assert (out / name).is_file(), name
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for split, tag in (("train", "epoch_loss"), ("validation", "epoch_accuracy")):
        events = EventAccumulator(str(out / "logs" / split), size_guidance={"tensors": 0})
        events.Reload()
        assert len(events.Tensors(tag)) == run.result()["epochsRun"]
    assert not (out / "checkpoints").exists() and not (out / ".kiln-staging").exists()
    phases = ["setup", "data", "prepare", "fit", "onnx", "parity", "formats", "save", "plot", "commit"]
    timing_lines = {ln.split(":")[0]: ln for ln in run.out.splitlines() if ln.startswith(("timings:", "cpu timings:"))}
    assert [kv.split("=")[0] for kv in timing_lines["timings"].split()[1:]] == phases
    assert [kv.split("=")[0] for kv in timing_lines["cpu timings"].split()[2:]] == ["startup", *phases]
    import zipfile

    saved = json.loads(zipfile.ZipFile(out / "model.keras").read("config.json"))
    assert saved["compile_config"]["steps_per_execution"] == 64

    # Held-out accuracy measured independently, through the exported ONNX model on raw pixels.
    import pandas as pd
    from kiln_trainer.trainer import split_indices

    df = pd.read_csv(tmp_path / "digits.csv")
    x, y = df.drop(columns="label").to_numpy("float32"), df["label"].to_numpy()
    _, held = split_indices(len(x), 0.2, seed=1)
    pred = export.onnx_predict(out / "model.onnx", x[held]).argmax(axis=1)
    accuracy = float((pred == y[held]).mean())
    assert accuracy >= 0.95, accuracy

    result = run.result()
    assert result["parityMaxAbsDiff"] <= 1e-5
    assert result["metrics"]["heldout_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert result["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert result["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]
    assert result["modelUri"] == (out / "model.onnx").resolve().as_uri()
    assert result["onnxSha256"] == export.sha256(out / "model.onnx")
    graph = onnx.load(str(out / "model.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert "unk__" not in str(graph.input) + str(graph.output)
    assert onnx.load(str(out / "model.onnx")).opset_import[0].version == 17

    # The termination message: exactly the status.result keys, under 4 KB.
    assert set(run.termination) == set(RESULT_KEYS) - {"topFeatures"}  # topFeatures only with output.explain
    assert len(json.dumps(run.termination)) < 4096
    history = json.loads((out / "history.json").read_text())
    assert len(history["loss"]) == result["epochsRun"] and "val_accuracy" in history
    epoch_lines = [ln for ln in run.out.splitlines() if ln.startswith("epoch ")]
    assert len(epoch_lines) == result["epochsRun"]
    assert epoch_lines[0].startswith("epoch 1/25 loss=") and "val_loss=" in epoch_lines[0]
    assert "\r" not in run.out


def test_mlp_example_parity(tmp_path: Path, kiln_train) -> None:
    sys.path.insert(0, str(EXAMPLES / "mlp"))
    from make_data import make

    x, y = make(rows=600)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    text = (EXAMPLES / "mlp" / "trainingjob.yaml").read_text().replace("epochs: 10", "epochs: 2")
    (tmp_path / "tj.yaml").write_text(text)
    run = kiln_train(tmp_path / "tj.yaml")
    assert run.code == 0, run.err
    result = run.result()
    assert result["parityMaxAbsDiff"] <= 1e-5
    assert result["inputs"][0]["shape"] == [-1, 1000] and result["outputs"][0]["shape"] == [-1, 10]


def test_imputation_and_normalization_are_in_the_exported_graph(tmp_path: Path, kiln_train) -> None:
    x, y = blobs(n=300)
    x = x * [1.0, 100.0, 0.01, 5.0] + [0.0, 500.0, -3.0, 7.0]  # wildly different scales
    rng = np.random.default_rng(5)
    x[rng.random(x.shape) < 0.1] = np.nan
    write_csv(tmp_path / "data.csv", x, y)
    doc = manifest(dataset={"uri": "data.csv", "validationSplit": 0.25,
                            "preprocessing": {"missingValues": "median", "normalization": "standard"}})
    run = kiln_train(write_manifest(tmp_path, doc))
    assert run.code == 0, run.err

    import keras
    from kiln_trainer.trainer import split_indices

    # Statistics fitted on the training split only, recomputed here independently.
    train_idx, held_idx = split_indices(len(x), 0.25, seed=1)
    xt = x[train_idx]
    fill = np.nanmedian(xt, axis=0)
    filled = np.where(np.isnan(xt), fill, xt)
    mean, std = filled.mean(axis=0), filled.std(axis=0)
    all_rows_fill = np.nanmedian(x, axis=0)
    assert not np.allclose(fill, all_rows_fill)  # the check below can tell the two apart

    saved = keras.saving.load_model(run.output / "model.keras")
    pre = saved.get_layer("kiln_preprocess")
    np.testing.assert_allclose(np.asarray(pre.fill), fill, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(pre.offset), mean, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(pre.scale), 1 / std, rtol=1e-5)

    # ONNX on raw rows with NaN == the trained layers on rows we impute and standardize ourselves.
    raw = x[held_idx].astype("float32")
    assert np.isnan(raw).any()
    z = ((np.where(np.isnan(raw), fill, raw) - mean) / std).astype("float32")
    h = z
    for layer in saved.layers[2:]:
        h = layer(h)
    onnx_out = export.onnx_predict(run.output / "model.onnx", raw)
    np.testing.assert_allclose(onnx_out, np.asarray(h), atol=1e-5)
    assert not np.isnan(onnx_out).any()


def test_augmentation_is_absent_from_the_exported_graph(tmp_path: Path, kiln_train) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    np.savez(tmp_path / "digits.npz", x=d.images[:400, :, :, None], y=d.target[:400])
    doc = manifest(dataset={"uri": "digits.npz", "preprocessing": {
        "normalization": "minmax",
        "augmentation": {"horizontalFlip": True, "rotation": 0.1, "zoom": 0.1, "translation": 0.1}}},
        model={"inputShape": [8, 8, 1], "layers": [
            {"type": "Conv2D", "filters": 4, "kernelSize": 3, "activation": "relu"},
            {"type": "Flatten"}, {"type": "Dense", "units": 10, "activation": "softmax"}]})
    run = kiln_train(write_manifest(tmp_path, doc))
    assert run.code == 0, run.err
    ops = {n.op_type for n in onnx.load(str(run.output / "model.onnx")).graph.node}
    assert not {op for op in ops if "Random" in op or "Transform" in op or op in ("Resize", "GridSample")}, ops
    rows = d.images[400:450, :, :, None].astype("float32")
    first = export.onnx_predict(run.output / "model.onnx", rows)
    np.testing.assert_array_equal(first, export.onnx_predict(run.output / "model.onnx", rows))
    assert run.result()["parityMaxAbsDiff"] <= 1e-5


def _history(tmp_path: Path, kiln_train, name: str) -> dict:
    folder = tmp_path / name
    folder.mkdir()
    x, y = blobs()
    write_csv(folder / "data.csv", x, y)
    doc = manifest(training={"epochs": 3, "batchSize": 16, "seed": 42,
                             "optimizer": {"name": "sgd", "learningRate": 0.05}})
    doc["spec"]["model"]["layers"].insert(1, {"type": "Dropout", "rate": 0.3})
    run = kiln_train(write_manifest(folder, doc))
    assert run.code == 0, run.err
    return json.loads((run.output / "history.json").read_text())


def test_same_seed_same_metrics(tmp_path: Path, kiln_train) -> None:
    first = _history(tmp_path, kiln_train, "a")
    second = _history(tmp_path, kiln_train, "b")
    assert first == second
    assert len(first["loss"]) == 3


def test_many_steps_per_execution_train_exactly_like_one(tmp_path: Path, kiln_train,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """64 batches per TensorFlow call (12 per epoch here: the call ends with the data) give the very
    same per-epoch metrics, Dropout included, as one batch per call."""
    from kiln_trainer import trainer

    assert trainer.STEPS_PER_EXECUTION == 64
    many = _history(tmp_path, kiln_train, "many")
    monkeypatch.setattr(trainer, "STEPS_PER_EXECUTION", 1)
    one = _history(tmp_path, kiln_train, "one")
    assert many == one


def test_class_weight_and_early_stopping(tmp_path: Path, kiln_train) -> None:
    from kiln_trainer.balance import class_weights

    weights = class_weights(np.array([0, 0, 0, 1]))
    assert weights == {0: pytest.approx(4 / 6), 1: pytest.approx(2.0)}

    x, y = blobs(n=200)
    keep = (y != 2) | (np.arange(len(y)) % 5 == 0)  # class 2 is rare
    write_csv(tmp_path / "data.csv", x[keep], y[keep])
    doc = manifest(training={"epochs": 8, "seed": 3, "classWeight": "balanced",
                             "earlyStopping": {"monitor": "loss", "patience": 1, "minDelta": 100}})
    run = kiln_train(write_manifest(tmp_path, doc))
    assert run.code == 0, run.err
    assert run.result()["epochsRun"] == 2  # no epoch improves loss by 100: stop after patience 1


def test_python_progress_callback(tmp_path: Path) -> None:
    from kiln_trainer.api import train_file

    x, y = blobs()
    write_csv(tmp_path / "data.csv", x, y)
    seen = []
    result = train_file(write_manifest(tmp_path, manifest(training={"epochs": 3, "seed": 0})),
                        output=str(tmp_path / "out"), progress=seen.append)
    epochs = [(p.epoch, p.epochs, p.percent) for p in seen]
    assert epochs[:3] == [(1, 3, 33), (2, 3, 66), (3, 3, 100)]
    assert "loss" in seen[0].metrics and "val_accuracy" in seen[0].metrics
    assert result["modelUri"].endswith("/out/model.onnx")


def test_derived_formats_are_measured(tmp_path: Path, kiln_train) -> None:
    x, y = blobs()
    write_csv(tmp_path / "data.csv", x, y)
    doc = manifest(output={"formats": ["onnx", "onnx-int8", "tflite"], "formatTolerance": 0.5})
    run = kiln_train(write_manifest(tmp_path, doc))
    assert run.code == 0, run.err
    formats = {f["format"]: f for f in run.result()["formats"]}
    assert set(formats) == {"onnx", "onnx-int8", "tflite"}
    for f in formats.values():
        assert (run.output / f["file"]).stat().st_size == f["sizeBytes"] and f["metricName"] == "accuracy"
        assert 0 <= f["metric"] <= 1


def test_relative_and_file_uris_resolve_against_the_manifest(tmp_path: Path, kiln_train,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    x, y = blobs()
    write_csv(tmp_path / "sub" / "data.csv", x, y)
    monkeypatch.chdir(ROOT)
    run = kiln_train(write_manifest(tmp_path, manifest(dataset={"uri": "file://sub/data.csv"})))
    assert run.code == 0, run.err
    assert "from file://sub/data.csv" in run.out


def test_in_cluster_mode_reads_the_mounted_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The operator's contract: `kiln train --in-cluster`, KILN_SPEC, KILN_OUTPUT_DIR, pvc:// under KILN_PVC_ROOT,
    a HOME that is not writable (read-only root filesystem)."""
    from kiln_trainer.__main__ import main

    pvc_root = tmp_path / "pvc"
    (pvc_root / "datasets" / "blobs").mkdir(parents=True)
    x, y = blobs()
    write_csv(pvc_root / "datasets" / "blobs" / "data.csv", x, y)
    out_dir = pvc_root / "models" / "run-1"
    doc = manifest(name="blobs", dataset={"uri": "pvc://datasets/blobs/data.csv"},
                   output={"uri": "pvc://models/run-1"})
    doc["metadata"].update(namespace="team-a", uid="1234", generation=1)
    spec_dir = tmp_path / "etc-kiln"
    spec_dir.mkdir()
    spec_file = write_manifest(spec_dir, doc, "trainingjob.yaml")
    term = tmp_path / "termination-log"
    for k, v in {"KILN_SPEC": str(spec_file), "KILN_OUTPUT_DIR": str(out_dir), "KILN_PVC_ROOT": str(pvc_root),
                 "KILN_OUTPUT_URI": "pvc://models/run-1", "KILN_TERMINATION_LOG": str(term),
                 "HOME": "/proc/kiln-not-writable"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(spec_dir)
    assert main(["--in-cluster"]) == 0, capsys.readouterr().err
    message = json.loads(term.read_text())
    assert message["modelUri"] == "pvc://models/run-1/model.onnx"
    assert (out_dir / "model.onnx").is_file() and (out_dir / "result.json").is_file()
    assert not (spec_dir / "kiln-output").exists()
    assert "from pvc://datasets/blobs/data.csv" in capsys.readouterr().out
