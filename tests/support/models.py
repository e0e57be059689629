"""Small ONNX models for the server tests, built with onnx.helper (no TensorFlow).

Each builder writes a file and returns its path; weights come from a fixed seed so tests can
compare the server's answers with an in-process ONNX Runtime session on the same file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=OPSET, producer_name="kiln-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _w(rng: np.random.Generator, name: str, shape: tuple[int, ...], scale: float = 0.1) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def mlp(path: Path, features: int = 1000, hidden: int = 64, classes: int = 10, seed: int = 0) -> Path:
    """MatMul+Add+Relu x2, MatMul+Add, Softmax: input FP32 [batch, features] -> probabilities FP32 [batch, classes].

    The default size is the reference MLP 1000 -> 64 -> 64 -> 10 used in the benchmarks.
    """
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["input", "W1"], ["h1"]),
        helper.make_node("Add", ["h1", "B1"], ["h1b"]),
        helper.make_node("Relu", ["h1b"], ["r1"]),
        helper.make_node("MatMul", ["r1", "W2"], ["h2"]),
        helper.make_node("Add", ["h2", "B2"], ["h2b"]),
        helper.make_node("Relu", ["h2b"], ["r2"]),
        helper.make_node("MatMul", ["r2", "W3"], ["h3"]),
        helper.make_node("Add", ["h3", "B3"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])],
        [
            _w(rng, "W1", (features, hidden)),
            _w(rng, "B1", (hidden,)),
            _w(rng, "W2", (hidden, hidden)),
            _w(rng, "B2", (hidden,)),
            _w(rng, "W3", (hidden, classes)),
            _w(rng, "B3", (classes,)),
        ],
    )
    return _save(graph, path)


def two_io(path: Path) -> Path:
    """Inputs a, b FP32 [batch, 3] -> outputs sum FP32 [batch, 3] and argmax INT64 [batch]."""
    nodes = [
        helper.make_node("Add", ["a", "b"], ["sum"]),
        helper.make_node("ArgMax", ["sum"], ["argmax"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "two_io",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 3]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("argmax", TensorProto.INT64, ["batch"]),
        ],
    )
    return _save(graph, path)


def int64_model(path: Path) -> Path:
    """Input ids INT64 [batch, 4] -> doubled INT64 [batch, 4] and is_positive BOOL [batch, 4]."""
    two = numpy_helper.from_array(np.array(2, dtype=np.int64), "two")
    zero = numpy_helper.from_array(np.array(0, dtype=np.int64), "zero")
    nodes = [
        helper.make_node("Mul", ["ids", "two"], ["doubled"]),
        helper.make_node("Greater", ["ids", "zero"], ["is_positive"]),
    ]
    graph = helper.make_graph(
        nodes,
        "int64_model",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4])],
        [
            helper.make_tensor_value_info("doubled", TensorProto.INT64, ["batch", 4]),
            helper.make_tensor_value_info("is_positive", TensorProto.BOOL, ["batch", 4]),
        ],
        [two, zero],
    )
    return _save(graph, path)


def strings_model(path: Path) -> Path:
    """Input text STRING [batch] -> same text (Identity): exercises BYTES both ways."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["echo"])],
        "strings",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch"])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, ["batch"])],
    )
    return _save(graph, path)


def fixed_shape(path: Path) -> Path:
    """Input x FP32 [2, 3] (no batch dim) -> y = x * 3: batching must leave it alone."""
    three = numpy_helper.from_array(np.array(3.0, dtype=np.float32), "three")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "three"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [three],
    )
    return _save(graph, path)


def slow(path: Path, width: int = 256, layers: int = 64) -> Path:
    """Input x FP32 [batch, width] -> `layers` x (MatMul + Tanh) with one shared weight: slow on purpose."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), "W")
    nodes = []
    prev = "x"
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [prev, "W"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"t{i}"]))
        prev = f"t{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        [w],
    )
    return _save(graph, path)


def gather(path: Path) -> Path:
    """Input idx INT64 [batch] -> rows of a 4x2 table: an index past 3 makes ONNX Runtime fail at run time."""
    table = numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(4, 2), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["rows"], axis=0)],
        "gather",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["batch", 2])],
        [table],
    )
    return _save(graph, path)


def unnamed_dims_add(path: Path) -> Path:
    """Inputs a, b FP32 [?, 3] with unnamed dim 0 -> a + b: differing first dims fail inside ONNX Runtime."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "unnamed_add",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [None, 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
    )
    return _save(graph, path)


def sqrt_model(path: Path) -> Path:
    """Input x FP32 [batch, 3] -> sqrt(x) and 1/x: finite inputs that give NaN and Infinity outputs."""
    graph = helper.make_graph(
        [helper.make_node("Sqrt", ["x"], ["root"]), helper.make_node("Reciprocal", ["x"], ["inverse"])],
        "sqrt",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [
            helper.make_tensor_value_info("root", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("inverse", TensorProto.FLOAT, ["batch", 3]),
        ],
    )
    return _save(graph, path)
