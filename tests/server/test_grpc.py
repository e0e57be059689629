"""The Open Inference Protocol's gRPC service, driven by a client written by others (`tritonclient.grpc`).

Real `kiln serve` processes with `--grpc-port`; answers compared with an in-process ONNX Runtime
session. Typed `contents` requests are built from tritonclient's own protobuf messages and sent
through its generated stub, since its high-level client always sends raw contents.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from support.server import Server, free_port, ort_session, start_server, wait_until
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]


def _start(model: Path, name: str, tmp: Path, *args: str) -> tuple[Server, int]:
    gport = free_port()
    return start_server(model, name, tmp, "--grpc-port", str(gport), *args), gport


@pytest.fixture(scope="module")
def mlp(model_dir: Path, server_tmp: Path) -> Iterator[tuple[Server, int]]:
    s, gport = _start(model_dir / "mlp.onnx", "mlp", server_tmp, "--max-elements", "20000")
    yield s, gport
    s.stop()


@pytest.fixture(scope="module")
def ints(model_dir: Path, server_tmp: Path) -> Iterator[tuple[Server, int]]:
    s, gport = _start(model_dir / "int64.onnx", "ints", server_tmp)
    yield s, gport
    s.stop()


@pytest.fixture(scope="module")
def strings(model_dir: Path, server_tmp: Path) -> Iterator[tuple[Server, int]]:
    s, gport = _start(model_dir / "strings.onnx", "strings", server_tmp)
    yield s, gport
    s.stop()


def _client(gport: int) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(url=f"127.0.0.1:{gport}")


def _stub(gport: int) -> Any:
    return service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{gport}"))


def _x(rows: int = 4, seed: int = 11) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 1000)).astype(np.float32)


def test_health_and_metadata(mlp: tuple[Server, int]) -> None:
    c = _client(mlp[1])
    assert c.is_server_live()
    assert c.is_server_ready()
    assert c.is_model_ready("mlp")
    assert c.is_model_ready("mlp", "1")
    meta = c.get_model_metadata("mlp", as_json=True)
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "1000"]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": ["-1", "10"]}]
    assert meta["platform"] == "onnxruntime_onnx"
    assert c.get_server_metadata().name == "kiln"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.get_model_metadata("other"), "unknown model 'other'; this server serves 'mlp'"),
        (lambda c: c.get_model_metadata("mlp", "9"), "model 'mlp' has no version '9'"),
        (lambda c: c.is_model_ready("other"), "unknown model 'other'"),
    ],
)
def test_unknown_model_or_version_is_not_found(mlp: tuple[Server, int], call: Any, message: str) -> None:
    with pytest.raises(InferenceServerException) as info:
        call(_client(mlp[1]))
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert message in info.value.message()


def test_infer_raw_contents(mlp: tuple[Server, int], model_dir: Path) -> None:
    """tritonclient sends `raw_input_contents` and reads `raw_output_contents`."""
    x = _x()
    expected = ort_session(model_dir / "mlp.onnx").run(None, {"input": x})[0]
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = _client(mlp[1]).infer("mlp", [inp], outputs=[grpcclient.InferRequestedOutput("probabilities")], request_id="g-1")
    got = res.as_numpy("probabilities")
    assert got.dtype == np.float32 and got.shape == (4, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    response = res.get_response()
    assert response.id == "g-1"
    assert response.model_name == "mlp" and response.model_version == "1"
    assert len(response.raw_output_contents) == 1


def test_infer_typed_contents(mlp: tuple[Server, int], model_dir: Path) -> None:
    """Typed `fp32_contents` in, typed contents out (the answer mirrors the request)."""
    x = _x(2, seed=5)
    expected = ort_session(model_dir / "mlp.onnx").run(None, {"input": x})[0]
    req = service_pb2.ModelInferRequest(model_name="mlp", model_version="1", id="typed")
    t = req.inputs.add(name="input", datatype="FP32", shape=[2, 1000])
    t.contents.fp32_contents.extend(x.reshape(-1).tolist())
    resp = _stub(mlp[1]).ModelInfer(req, timeout=10)
    assert not resp.raw_output_contents
    (out,) = resp.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("probabilities", "FP32", [2, 10])
    got = np.array(out.contents.fp32_contents, dtype=np.float32).reshape(2, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert resp.id == "typed"


def test_int64_and_bool_both_ways(ints: tuple[Server, int]) -> None:
    ids = np.array([[1, -2, 3, 0], [5, 6, -7, 8]], dtype=np.int64)
    req = service_pb2.ModelInferRequest(model_name="ints")
    req.inputs.add(name="ids", datatype="INT64", shape=[2, 4]).contents.int64_contents.extend(ids.reshape(-1).tolist())
    resp = _stub(ints[1]).ModelInfer(req, timeout=10)
    outs = {o.name: o for o in resp.outputs}
    assert list(outs["doubled"].contents.int64_contents) == (ids * 2).reshape(-1).tolist()
    assert list(outs["is_positive"].contents.bool_contents) == (ids > 0).reshape(-1).tolist()
    inp = grpcclient.InferInput("ids", [2, 4], "INT64")
    inp.set_data_from_numpy(ids)
    res = _client(ints[1]).infer("ints", [inp])
    np.testing.assert_array_equal(res.as_numpy("doubled"), ids * 2)
    np.testing.assert_array_equal(res.as_numpy("is_positive"), ids > 0)


def test_bytes_both_ways(strings: tuple[Server, int]) -> None:
    words = np.array(["kiln", "grpc", "é"], dtype=object)
    inp = grpcclient.InferInput("text", [3], "BYTES")
    inp.set_data_from_numpy(words)
    res = _client(strings[1]).infer("strings", [inp])
    assert [w.decode() for w in res.as_numpy("echo")] == list(words)
    req = service_pb2.ModelInferRequest(model_name="strings")
    req.inputs.add(name="text", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"a", "ü".encode()])
    resp = _stub(strings[1]).ModelInfer(req, timeout=10)
    assert list(resp.outputs[0].contents.bytes_contents) == [b"a", "ü".encode()]


def _typed(shape: list[int], datatype: str = "FP32", field: str = "fp32_contents", values: Any = None, name: str = "input") -> Any:
    req = service_pb2.ModelInferRequest(model_name="mlp")
    t = req.inputs.add(name=name, datatype=datatype, shape=shape)
    n = int(np.prod(shape)) if values is None else 0
    getattr(t.contents, field).extend(values if values is not None else [0.5] * n)
    return req


def _raw(shape: list[int], nbytes: int, datatype: str = "FP32") -> Any:
    req = service_pb2.ModelInferRequest(model_name="mlp")
    req.inputs.add(name="input", datatype=datatype, shape=shape)
    req.raw_input_contents.append(b"\0" * nbytes)
    return req


def _mixed() -> Any:
    req = _raw([1, 1000], 4000)
    req.inputs[0].contents.fp32_contents.append(1.0)
    return req


def _two_raw() -> Any:
    req = _raw([1, 1000], 4000)
    req.raw_input_contents.append(b"")
    return req


BAD = [
    ("wrong inner dim", _raw([1, 999], 3996), "INVALID_ARGUMENT", "shape [1, 999] does not match the model's shape [-1, 1000]"),
    ("wrong rank", _raw([1000], 4000), "INVALID_ARGUMENT", "does not match the model's shape"),
    ("wrong datatype", _raw([1, 1000], 8000, "FP64"), "INVALID_ARGUMENT", "datatype FP64 does not match the model's FP32"),
    ("unknown datatype", _raw([1, 1000], 4000, "FLOAT"), "INVALID_ARGUMENT", "unsupported datatype 'FLOAT'"),
    ("raw too short", _raw([2, 1000], 4000), "INVALID_ARGUMENT", "binary_data_size is 4000 bytes but shape [2, 1000] of FP32 needs 8000"),
    ("raw count", _two_raw(), "INVALID_ARGUMENT", "raw_input_contents has 2 entries but the request has 1 inputs"),
    ("raw and typed", _mixed(), "INVALID_ARGUMENT", "typed contents cannot be mixed with raw_input_contents"),
    ("typed count", _typed([1, 1000], values=[1.0] * 10), "INVALID_ARGUMENT", "fp32_contents has 10 elements but shape [1, 1000] needs 1000"),
    ("typed field", _typed([1, 1000], field="int_contents", values=[1] * 1000), "INVALID_ARGUMENT", "datatype FP32 takes fp32_contents, but the request sets int_contents"),
    ("unknown input", _typed([1, 1000], name="nope"), "INVALID_ARGUMENT", "unknown input 'nope'"),
    ("too many elements", _typed([21, 1000]), "RESOURCE_EXHAUSTED", "more than 20000 tensor elements"),
    ("no inputs", service_pb2.ModelInferRequest(model_name="mlp"), "INVALID_ARGUMENT", "non-empty list of tensors"),
    ("unknown model", service_pb2.ModelInferRequest(model_name="zzz"), "NOT_FOUND", "unknown model 'zzz'"),
    ("unknown version", service_pb2.ModelInferRequest(model_name="mlp", model_version="2"), "NOT_FOUND", "has no version '2'"),
]


@pytest.mark.parametrize(("case", "req", "code", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_client_status(mlp: tuple[Server, int], case: str, req: Any, code: str, message: str) -> None:
    """Each client mistake gets its own status and message, never INTERNAL; the server keeps serving."""
    with pytest.raises(grpc.RpcError) as info:
        _stub(mlp[1]).ModelInfer(req, timeout=10)
    assert info.value.code().name == code, info.value.details()
    assert message in info.value.details()
    assert _client(mlp[1]).is_server_ready()


def test_requested_outputs(ints: tuple[Server, int]) -> None:
    req = service_pb2.ModelInferRequest(model_name="ints")
    req.inputs.add(name="ids", datatype="INT64", shape=[1, 4]).contents.int64_contents.extend([1, 2, 3, 4])
    req.outputs.add(name="nothing")
    with pytest.raises(grpc.RpcError) as info:
        _stub(ints[1]).ModelInfer(req, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown output 'nothing'" in info.value.details()
    req.outputs[0].name = "doubled"
    resp = _stub(ints[1]).ModelInfer(req, timeout=10)
    assert [o.name for o in resp.outputs] == ["doubled"]


def test_grpc_shares_metrics_with_http(mlp: tuple[Server, int]) -> None:
    """gRPC calls are counted on the HTTP port's /metrics, and their inference runs on the same batcher."""
    server, gport = mlp

    def batches() -> float:
        for line in server.metrics().splitlines():
            if line.startswith('kiln_batch_requests_count{model="mlp"}'):
                return float(line.split()[-1])
        return 0.0

    before = batches()
    x = _x(1)
    inp = grpcclient.InferInput("input", [1, 1000], "FP32")
    inp.set_data_from_numpy(x)
    c = _client(gport)
    for _ in range(3):
        c.infer("mlp", [inp])
    text = server.metrics()
    assert 'kiln_grpc_requests_total{code="OK",method="ModelInfer"}' in text
    assert batches() >= before + 3


