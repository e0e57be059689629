"""The floors of Kiln's approach: the least a server on the same stack can do per V2 request.

    python floor_server.py --level http|parse|infer --model MLP.onnx --port N

An asyncio Protocol on httptools under uvloop, keep-alive, answering every request (only the
one model's infer route is ever sent):
- `http`: a fixed 200 answer without looking at the body (the HTTP stack alone);
- `parse`: + pysimdjson parse of the V2 body and its `data` into an FP32 array (as Kiln's fast path);
- `infer`: + ONNX Runtime inline on the loop and the V2 JSON reply encoded by orjson.
No validation, no metrics, no error handling: a bound, not a server (bench/server/floors.py).
"""

from __future__ import annotations

import argparse
import asyncio
from email.utils import formatdate
from typing import Any

import httptools
import numpy as np
import orjson
import simdjson
import uvloop

FIXED = b'{"model_name":"mlp","model_version":"1","outputs":[]}'
DATE = [b""]  # the Date header value, refreshed once a second (as Kiln does)


def _tick(loop: asyncio.AbstractEventLoop) -> None:
    DATE[0] = formatdate(usegmt=True).encode()
    loop.call_later(1.0, _tick, loop)


class Floor(asyncio.Protocol):
    """One connection: parse with httptools, answer at message end."""

    def __init__(self, level: str, session: Any) -> None:
        self.level = level
        self.session = session
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []
        self.json = simdjson.Parser()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_message_begin(self) -> None:
        self.body = []

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        if self.level == "http" or not body:
            out = FIXED
        else:
            doc = self.json.parse(body)
            inp = doc["inputs"][0]
            x = np.frombuffer(inp["data"].as_buffer(of_type="d"), dtype=np.float64).astype(np.float32)
            x = x.reshape(list(inp["shape"]))
            rid = doc.get("id")
            del doc, inp
            if self.level == "parse":
                out = FIXED
            else:
                y = self.session.run(None, {"input": x})[0]
                out = orjson.dumps(
                    {"model_name": "mlp", "model_version": "1", "id": rid,
                     "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": list(y.shape), "data": y.reshape(-1)}]},
                    option=orjson.OPT_SERIALIZE_NUMPY,
                )
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\ndate: %s\r\n\r\n%s"
            % (len(out), DATE[0], out)
        )


async def serve(level: str, model: str, port: int) -> None:
    session = None
    if level == "infer":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        session = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
    loop = asyncio.get_running_loop()
    _tick(loop)
    server = await loop.create_server(lambda: Floor(level, session), "127.0.0.1", port, backlog=2048)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--level", choices=["http", "parse", "infer"], required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()
    uvloop.run(serve(a.level, a.model, a.port))


if __name__ == "__main__":
    main()
