"""Edge formats: int8 ONNX, float and int8 TFLite next to model.onnx, each scored in its own runtime.

The digits example is trained once (few epochs, fixed seed, deterministic ops); every test reloads
the written files itself and recomputes on the held-out rows it reproduces from the seed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml
from kiln_trainer import data, export, formats, outputs
from kiln_trainer.trainer import split_indices
from support.trainer import EXAMPLES, Run, blobs, manifest, write_csv, write_manifest

from kiln.spec import TrainingJobSpec

pytestmark = pytest.mark.training

ALL = ["onnx", "onnx-int8", "tflite", "tflite-int8"]
EPOCHS = 6


def _digits_doc(**output: Any) -> dict[str, Any]:
    doc = yaml.safe_load((EXAMPLES / "digits" / "trainingjob.yaml").read_text())
    doc["spec"]["training"]["epochs"] = EPOCHS
    doc["spec"]["training"].pop("earlyStopping")
    doc["spec"]["output"] = {"uri": "out", "formats": ALL, **output}
    return doc


def _heldout(doc: dict[str, Any], folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The trainer's held-out rows: its own loader, then `split_indices` with the manifest's seed."""
    spec = doc["spec"]
    path = folder / spec["dataset"]["uri"]
    ds = data.load(path, str(path), TrainingJobSpec.from_dict(spec))
    _, va = split_indices(len(ds.x), float(spec["dataset"]["validationSplit"]), int(spec["training"]["seed"]))
    return ds.x[va], ds.y[va]