def test_concurrent_grpc_calls_are_batched(model_dir: Path, server_tmp: Path) -> None:
    """With batching on and only gRPC clients, concurrent calls still merge into one ORT call."""
    s, gport = _start(model_dir / "mlp.onnx", "mlp", server_tmp, "--max-batch-size", "32", "--max-latency-ms", "20")
    try:
        x = _x(1, seed=2)
        expected = ort_session(model_dir / "mlp.onnx").run(None, {"input": x})[0]

        def call(_: int) -> np.ndarray:
            inp = grpcclient.InferInput("input", [1, 1000], "FP32")
            inp.set_data_from_numpy(x)
            return _client(gport).infer("mlp", [inp]).as_numpy("probabilities")

        with ThreadPoolExecutor(8) as pool:
            for _round in range(5):
                for got in pool.map(call, range(8)):
                    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
        text = s.metrics()
        count = float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith('kiln_batch_requests_count{model="mlp"}')))
        total = float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith('kiln_batch_requests_sum{model="mlp"}')))
        assert total == 40
        assert count < total, "no two gRPC calls shared an ONNX Runtime call"
    finally:
        s.stop()


def test_not_ready_is_unavailable(server_tmp: Path) -> None:
    """A model that failed to load: live, not ready, and inference/metadata are UNAVAILABLE with the reason."""
    gport = free_port()
    s = start_server(server_tmp / "missing.onnx", "gone", server_tmp, "--grpc-port", str(gport), wait="live")
    try:
        c = _client(gport)
        wait_until(lambda: c.is_server_live())
        assert not c.is_server_ready()
        assert not c.is_model_ready("gone")
        with pytest.raises(InferenceServerException) as info:
            c.get_model_metadata("gone")
        assert info.value.status() == "StatusCode.UNAVAILABLE"
        assert "does not exist" in info.value.message()
        with pytest.raises(grpc.RpcError) as err:
            _stub(gport).ModelInfer(service_pb2.ModelInferRequest(model_name="gone"), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        s.stop()


@pytest.mark.unit
def test_committed_protobuf_code_matches_the_proto(tmp_path: Path) -> None:
    """grpc_predict_v2_pb2.py is generated from images/server/proto; regenerating gives the same file."""
    proto_dir = ROOT / "images/server/proto"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}", f"--python_out={tmp_path}", "grpc_predict_v2.proto"],
        check=True,
    )
    committed = (ROOT / "images/server/kiln_server/grpc_predict_v2_pb2.py").read_text()
    assert (tmp_path / "grpc_predict_v2_pb2.py").read_text() == committed
