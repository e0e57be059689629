"""LitServe 0.2 API serving the reference MLP with ONNX Runtime (benchmark only; not a V2 server).

LitServe's own API shape: `POST /predict` with `{"inputs": [1000 floats]}` (one row as a flat JSON
list), answer `{"probabilities": [10 floats]}`. Run in its own venv (bench/server/setup_envs.sh):

    python litserve_api.py --model m.onnx --port P [--threads 1]

One worker on CPU, batching off (LitServe's default), uvicorn's access log off; ready when `/health` answers 200.
"""

from __future__ import annotations

import argparse

import litserve as ls
import numpy as np
import onnxruntime as ort


class MlpAPI(ls.LitAPI):  # type: ignore[misc]
    """decode -> ONNX Runtime -> encode, LitServe's three steps."""

    def __init__(self, model: str, threads: int) -> None:
        super().__init__()
        self.model = model
        self.threads = threads

    def setup(self, device: str) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        self.session = ort.InferenceSession(self.model, opts, providers=["CPUExecutionProvider"])

    def decode_request(self, request):  # type: ignore[no-untyped-def]  # unannotated: LitServe then passes the parsed JSON
        return np.asarray(request["inputs"], dtype=np.float32).reshape(1, -1)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"input": x})[0]

    def encode_response(self, output: np.ndarray) -> dict[str, list[float]]:
        return {"probabilities": output[0].tolist()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads")
    a = ap.parse_args()
    server = ls.LitServer(MlpAPI(a.model, a.threads), accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=a.port, generate_client_file=False, access_log=False)


if __name__ == "__main__":
    main()
