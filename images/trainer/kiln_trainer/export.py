"""Export to ONNX, then prove the export right: the parity check.

Why parity: tf2onnx rewrites the graph; a silent numeric change would reach production unnoticed.
Keras and ONNX Runtime run the same held-out raw rows (NaN included where imputation applies) and
the largest absolute difference must stay within `spec.output.parityTolerance`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import keras
import numpy as np

from kiln_trainer.errors import SpecError, TrainerError
from kiln_trainer.model import INPUT_NAME, OUTPUT_NAME
from kiln_trainer.storage import sha256 as sha256  # re-exported: export.sha256

BATCH_DIM = "batch"


def _rename(graph: Any, old: str, new: str) -> None:
    if old == new:
        return
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for vi in (*graph.input, *graph.output, *graph.value_info):
        if vi.name == old:
            vi.name = new


def _name_batch_dim(graph: Any) -> None:
    """tf2onnx calls the batch dimension `unk__N`; servers and clients read it better as `batch`."""
    first = graph.input[0].type.tensor_type.shape.dim[0]
    symbol = first.dim_param
    for vi in (*graph.input, *graph.output, *graph.value_info):
        dims = vi.type.tensor_type.shape.dim
        for i, d in enumerate(dims):
            if (symbol and d.dim_param == symbol) or (i == 0 and vi in (*graph.input, *graph.output)):
                d.ClearField("dim_value")
                d.dim_param = BATCH_DIM


def to_onnx(model: keras.Model, input_shape: list[int], opset: int, path: Path) -> None:
    """Write `model` (inference mode) as ONNX with input `input`, output `output` and a named batch dim."""
    import onnx
    import tensorflow as tf
    import tf2onnx

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    if not 13 <= opset <= 18:
        raise SpecError(f"opset {opset} is not supported (13-18)", "spec.output.onnx.opset")
    sig = (tf.TensorSpec([None, *input_shape], tf.float32, name=INPUT_NAME),)
    fn = tf.function(lambda x: model(x, training=False))
    try:
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=sig, opset=opset)
        graph = proto.graph
        if len(graph.input) != 1 or len(graph.output) != 1:
            raise TrainerError(f"expected one input and one output, got {len(graph.input)} and {len(graph.output)}")
        _rename(graph, graph.input[0].name, INPUT_NAME)
        _rename(graph, graph.output[0].name, OUTPUT_NAME)
        _name_batch_dim(graph)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(path))
    except TrainerError:
        raise
    except Exception as exc:
        raise TrainerError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                           "spec.model.layers") from exc


def onnx_session(path: Path) -> Any:
    """An ONNX Runtime CPU session (the runtime the model server uses)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_predict(path: Path, x: np.ndarray) -> np.ndarray:
    """Run an ONNX file on raw rows."""
    sess = onnx_session(path)
    out: np.ndarray = sess.run(None, {sess.get_inputs()[0].name: x.astype("float32")})[0]
    return out


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a-b|; NaN in both at the same place counts as equal, NaN in one as infinitely far."""
    a, b = np.asarray(a, dtype="float64"), np.asarray(b, dtype="float64")
    if a.shape != b.shape:
        return float("inf")
    both = np.isnan(a) & np.isnan(b)
    diff = np.where(both, 0.0, np.abs(a - b))
    return float(np.nan_to_num(diff, nan=np.inf).max()) if diff.size else 0.0


def parity(model: keras.Model, onnx_path: Path, x: np.ndarray, tolerance: float) -> float:
    """Max abs difference of Keras and ONNX Runtime on `x`; above `tolerance` the run fails."""
    keras_out = np.asarray(model(x.astype("float32"), training=False))
    return check_parity(keras_out, onnx_predict(onnx_path, x), tolerance)


def check_parity(keras_out: np.ndarray, onnx_out: np.ndarray, tolerance: float) -> float:
    """The parity check on predictions already made (the trainer reuses its held-out ones)."""
    diff = max_abs_diff(keras_out, onnx_out)
    if not diff <= tolerance:
        raise SpecError(f"ONNX and Keras outputs differ by up to {diff:.3g} on held-out rows (tolerance {tolerance:g})",
                        "spec.output.parityTolerance")
    return diff


def tensor_info(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Inputs and outputs of an ONNX file in V2 terms (-1 for variable dimensions)."""
    import onnx

    types = {1: "FP32", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FP16", 11: "FP64"}
    graph = onnx.load(str(path), load_external_data=False).graph

    def info(vi: Any) -> dict[str, Any]:
        t = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        return {"name": vi.name, "datatype": types.get(t.elem_type, "FP32"), "shape": shape}

    return [info(v) for v in graph.input], [info(v) for v in graph.output]


HIGHER_IS_BETTER = frozenset({"accuracy", "auc", "precision", "recall"})


def metric_objects(names: list[str], loss: str) -> list[keras.metrics.Metric]:
    """Keras metric objects named as in the spec, so history keys are `accuracy`, `val_accuracy`, ..."""
    out: list[keras.metrics.Metric] = []
    for name in names:
        if name == "accuracy":
            cls = {"sparse_categorical_crossentropy": keras.metrics.SparseCategoricalAccuracy,
                   "categorical_crossentropy": keras.metrics.CategoricalAccuracy,
                   "binary_crossentropy": keras.metrics.BinaryAccuracy}.get(loss, keras.metrics.Accuracy)
        else:
            classes = {"mse": keras.metrics.MeanSquaredError, "mae": keras.metrics.MeanAbsoluteError,
                       "auc": keras.metrics.AUC, "precision": keras.metrics.Precision, "recall": keras.metrics.Recall}
            if name not in classes:
                raise SpecError(f"unknown metric {name!r}", "spec.training.metrics")
            cls = classes[name]
        out.append(cls(name=name))
    return out


def evaluate(pred: np.ndarray, y: np.ndarray, names: list[str], loss: str) -> dict[str, float]:
    """Metrics of predictions made by any runtime (ONNX, TFLite, Keras) on held-out labels."""
    values = {}
    for m in metric_objects(names, loss):
        m.update_state(y, pred)
        values[m.name] = float(m.result())
    return values
