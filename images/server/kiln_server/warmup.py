"""Warmup before ready: run the model on synthetic inputs of its signature at each batch size it will see.

ONNX Runtime allocates its memory arenas and picks kernels on the first calls of each shape, so the
first real requests after a cold start would otherwise pay several times the usual latency (and,
with many replicas starting at once, show as a latency spike when they turn ready). Triton does
the same (`model_warmup`). Inputs are zeros (empty strings for BYTES); dims other than the batch
dim that the model leaves open are 1.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from kiln_server.model import OnnxModel
from kiln_server.protocol import TensorSpec

log = logging.getLogger("kiln_server.warmup")


def batch_sizes(max_batch_size: int, batching: bool) -> list[int]:
    """The batch sizes to warm: 1 without batching; else powers of two up to the largest batch, and it."""
    if not batching or max_batch_size <= 1:
        return [1]
    sizes = [1]
    while sizes[-1] * 2 < max_batch_size:
        sizes.append(sizes[-1] * 2)
    sizes.append(max_batch_size)
    return sizes


def synthetic_feeds(inputs: dict[str, TensorSpec], rows: int) -> dict[str, np.ndarray]:
    """Zeros of each input's datatype and shape, `rows` on a variable dim 0, 1 on other variable dims."""
    feeds: dict[str, np.ndarray] = {}
    for spec in inputs.values():
        shape = [rows if (i == 0 and d == -1) else (1 if d == -1 else d) for i, d in enumerate(spec.shape)]
        if spec.datatype == "BYTES":
            arr = np.empty(shape, dtype=object)
            arr.fill("")
        else:
            arr = np.zeros(shape, dtype=spec.dtype)
        feeds[spec.name] = arr
    return feeds


def run_warmup(model: OnnxModel, count: int, sizes: list[int]) -> tuple[float, int, str]:
    """Blocking (run it in a thread): `count` calls per batch size. Returns (seconds, calls made, error or "").

    A model that cannot run on zeros is not refused: real inputs may still suit it. The error is
    returned so the start log says why the warmup stopped early.
    """
    start = time.perf_counter()
    calls = 0
    if count <= 0:
        return 0.0, 0, ""
    names = model.output_names
    for rows in sizes:
        feeds = synthetic_feeds(model.inputs, rows)
        for _ in range(count):
            try:
                model.run(feeds, names)
            except Exception as exc:
                return time.perf_counter() - start, calls, f"{type(exc).__name__}: {str(exc).strip()[:300]}"
            calls += 1
    return time.perf_counter() - start, calls, ""
