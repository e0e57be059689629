"""NVIDIA Triton (through PyTriton 0.7) serving the reference MLP with ONNX Runtime, dynamic batching on.

PyTriton's bundled tritonserver has only the Python backend: the model is a Python callable that
runs ONNX Runtime, Triton does HTTP, the V2 protocol and the dynamic batching in front of it.
Run in its own venv made from Debian's /usr/bin/python3.11 (bench/server/setup_envs.sh):

    python pytriton_server.py --model m.onnx --http-port P --grpc-port G --metrics-port M --workspace DIR [--threads 1]

V2 HTTP on 127.0.0.1:P, model `mlp`, input `input` FP32 [-1, 1000], output `probabilities` FP32
[-1, 10]. Ready only once `/v2/models/mlp/ready` answers 200 (the server's `/v2/health/ready`
answers before the model is loaded).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def session(path: str, threads: int) -> ort.InferenceSession:
    """ONNX Runtime on CPU with `threads` intra-op threads (0: ONNX Runtime's default)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--http-port", type=int, required=True)
    ap.add_argument("--grpc-port", type=int, required=True)
    ap.add_argument("--metrics-port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--max-queue-delay-us", type=int, default=0, help="Triton's dynamic batcher delay")
    ap.add_argument("--workspace", required=True, help="PyTriton's model store and sockets (the bench's work dir)")
    a = ap.parse_args()
    # SIGTERM (run.py's stop) leaves through `with Triton(...)`, which stops tritonserver and cleans up
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sess = session(a.model, a.threads)

    @batch
    def infer(input: np.ndarray) -> dict[str, Any]:
        return {"probabilities": sess.run(None, {"input": input.astype(np.float32, copy=False)})[0]}

    config = TritonConfig(http_address="127.0.0.1", http_port=a.http_port, grpc_address="127.0.0.1",
                          grpc_port=a.grpc_port, metrics_port=a.metrics_port, log_verbose=0)
    with Triton(config=config, workspace=Path(a.workspace)) as triton:
        triton.bind(
            model_name="mlp",
            infer_func=infer,
            inputs=[Tensor(name="input", dtype=np.float32, shape=(1000,))],
            outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(10,))],
            config=ModelConfig(max_batch_size=a.max_batch_size,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=a.max_queue_delay_us)),
            strict=False,
        )
        triton.serve()


if __name__ == "__main__":
    main()
