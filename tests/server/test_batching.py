"""Dynamic batching: concurrent requests are merged into one ORT call and split back, results unchanged."""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from support.server import Server, start_server

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def batching_server(model_dir: Path, server_tmp: Path) -> Iterator[Server]:
    s = start_server(
        model_dir / "mlp.onnx", "mlp", server_tmp, "--max-batch-size", "32", "--max-latency-ms", "20"
    )
    yield s
    s.stop()


def _histogram(metrics: str, name: str) -> tuple[float, float]:
    count = float(re.search(rf"^{name}_count{{[^}}]*}} (\S+)$", metrics, re.M).group(1))  # type: ignore[union-attr]
    total = float(re.search(rf"^{name}_sum{{[^}}]*}} (\S+)$", metrics, re.M).group(1))  # type: ignore[union-attr]
    return count, total


def test_concurrent_requests_are_batched_and_equal_unbatched(batching_server: Server, mlp_server: Server) -> None:
    rng = np.random.default_rng(21)
    # Mixed row counts and mixed output selections: only compatible requests may be merged.
    payloads = []
    for i in range(48):
        rows = 1 + (i % 3)
        x = rng.standard_normal((rows, 1000)).astype(np.float32)
        doc = {"id": f"r{i}", "inputs": [{"name": "input", "shape": [rows, 1000], "datatype": "FP32", "data": x.ravel().tolist()}]}
        if i % 4 == 0:
            doc["outputs"] = [{"name": "probabilities"}]
        payloads.append(doc)

    before_count, before_sum = _histogram(batching_server.metrics(), "kiln_batch_requests")
    with ThreadPoolExecutor(max_workers=16) as pool:
        batched = list(pool.map(batching_server.infer, payloads))
    after_count, after_sum = _histogram(batching_server.metrics(), "kiln_batch_requests")
    unbatched = [mlp_server.infer(doc) for doc in payloads]  # mlp_server has batching off

    for doc, b, u in zip(payloads, batched, unbatched, strict=True):
        assert b.status_code == 200, b.text
        assert u.status_code == 200, u.text
        bj, uj = b.json(), u.json()
        assert bj["id"] == doc["id"]
        assert bj["outputs"][0]["shape"] == uj["outputs"][0]["shape"] == [doc["inputs"][0]["shape"][0], 10]
        np.testing.assert_allclose(
            np.array(bj["outputs"][0]["data"], dtype=np.float32),
            np.array(uj["outputs"][0]["data"], dtype=np.float32),
            rtol=1e-6, atol=1e-7,
        )

    calls = after_count - before_count
    merged_requests = after_sum - before_sum
    assert merged_requests == len(payloads)
    assert calls < len(payloads), f"no batch formed: {calls} ORT calls for {len(payloads)} requests"
    rows_count, rows_sum = _histogram(batching_server.metrics(), "kiln_batch_size")
    assert rows_sum / rows_count > 1.0


def test_lone_request_waits_at_most_max_latency(batching_server: Server) -> None:
    doc = {"inputs": [{"name": "input", "shape": [1, 1000], "datatype": "FP32", "data": [0.1] * 1000}]}
    r = batching_server.infer(doc)
    assert r.status_code == 200
    # 20 ms batching window + overhead; generous bound for a loaded 2-core machine
    assert r.elapsed.total_seconds() < 1.0


def test_bad_request_in_a_batch_does_not_fail_neighbours(batching_server: Server) -> None:
    good = {"inputs": [{"name": "input", "shape": [1, 1000], "datatype": "FP32", "data": [0.2] * 1000}]}
    bad = {"inputs": [{"name": "input", "shape": [1, 1000], "datatype": "FP32", "data": [0.2] * 999}]}
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(batching_server.infer, [good, bad] * 8))
    assert [r.status_code for r in results] == [200, 400] * 8


def test_fixed_shape_model_is_not_batched(model_dir: Path, server_tmp: Path) -> None:
    s = start_server(model_dir / "fixed.onnx", "fixed", server_tmp, "--max-batch-size", "16", "--max-latency-ms", "5")
    try:
        events = [line.get("event") for line in s.log_lines()]
        assert "batching_disabled" in events
        doc = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}]}
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(lambda d: requests.post(s.url + "/v2/models/fixed/infer", json=d, timeout=10), [doc] * 8))
        for r in results:
            assert r.status_code == 200
            assert r.json()["outputs"][0]["data"] == [3.0, 6.0, 9.0, 12.0, 15.0, 18.0]
    finally:
        s.stop()


def test_inline_only_for_a_lone_request(model_dir: Path) -> None:
    """The batcher runs a request on the loop only when it is alone; requests parsed together share one hand-off."""
    import asyncio

    from kiln_server.batching import Batcher
    from kiln_server.model import OnnxModel

    model = OnnxModel(str(model_dir / "mlp.onnx"), "mlp", "1", ["CPUExecutionProvider"], 1, "")
    x = np.random.default_rng(4).standard_normal((1, 1000)).astype(np.float32)
    expected = model.run({"input": x}, model.output_names)

    async def scenario() -> tuple[int, int, int]:
        batcher = Batcher(model, 1, 1, 0.0, inline_max_s=1.0)
        loop = asyncio.get_running_loop()

        def submit_many(n: int) -> list[asyncio.Future[list[np.ndarray]]]:
            futures: list[asyncio.Future[list[np.ndarray]]] = []
            for _ in range(n):
                fut: asyncio.Future[list[np.ndarray]] = loop.create_future()
                batcher.submit({"input": x}, model.output_names, 1,
                               lambda r, e, f=fut: f.set_exception(e) if e else f.set_result(r))
                futures.append(fut)
            return futures

        for out in await asyncio.gather(*submit_many(1)):  # unmeasured model: the thread, never inline
            np.testing.assert_allclose(out[0], expected[0], rtol=1e-6)
        first = batcher.inline
        for out in await asyncio.gather(*submit_many(1)):  # measured and alone: inline
            np.testing.assert_allclose(out[0], expected[0], rtol=1e-6)
        second = batcher.inline
        for out in await asyncio.gather(*submit_many(5)):  # five in one iteration: one hand-off to the thread
            np.testing.assert_allclose(out[0], expected[0], rtol=1e-6)
        third = batcher.inline
        assert batcher.inflight == 0
        batcher.close()
        return first, second, third

    assert asyncio.run(scenario()) == (0, 1, 1)