def _accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return float((np.asarray(pred).argmax(axis=1) == y.astype("int64")).mean())


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One training of the digits example with every format (tolerance 0.05: a passing run)."""
    from kiln_trainer import api

    folder = tmp_path_factory.mktemp("digits")
    shutil.copy(EXAMPLES / "digits" / "digits.csv", folder)
    doc = _digits_doc(formatTolerance=0.05)
    result = api.train_doc(doc, folder)
    x, y = _heldout(doc, folder)
    return {"folder": folder, "out": folder / "out", "doc": doc, "result": result, "x": x, "y": y,
            "formats": {f["format"]: f for f in result["formats"]}}


def test_every_format_is_written_scored_in_its_runtime_and_reported(digits: dict[str, Any]) -> None:
    import keras
    import kiln_trainer.preprocess  # noqa: F401  (registers the custom layer for load_model)

    out, x, y = digits["out"], digits["x"], digits["y"]
    entries = digits["formats"]
    assert [f["format"] for f in digits["result"]["formats"]] == ALL
    keras_acc = _accuracy(keras.models.load_model(out / "model.keras")(x.astype("float32")), y)
    for fmt, entry in entries.items():
        path = out / entry["file"]
        assert entry["file"] == formats.FILES[fmt]
        assert entry["uri"] == path.resolve().as_uri()  # same style as modelUri
        assert entry["sizeBytes"] == path.stat().st_size and entry["sha256"] == export.sha256(path)
        assert entry["metricName"] == "accuracy"
        # Recomputed here, in the runtime of the format, on the reproduced held-out rows.
        pred = export.onnx_predict(path, x) if fmt.startswith("onnx") else formats.tflite_predict(path, x)
        assert pred.shape == (len(x), 10)
        assert _accuracy(pred, y) == pytest.approx(entry["metric"], abs=1e-6), fmt
        assert entry["delta"] == pytest.approx(entry["metric"] - keras_acc, abs=1e-6), fmt
        assert entry["delta"] >= -0.05
    assert digits["result"]["modelUri"] == entries["onnx"]["uri"]
    assert entries["onnx"]["delta"] == pytest.approx(0.0, abs=1e-6)
    assert entries["onnx"]["metric"] > 0.9
    for fmt in ("onnx", "tflite"):
        assert entries[f"{fmt}-int8"]["sizeBytes"] < 0.6 * entries[fmt]["sizeBytes"], fmt

    written = json.loads((out / "result.json").read_text())
    assert written["formats"] == digits["result"]["formats"]
    summary = outputs.summary(digits["result"])
    assert len(summary.encode()) < 4096 and json.loads(summary)["formats"] == digits["result"]["formats"]


def test_int8_files_really_compute_in_int8_and_keep_the_preprocessing(digits: dict[str, Any]) -> None:
    import tensorflow as tf

    out, x = digits["out"], digits["x"]
    ops = {n.op_type for n in onnx.load(str(out / "model-int8.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops  # digits is a Dense model: dynamic
    assert {"Sub", "Mul"} <= ops  # the normalization, still float, inside the file

    interp = tf.lite.Interpreter(model_path=str(out / "model-int8.tflite"))
    interp.allocate_tensors()
    assert interp.get_input_details()[0]["dtype"] == np.float32
    fc_weights = [t for t in interp.get_tensor_details() if len(t["shape"]) == 2 and t["dtype"] == np.int8]
    assert len(fc_weights) >= 2  # both Dense kernels are int8
    # Raw pixels in: the float TFLite file agrees with model.onnx to float rounding.
    assert export.max_abs_diff(formats.tflite_predict(out / "model.tflite", x),
                               export.onnx_predict(out / "model.onnx", x)) < 1e-4


def test_static_quantization_imputes_nan_in_float_before_quantizing(tmp_path: Path, kiln_train) -> None:
    x, y = blobs(n=400, features=6, seed=4)
    x[::5, 1] = np.nan
    x[::7, 4] = np.nan
    write_csv(tmp_path / "data.csv", x, y)
    doc = manifest(dataset={"uri": "data.csv", "preprocessing": {"missingValues": "mean",
                                                                "normalization": "standard"}},
                   model={"inputShape": [6], "layers": [{"type": "Dense", "units": 16, "activation": "relu"},
                                                        {"type": "Dense", "units": 3, "activation": "softmax"}]},
                   training={"epochs": 3, "seed": 2},
                   output={"formats": ["onnx", "onnx-int8", "tflite-int8"], "quantization": "static",
                           "formatTolerance": -1})
    run: Run = kiln_train(write_manifest(tmp_path, doc))
    assert run.code == 0, run.err
    ops = {n.op_type for n in onnx.load(str(run.output / "model-int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "IsNaN"} <= ops and "DynamicQuantizeLinear" not in ops

    import keras

    fill = np.asarray(keras.models.load_model(run.output / "model.keras").get_layer("kiln_preprocess").fill)
    rows = x[np.isnan(x).any(axis=1)][:64].astype("float32")
    filled = np.where(np.isnan(rows), fill.astype("float32"), rows)
    assert len(rows) >= 40
    # NaN has no int8 value: had the input been quantized, NaN would land on the range's edge, not the fill.
    for fmt in ("onnx-int8", "tflite-int8"):
        path = run.output / formats.FILES[fmt]
        nan_pred, filled_pred = formats.predict(fmt, path, rows), formats.predict(fmt, path, filled)
        assert not np.isnan(nan_pred).any()
        np.testing.assert_allclose(nan_pred, filled_pred, atol=1e-6, err_msg=fmt)


def test_quantization_mode_follows_the_spec_else_conv_layers() -> None:
    dense = {"model": {"inputShape": [4], "layers": [{"type": "Dense", "units": 3}]}}
    conv = {"model": {"inputShape": [8, 8, 1], "layers": [{"type": "Conv2D", "filters": 4, "kernelSize": 3}, {"type": "Flatten"}]}}

    def mode(spec: dict[str, Any]) -> str:
        return formats.quantization_mode(TrainingJobSpec.from_dict(spec))

    assert mode(dense) == "dynamic"
    assert mode(conv) == "static"
    assert mode({**conv, "output": {"quantization": "dynamic"}}) == "dynamic"
    assert mode({**dense, "output": {"quantization": "static"}}) == "static"


def test_a_format_losing_more_than_the_tolerance_fails_and_leaves_no_model(digits: dict[str, Any],
                                                                            tmp_path: Path, kiln_train) -> None:
    # The same seeded, deterministic training as the fixture: the int8 files lose exactly what they
    # lost there. A tolerance of half the largest loss must fail on that format.
    worst = min((f for f in digits["formats"].values() if f["format"].endswith("-int8")), key=lambda f: f["delta"])
    assert worst["delta"] < 0, "expected an int8 format to lose some held-out accuracy on digits"
    tolerance = round(-worst["delta"] / 2, 5)
    shutil.copy(EXAMPLES / "digits" / "digits.csv", tmp_path)
    shutil.copytree(digits["out"], tmp_path / "out")  # an earlier successful run in the same folder
    run = kiln_train(write_manifest(tmp_path, _digits_doc(formatTolerance=tolerance)), output=tmp_path / "out")
    assert run.code == 2, run.err
    line = f"{worst['format']} held-out accuracy {worst['metric']:.4g} is {-worst['delta']:.4g} below the float model"
    errors = [ln for ln in run.err.splitlines() if ln.startswith("kiln train: error:")]
    assert len(errors) == 1 and line in errors[0] and f"tolerance {tolerance:g}" in errors[0], run.err
    assert run.termination["field"] == "spec.output.formatTolerance" and line in run.termination["error"]
    assert run.left_model() == []
    left = {p.name for p in (tmp_path / "out").iterdir()}
    assert not left & {*formats.FILES.values(), "model.keras", "result.json", ".kiln-staging"}, left

    # A negative tolerance turns the check off: the same run succeeds.
    ok = kiln_train(write_manifest(tmp_path, _digits_doc(formatTolerance=-1)), output=tmp_path / "out")
    assert ok.code == 0, ok.err
    assert {f["format"]: f["delta"] for f in ok.result()["formats"]} == {
        f: e["delta"] for f, e in digits["formats"].items()}


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _ready(url: str, proc: subprocess.Popen[bytes], log: Path, deadline_s: float = 60.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"kiln serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)  # polling interval, bounded by the deadline
    raise AssertionError(f"kiln serve not ready within {deadline_s}s:\n{log.read_text()}")


def test_kiln_serve_serves_the_int8_model_like_ort_in_process(digits: dict[str, Any], tmp_path: Path) -> None:
    import socket

    model = digits["out"] / "model-int8.onnx"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    kiln = Path(sys.executable).parent / "kiln"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(kiln), "serve", "--model", str(model), "--name", "digits", "--host", "127.0.0.1",
                                 "--port", str(port), "--intra-op-threads", "1"], stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _ready(url, proc, log)
        x = digits["x"][:64].astype("float32")
        body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                            "data": x.reshape(-1).tolist()}]}
        out = _post(f"{url}/v2/models/digits/infer", body)["outputs"][0]
        served = np.asarray(out["data"], dtype="float32").reshape(out["shape"])
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    local = export.onnx_predict(model, x)
    assert served.shape == local.shape == (64, 10)
    np.testing.assert_allclose(served, local, atol=1e-5)
    assert (served.argmax(axis=1) == local.argmax(axis=1)).all()
