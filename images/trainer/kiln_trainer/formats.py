"""Edge formats next to model.onnx: int8 ONNX, float and int8 TFLite, each with the accuracy it costs.

Why measure each file in its own runtime: quantization and conversion change numbers in ways the
Keras model cannot show. Every exported file is loaded in the runtime that will serve it (ONNX
Runtime, the TFLite interpreter) and scored on the held-out rows; `delta` is that score minus the
float Keras model's on the same rows, and a drop beyond `spec.output.formatTolerance` fails the run.

Why the preprocessing stays float: imputation replaces NaN, and NaN has no int8 value. The fitted
`kiln_preprocess` ops are kept out of quantization in both int8 formats, so they read raw rows
exactly like model.onnx; calibration rows are training rows with NaN already replaced by the fill
values (the same values the float ops would use), so NaN never reaches a calibrator.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from kiln.spec import TrainingJobSpec
from kiln_trainer import export
from kiln_trainer.errors import SpecError, TrainerError
from kiln_trainer.model import INPUT_NAME
from kiln_trainer.storage import sha256

FILES = {"onnx": "model.onnx", "onnx-int8": "model-int8.onnx", "tflite": "model.tflite",
         "tflite-int8": "model-int8.tflite", "keras-h5": "model.h5"}
CALIBRATION_ROWS = 256
PREPROCESS = "kiln_preprocess"
# TFLite ops that only the imputation produces (`isnan` becomes x != x, `where` SELECT_V2): kept float.
_TFLITE_FLOAT_OPS = ["NOT_EQUAL", "SELECT_V2"]


@dataclass
class FormatResult:
    """One exported file, as reported in `status.result.formats`."""

    format: str
    file: str
    size: int
    sha: str
    metric: float | None
    metric_name: str | None
    delta: float | None

    def to_json(self, uri: str) -> dict[str, Any]:
        d: dict[str, Any] = {"format": self.format, "file": self.file, "uri": uri, "sizeBytes": self.size,
                             "sha256": self.sha}
        if self.metric is not None:
            d.update(metric=self.metric, metricName=self.metric_name, delta=self.delta)
        return d


def quantization_mode(spec: TrainingJobSpec) -> str:
    """`dynamic` or `static` for onnx-int8: the spec's choice, else static for Conv models.

    Dynamic quantization (int8 weights, activations quantized per batch at run time) needs no
    calibration and suits MatMul models; ONNX Runtime's dynamic Conv path is slow and less
    accurate, so Conv models get static quantization calibrated on training rows.
    """
    mode = spec.output.quantization
    if mode in ("dynamic", "static"):
        return mode
    convs = any(layer.type == "Conv2D" for layer in (spec.model.layers if spec.model else []))
    return "static" if convs else "dynamic"


def calibration_rows(model: keras.Model, x_train: np.ndarray, n: int = CALIBRATION_ROWS) -> np.ndarray:
    """Up to `n` training rows (already shuffled by the split) with NaN replaced by the fitted fill."""
    rows = np.array(x_train[:n], dtype="float32")
    fill = _fill(model)
    if fill is not None:
        rows = np.where(np.isnan(rows), fill.astype("float32"), rows)
    return rows


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Converters log advice (ORT to the root logger, TFLite via absl and warnings) that is not ours to act on."""
    loggers = [logging.getLogger(), logging.getLogger("absl")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _fill(model: keras.Model) -> np.ndarray | None:
    try:
        pre = model.get_layer(PREPROCESS)
    except ValueError:
        return None
    if not getattr(pre, "impute", False):
        return None
    fill = np.asarray(pre.fill)
    try:  # columns selected in front of the imputation: the fill values sit at the kept raw columns
        keep = model.get_layer("kiln_select").keep
    except ValueError:
        return fill
    raw = np.zeros(int(model.input_shape[-1]), dtype=fill.dtype)
    raw[keep] = fill
    return raw


def _preprocess_nodes(path: Path) -> list[str]:
    import onnx

    graph = onnx.load(str(path)).graph
    return [n.name for n in graph.node if PREPROCESS in n.name]


class _Calibration:
    """ONNX Runtime's CalibrationDataReader protocol: one batch of calibration rows per call."""

    def __init__(self, rows: np.ndarray, batch: int = 32) -> None:
        self._batches = iter([rows[i : i + batch] for i in range(0, len(rows), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def onnx_int8(src: Path, dst: Path, mode: str, rows: np.ndarray) -> None:
    """Quantize model.onnx with ONNX Runtime's tooling; the preprocessing nodes stay float."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    exclude = _preprocess_nodes(src)
    if mode == "dynamic":
        with _quiet():
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, nodes_to_exclude=exclude)
        return
    with _quiet():
        quantize_static(str(src), str(dst), _Calibration(rows), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                        calibrate_method=CalibrationMethod.MinMax)


def tflite(model: keras.Model, input_shape: list[int], path: Path, rows: np.ndarray | None) -> None:
    """TFLite with the preprocessing inside; with `rows`, int8 weights and activations (float I/O)."""
    import tensorflow as tf

    fn = tf.function(lambda x: model(x, training=False),
                     input_signature=(tf.TensorSpec([None, *input_shape], tf.float32, name=INPUT_NAME),))
    # Without a trackable object the converter freezes the variables into constants (the path that
    # keeps them as resource variables leaves them uninitialized in the interpreter).
    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()])
    if rows is None:
        with _quiet():
            path.write_bytes(conv.convert())
        return
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]

    def representative() -> Iterator[list[np.ndarray]]:
        for i in range(len(rows)):
            yield [rows[i : i + 1]]

    conv.representative_dataset = representative
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=_TFLITE_FLOAT_OPS)
    with _quiet():
        debugger = tf.lite.experimental.QuantizationDebugger(converter=conv, debug_dataset=representative,
                                                             debug_options=options)
        path.write_bytes(debugger.get_nondebug_quantized_model())


def tflite_predict(path: Path, x: np.ndarray) -> np.ndarray:
    """Run a TFLite file on raw rows in the TFLite interpreter, all rows as one batch."""
    import tensorflow as tf

    interp = tf.lite.Interpreter(model_path=str(path), num_threads=1)
    inp = interp.get_input_details()[0]
    interp.resize_tensor_input(inp["index"], [len(x), *x.shape[1:]])
    interp.allocate_tensors()
    interp.set_tensor(inp["index"], x.astype("float32"))
    interp.invoke()
    return np.array(interp.get_tensor(interp.get_output_details()[0]["index"]))


def predict(fmt: str, path: Path, x: np.ndarray) -> np.ndarray:
    """Predictions of an exported file in the runtime that serves that format (keras-h5: reloaded by Keras)."""
    if fmt == "keras-h5":
        return np.asarray(keras.saving.load_model(path, compile=False).predict(x.astype("float32"), verbose=0))
    return tflite_predict(path, x) if fmt.startswith("tflite") else export.onnx_predict(path, x)


def keras_h5(model: keras.Model, path: Path) -> None:
    """model.h5, the legacy HDF5 file the article's example saves (Keras warns that it is legacy: it is asked for)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(str(path))


def _check(fmt: str, metric: str, value: float, base: float, tolerance: float) -> None:
    higher = metric in export.HIGHER_IS_BETTER
    worse = (base - value) if higher else (value - base)
    if tolerance >= 0 and worse > tolerance:
        raise SpecError(f"{fmt} held-out {metric} {value:.4g} is {worse:.4g} {'below' if higher else 'above'} the "
                        f"float model's {base:.4g} (tolerance {tolerance:g}; drop the format or raise the tolerance)",
                        "spec.output.formatTolerance")


def export_formats(model: keras.Model, spec: TrainingJobSpec, out: Path, x_train: np.ndarray, x_val: np.ndarray,
                   y_val: np.ndarray, metric: str | None, loss: str,
                   made: dict[str, np.ndarray] | None = None) -> list[FormatResult]:
    """Write each format of `spec.output.formats` (model.onnx is already in `out`) and score it.

    `made`: held-out predictions the caller already has (`keras`, `onnx`), so they are not computed twice.
    Returns one entry per format, float onnx first. Raises SpecError when a derived format loses
    more than `spec.output.formatTolerance` of the held-out metric (unless the tolerance is negative).
    """
    made = made or {}
    wanted = ["onnx", *[f for f in spec.output.formats if f != "onnx"]]
    tolerance = float(spec.output.format_tolerance)
    input_shape = [int(d) for d in spec.model.input_shape] if spec.model else []
    base = None
    if metric:
        keras_pred = made["keras"] if "keras" in made else np.asarray(model(x_val.astype("float32"), training=False))
        base = export.evaluate(keras_pred, y_val, [metric], loss)[metric]
    rows = calibration_rows(model, x_train) if any(f.endswith("-int8") for f in wanted) else None
    results = []
    for fmt in dict.fromkeys(wanted):
        if fmt not in FILES:
            raise SpecError(f"unknown format {fmt!r} (known: {', '.join(FILES)})", "spec.output.formats")
        path = out / FILES[fmt]
        try:
            if fmt == "onnx-int8":
                assert rows is not None  # calibration rows exist whenever an int8 format is wanted
                onnx_int8(out / FILES["onnx"], path, quantization_mode(spec), rows)
            elif fmt == "tflite":
                tflite(model, input_shape, path, None)
            elif fmt == "tflite-int8":
                tflite(model, input_shape, path, rows)
            elif fmt == "keras-h5":
                keras_h5(model, path)
            pred = made[fmt] if fmt in made else predict(fmt, path, x_val)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise TrainerError(f"{fmt} export failed: {type(exc).__name__}: {first}", "spec.output.formats") from exc
        value = delta = None
        if metric and base is not None:
            value = export.evaluate(pred, y_val, [metric], loss)[metric]
            delta = value - base
            if fmt != "onnx":  # float ONNX is held to the much stricter parityTolerance instead
                _check(fmt, metric, value, base, tolerance)
        results.append(FormatResult(fmt, path.name, path.stat().st_size, sha256(path), value, metric, delta))
    return results
