"""BentoML 1.4 service serving the reference MLP with ONNX Runtime (benchmark only; not a V2 server).

BentoML's own API shape, as a user would write it: `POST /predict` with `{"inputs": [1000 floats]}`
(one row as a flat JSON list), answer `{"probabilities": [10 floats]}`. Run in its own venv
(bench/server/setup_envs.sh):

    KILN_BENCH_MODEL=m.onnx KILN_BENCH_THREADS=1 bentoml serve bentoml_service:Mlp --port P

One worker, access log off; ready when `/readyz` answers 200.
"""

from __future__ import annotations

import os

import bentoml
import numpy as np
import onnxruntime as ort


@bentoml.service(workers=1, logging={"access": {"enabled": False}})
class Mlp:
    """One ONNX Runtime session; the API method runs it on one row."""

    def __init__(self) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(os.environ.get("KILN_BENCH_THREADS", "0"))
        self.session = ort.InferenceSession(os.environ["KILN_BENCH_MODEL"], opts, providers=["CPUExecutionProvider"])

    @bentoml.api
    def predict(self, inputs: list[float]) -> dict[str, list[float]]:
        x = np.asarray(inputs, dtype=np.float32).reshape(1, -1)
        y = self.session.run(None, {"input": x})[0]
        return {"probabilities": y[0].tolist()}
