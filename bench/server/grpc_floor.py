#!/usr/bin/env python
"""The floor of gRPC on grpc.aio + uvloop: `ModelInfer` answered with a fixed, pre-serialized response.

No decoding of the request beyond grpc's own framing, no validation, no inference: what one unary call
costs in grpc.aio itself. bench/server/grpc_rest.py runs it next to Kiln's gRPC service.

    python bench/server/grpc_floor.py PORT
"""

from __future__ import annotations

import asyncio
import sys

import grpc
import uvloop


async def serve(port: int) -> None:
    from tritonclient.grpc import service_pb2

    resp = service_pb2.ModelInferResponse(model_name="mlp", model_version="1")
    out = resp.outputs.add(name="probabilities", datatype="FP32", shape=[1, 10])
    del out
    resp.raw_output_contents.append(b"\0" * 40)
    blob = resp.SerializeToString()

    async def infer(request: bytes, context: object) -> bytes:
        return blob

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.unary_unary_rpc_method_handler(infer)  # raw bytes in and out: no protobuf parsing
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ModelInfer": handler}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(int(sys.argv[1])))
