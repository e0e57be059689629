"""The Open Inference Protocol's gRPC service (`inference.GRPCInferenceService`) on its own port.

It runs on the same event loop as the HTTP server (grpc.aio) and shares its `ServingState`: the
same model, the same batcher (a gRPC and an HTTP request can share one ONNX Runtime call), the same
readiness and draining, and the same metrics registry (`kiln_grpc_*` families next to HTTP's).

Handlers are registered generically from the message classes of the committed protobuf code
(grpc_predict_v2_pb2.py), so no grpcio-tools output beyond the messages is needed. Errors carry a
gRPC status: a client's mistake is INVALID_ARGUMENT (too many elements: RESOURCE_EXHAUSTED), an
unknown model or version NOT_FOUND, a model not loaded yet or a server draining UNAVAILABLE, and
only a failure of the server itself INTERNAL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from kiln_server import grpc_predict_v2_pb2
from kiln_server.grpc_codec import decode_request, encode_response
from kiln_server.metrics import LATENCY_BUCKETS, Metrics, _Histogram
from kiln_server.protocol import ProtocolError
from kiln_server.serving import ServingState

log = logging.getLogger("kiln_server.grpc")
pb: Any = grpc_predict_v2_pb2  # messages are built at import time: no static attributes to check

SERVICE = "inference.GRPCInferenceService"
_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
           503: grpc.StatusCode.UNAVAILABLE}


class RpcError(Exception):
    """An RPC answered with a non-OK status and a message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _GrpcMetrics(Collector):
    """`kiln_grpc_requests{method,code}` and `kiln_grpc_request_duration_seconds{method}`, rendered at scrape time."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self.latency: dict[str, _Histogram] = {}

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """Count one RPC (event-loop thread only, like the HTTP metrics)."""
        key = (method, code.name)
        self.counts[key] = self.counts.get(key, 0) + 1
        h = self.latency.get(method)
        if h is None:
            h = self.latency[method] = _Histogram(LATENCY_BUCKETS)
        h.observe(seconds)

    def collect(self) -> Iterator[Metric]:
        """The two families as they are now."""
        fam = CounterMetricFamily("kiln_grpc_requests", "gRPC calls by method and status code.", labels=["method", "code"])
        for (method, code), n in sorted(self.counts.items()):
            fam.add_metric([method, code], n)
        yield fam
        lat = HistogramMetricFamily("kiln_grpc_request_duration_seconds", "Time to answer a gRPC call.", labels=["method"])
        for method, h in sorted(self.latency.items()):
            lat.add_metric([method], h.buckets(), h.total)
        yield lat


class InferenceService:
    """The six RPCs over the shared serving state."""

    def __init__(self, state: ServingState, server_version: str, metrics: Metrics) -> None:
        self.state = state
        self.name = state.handle.name
        self.version = state.handle.version
        self.server_version = server_version
        self.metrics = _GrpcMetrics()
        metrics.registry.register(self.metrics)
        # Inference calls waiting for their answer, and the most seen at once in this second and the
        # last: HTTP/2 multiplexes calls, so the number of connections says nothing about how many
        # clients there are; the recent peak of concurrent calls does (see `may_grow`).
        self.inflight = 0
        self._peak = self._peak_prev = 0
        self._peak_at = time.monotonic()

    def may_grow(self) -> bool:
        """For the batcher: may more inference calls arrive soon? True while fewer wait than recently did."""
        now = time.monotonic()
        if now - self._peak_at >= 1.0:
            self._peak_prev, self._peak = (self._peak if now - self._peak_at < 2.0 else 0), self.inflight
            self._peak_at = now
        return self.inflight < max(self._peak, self._peak_prev)

    def _check_model(self, name: str, version: str) -> None:
        """NOT_FOUND for a model or version this server does not serve."""
        if name != self.name:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"unknown model '{name}'; this server serves '{self.name}'")
        if version and version != self.version:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"model '{name}' has no version '{version}'; it serves version '{self.version}'")

    async def server_live(self, req: Any, ctx: Any) -> Any:
        """The process and its loop answer."""
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, req: Any, ctx: Any) -> Any:
        """Ready when the model is loaded and the server is not draining."""
        return pb.ServerReadyResponse(ready=self.state.serving)

    async def model_ready(self, req: Any, ctx: Any) -> Any:
        """Ready for this model (NOT_FOUND for another)."""
        self._check_model(req.name, req.version)
        return pb.ModelReadyResponse(ready=self.state.serving)

    async def server_metadata(self, req: Any, ctx: Any) -> Any:
        """Name, version and extensions, as `GET /v2`."""
        return pb.ServerMetadataResponse(name="kiln", version=self.server_version, extensions=["binary_tensor_data"])

    async def model_metadata(self, req: Any, ctx: Any) -> Any:
        """Inputs and outputs as the model declares them (UNAVAILABLE until it is loaded)."""
        self._check_model(req.name, req.version)
        model = self.state.model
        if model is None:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, self.state.handle.reason)
        meta = model.metadata()
        resp = pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"])
        for t in meta["inputs"]:
            resp.inputs.add(**t)
        for t in meta["outputs"]:
            resp.outputs.add(**t)
        return resp

    async def model_infer(self, req: Any, ctx: Any) -> Any:
        """Validate, queue on the shared batcher, answer raw or typed as the request was."""
        self._check_model(req.model_name, req.model_version)
        state = self.state
        batcher = state.batcher
        if batcher is None or state.draining:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, state.unavailable_reason)
        model = batcher.model
        parsed = decode_request(req, model.inputs, model.outputs, model.output_names, state.max_elements)
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()

        def done(arrays: list[Any] | None, exc: BaseException | None) -> None:
            if future.done():  # the client cancelled meanwhile
                return
            if exc is not None or arrays is None:
                future.set_exception(exc or RuntimeError("no result"))
            else:
                future.set_result(arrays)

        self.inflight += 1
        self._peak = max(self._peak, self.inflight)
        batcher.submit(parsed.feeds, parsed.outputs, parsed.rows, done)
        try:
            arrays = await future
        except Exception as exc:
            status, message = state.inference_failure(exc)
            raise RpcError(_STATUS.get(status, grpc.StatusCode.INTERNAL), message) from None
        finally:
            self.inflight -= 1
        specs = [model.outputs[n] for n in parsed.outputs]
        return encode_response(model.name, model.version, req.id, specs, arrays, parsed.raw)

    def handlers(self) -> grpc.GenericRpcHandler:
        """The generic handler for all six methods, each wrapped with status mapping and metrics."""
        table: list[tuple[str, Callable[[Any, Any], Awaitable[Any]], Any, Any]] = [
            ("ServerLive", self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            ("ServerReady", self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            ("ModelReady", self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            ("ServerMetadata", self.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            ("ModelMetadata", self.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            ("ModelInfer", self.model_infer, pb.ModelInferRequest, pb.ModelInferResponse),
        ]
        methods = {
            name: grpc.unary_unary_rpc_method_handler(
                self._wrap(name, fn), request_deserializer=req_t.FromString, response_serializer=resp_t.SerializeToString
            )
            for name, fn, req_t, resp_t in table
        }
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    def _wrap(self, name: str, fn: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
        """Map ProtocolError/RpcError to their status, anything else to INTERNAL (logged); count every call."""
        observe = self.metrics.observe

        async def call(req: Any, ctx: Any) -> Any:
            t0 = time.perf_counter()
            code, message = grpc.StatusCode.OK, ""
            try:
                return await fn(req, ctx)
            except RpcError as exc:
                code, message = exc.code, exc.message
            except ProtocolError as exc:
                code, message = _STATUS.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT), exc.message
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                log.exception("gRPC %s failed", name)
                code, message = grpc.StatusCode.INTERNAL, "internal server error"
            finally:
                observe(name, code, time.perf_counter() - t0)
            await ctx.abort(code, message)

        return call


class GrpcServer:
    """A grpc.aio server for the service, bound to `host:port` (SO_REUSEPORT only in multi-worker mode)."""

    def __init__(self, service: InferenceService, max_message_bytes: int, reuse_port: bool = False) -> None:
        options = [
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", -1),
        ]
        self.server = grpc.aio.server(options=options)
        self.server.add_generic_rpc_handlers((service.handlers(),))
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        """Bind and start; raises OSError when the port cannot be bound (grpc reports port 0)."""
        try:
            bound = self.server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as exc:  # newer grpcio raises instead of returning port 0
            raise OSError(f"cannot listen for gRPC on {host}:{port}: {exc}") from None
        if bound == 0:
            raise OSError(f"cannot listen for gRPC on {host}:{port}")
        self.port = bound
        await self.server.start()

    async def drain(self, timeout: float) -> None:
        """Refuse new calls, let running ones finish within `timeout`, then cancel the rest."""
        await self.server.stop(timeout)
